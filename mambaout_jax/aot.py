r"""Compile the real train step for a TPU topology on this (CPU) host and report memory and FLOPs.

    pip install "libtpu==0.0.42.*"      # the libtpu that jax[tpu]==0.10.2 pins
    python -m mambaout_jax.aot --config=configs/tiny.py --topology=v5e:4x4
    python -m mambaout_jax.aot --config=configs/tiny.py --topology=v4:2x2x4 --json

The step is `train.create_step_functions(...)`'s jitted train step (same function, same mesh rule,
same in/out shardings and donation as a real run), lowered with abstract inputs on the topology's
devices and compiled by libtpu; no TPU is needed. Reported per device: argument, output, temporary
and total memory (the compiled program's `memory_analysis()`), whether it fits the device's HBM
(a chip's HBM, shared by its devices where libtpu lists one per TensorCore, as for v4), and the
FLOPs of one step (XLA's `cost_analysis()`; per device and over the slice) and per image.
Exit status 1 when the step does not fit: lower `--config.batch_size` or raise
`--config.grad_accum_steps`, or shard parameters with `--config.mesh="(('data',-1),('fsdp',4))"`.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file (configs/*.py).',
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string('topology', 'v5e:4x4', 'TPU topology, e.g. v5e:4x4, v4:2x2x4, '
                                'v5p:2x2x2, v6e:4x4.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'Classes when config.dataset.num_classes '
                                    'is 0 (the dataset is not read here).')
flags.mark_flags_as_required(['config'])

GIB = 2 ** 30
# High-bandwidth memory per chip (device_kind as JAX lists it -> bytes).
HBM_BYTES = {'TPU v2': 16 * GIB, 'TPU v3': 32 * GIB, 'TPU v4': 32 * GIB, 'TPU v4 lite': 8 * GIB,
             'TPU v5 lite': 16 * GIB, 'TPU v5e': 16 * GIB, 'TPU v5': 95 * GIB, 'TPU v5p': 95 * GIB,
             'TPU v6 lite': 32 * GIB, 'TPU v6e': 32 * GIB}


def tpu_devices(topology: str):
  """The devices of a TPU topology, described by libtpu without any TPU attached."""
  from jax.experimental import topologies
  try:
    try:  # one device per chip, as JAX runs v4 / v5p ("megacore"); other chips have one core
      return topologies.get_topology_desc(platform='tpu', topology_name=topology,
                                          chip_config_name='megacore').devices
    except Exception:  # noqa: BLE001
      return topologies.get_topology_desc(platform='tpu', topology_name=topology).devices
  except Exception as e:  # noqa: BLE001 - libtpu missing or an unknown topology name
    raise SystemExit(f'cannot describe TPU topology {topology!r} ({type(e).__name__}: '
                     f'{str(e).splitlines()[0] if str(e) else ""}); install libtpu '
                     '(pip install "libtpu==0.0.42.*") and use a name like v5e:4x4 or v4:2x2x4')


def analyze(config, topology: str, num_classes: int = 1000) -> dict:
  """Compiles the train step of `config` for `topology`; returns per-device memory and FLOPs."""
  import jax
  import jax.numpy as jnp
  from mambaout_jax import sharding as shd
  from mambaout_jax import train

  config = config.copy_and_resolve_references()
  if config.model.get('dwconv_impl', 'auto') == 'auto' and config.model.name.startswith('mamba'):
    config.model.dwconv_impl = 'conv'  # 'auto' would pick the CPU formulation on this host
  if config.model.name.startswith('mamba_'):  # the SSM's 'auto' scan would also pick CPU's
    from mambaout_jax.models import ssm
    ssm.set_default_scan_mode(ssm.default_scan_mode(backend='tpu'))
  devices = tpu_devices(topology)
  mesh = shd.create_mesh(config.mesh, devices=devices)
  num_classes = config.dataset.num_classes or num_classes
  # The schedule length only changes constants in the program, not its size.
  fns = train.create_step_functions(config, mesh, num_classes, schedule_steps_per_epoch=1000.0)
  s = config.image_size
  batch_sharding = shd.batch_sharding(mesh)
  batch = {'image': jax.ShapeDtypeStruct((config.batch_size, s, s, 3), jnp.float32,
                                         sharding=batch_sharding),
           'label': jax.ShapeDtypeStruct((config.batch_size,), jnp.int32, sharding=batch_sharding)}
  t0 = time.time()
  try:
    compiled = fns.train_step.lower(fns.abstract_state, batch, fns.abstract_rest).compile()
  finally:
    if config.model.name.startswith('mamba_'):
      from mambaout_jax.models import ssm
      ssm.set_default_scan_mode(None)
  compile_s = time.time() - t0
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  kind = devices[0].device_kind
  # libtpu may describe a chip as several devices (v4: one per TensorCore); they share its HBM.
  num_chips = len({tuple(d.coords) for d in devices})
  devices_per_chip = len(devices) // num_chips
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           - memory.alias_size_in_bytes + memory.temp_size_in_bytes
           + memory.generated_code_size_in_bytes)
  hbm = HBM_BYTES[kind] // devices_per_chip if kind in HBM_BYTES else None
  flops_per_device = float(cost.get('flops', float('nan')))
  num_params = sum(x.size for x in jax.tree.leaves(fns.abstract_state['params']))
  return {
      'model': config.model.name, 'topology': topology, 'device_kind': kind,
      'num_devices': len(devices), 'num_chips': num_chips, 'mesh': dict(mesh.shape),
      'batch_size': config.batch_size,
      'grad_accum_steps': config.grad_accum_steps, 'image_size': s,
      'compute_dtype': config.model.dtype, 'num_params': int(num_params),
      'argument_gib': memory.argument_size_in_bytes / GIB,
      'output_gib': memory.output_size_in_bytes / GIB,
      'alias_gib': memory.alias_size_in_bytes / GIB,
      'temp_gib': memory.temp_size_in_bytes / GIB,
      'total_gib': total / GIB,
      'hbm_gib': hbm / GIB if hbm else None,  # per device
      'fits': (total <= hbm) if hbm else None,
      'flops_per_step_per_device': flops_per_device,
      'flops_per_step': flops_per_device * len(devices),
      'flops_per_image': flops_per_device * len(devices) / config.batch_size,
      'compile_seconds': compile_s,
  }


def format_report(r: dict) -> str:
  fits = {True: 'yes', False: 'NO', None: 'unknown HBM size'}[r['fits']]
  hbm = f"{r['hbm_gib']:.1f}" if r['hbm_gib'] else '?'
  return '\n'.join([
      f"{r['model']} train step on {r['topology']} ({r['num_chips']} x {r['device_kind']}, "
      f"{r['num_devices']} devices), mesh "
      f"{r['mesh']}, global batch {r['batch_size']} x {r['image_size']}px "
      f"({r['grad_accum_steps']} micro-batches), {r['compute_dtype']}, {r['num_params']:,} params",
      f"  per device: arguments {r['argument_gib']:.2f} GiB, temporaries {r['temp_gib']:.2f} GiB, "
      f"total {r['total_gib']:.2f} GiB of {hbm} GiB HBM -> fits: {fits}",
      f"  FLOPs per step: {r['flops_per_step']:.4g} ({r['flops_per_step_per_device']:.4g} per device), "
      f"per image {r['flops_per_image'] / 1e9:.4g} GFLOP (forward + backward + update)",
      f"  compiled in {r['compile_seconds']:.0f}s"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile for TPU; run nothing on this host
  # No TPU is opened, so several compiles may share libtpu (its lockfile guards real chips).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  result = analyze(_CONFIG.value, _TOPOLOGY.value, _NUM_CLASSES.value)
  print(json.dumps(result) if _JSON.value else format_report(result))
  if result['fits'] is False:
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
