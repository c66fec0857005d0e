r"""Compile the real train step for a TPU topology on this (CPU) host and report memory and FLOPs.

    pip install "libtpu==0.0.42.*"      # the libtpu that jax[tpu]==0.10.2 pins
    python -m mambaout_jax.aot --config=configs/tiny.py --topology=v5e:4x4
    python -m mambaout_jax.aot --config=configs/tiny.py --topology=v4:2x2x4 --json
    python -m mambaout_jax.aot --config=configs/seg/upernet_mambaout_tiny_ade20k.py --topology=v5e:2x2

The step is `train.create_step_functions(...)`'s jitted train step (same function, same mesh rule,
same in/out shardings and donation as a real run), lowered with abstract inputs on the topology's
devices and compiled by libtpu; no TPU is needed. The batch is the config's task's
(`Task.abstract_train_batch`: images + one label each for classification, a label per pixel of
the crop for segmentation); 'auto' depthwise convs and SSM scans are traced as on a TPU. Reported per device: argument, output, temporary
and total memory (the compiled program's `memory_analysis()`), whether it fits the device's HBM
(a chip's HBM, shared by its devices where libtpu lists one per TensorCore, as for v4), and the
FLOPs of one step (XLA's `cost_analysis()`; per device and over the slice) and per image.

Roofline: with the bytes the step reads and writes in HBM (`cost_analysis()['bytes accessed']`)
and the chip's peak bf16 FLOP/s and HBM bandwidth (`PEAK`), one step cannot take less than
max(FLOPs / peak, bytes / bandwidth) per device. That bound gives a ceiling on images/s per chip
and on MFU (model FLOPs utilisation: FLOPs / peak over the bound), and says whether the step is
compute- or memory-bound. `hlo_bytes_by_category` splits the HBM traffic of the compiled module by
HLO op category (matmul, convolution, reduction, elementwise fusions, copies, collectives...), so
the table shows which kind of op a memory-bound step spends its bytes on. Bounds, not predictions:
a real step also pays for collectives, pipeline bubbles and imperfect overlap.
Exit status 1 when the step does not fit: lower `--config.batch_size` or raise
`--config.grad_accum_steps`, or shard parameters with `--config.mesh="(('data',-1),('fsdp',4))"`.
"""
from __future__ import annotations

import collections
import json
import os
import re
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


# Peak dense bf16 FLOP/s and HBM bandwidth (bytes/s) per chip, from the Google Cloud TPU docs'
# system architecture pages (cloud.google.com/tpu/docs/<version>, "key chip specifications"):
#   v2: 45 TFLOPs, 600 GB/s (tpu/docs/v2);   v3: 123 TFLOPs, 900 GB/s (tpu/docs/v3);
#   v4: 275 TFLOPs, 1200 GB/s (tpu/docs/v4); v5e: 197 TFLOPs, 819 GB/s (tpu/docs/v5e);
#   v5p: 459 TFLOPs, 2765 GB/s (tpu/docs/v5p); v6e (Trillium): 918 TFLOPs, 1640 GB/s (tpu/docs/v6e).
# A chip that libtpu lists as several devices (one per TensorCore) shares these between them.
_V5E, _V6E = (197e12, 819e9), (918e12, 1640e9)
PEAK = {'TPU v2': (45e12, 600e9), 'TPU v3': (123e12, 900e9), 'TPU v4': (275e12, 1200e9),
        'TPU v5 lite': _V5E, 'TPU v5e': _V5E, 'TPU v5': (459e12, 2765e9),
        'TPU v5p': (459e12, 2765e9), 'TPU v6 lite': _V6E, 'TPU v6e': _V6E}


def roofline(flops: float, bytes_accessed: float, peak_flops: float, bandwidth: float,
             images_per_device: float, devices_per_chip: int = 1) -> dict:
  """Lower bound on one step's time per device, and the ceilings it implies."""
  compute_s, memory_s = flops / peak_flops, bytes_accessed / bandwidth
  seconds = max(compute_s, memory_s)
  return {'compute_seconds': compute_s, 'memory_seconds': memory_s, 'roofline_seconds': seconds,
          'bound': 'compute' if compute_s >= memory_s else 'memory',
          'arithmetic_intensity': flops / bytes_accessed if bytes_accessed else float('inf'),
          'ridge_intensity': peak_flops / bandwidth,
          'images_per_second_per_chip_ceiling': images_per_device * devices_per_chip / seconds,
          'mfu_ceiling': compute_s / seconds}


# ----------------------------------------------------------------------------------------------
# HBM traffic by HLO op category, from the compiled module's text.

_SHAPE = re.compile(r'\b(pred|[suf](?:4|8|16|32|64)|bf16|c64|c128|f8e\w+)\[([\d,]*)\]')
_BYTES = {'pred': 1, 'bf16': 2, 'c64': 8, 'c128': 16}
_FREE = {'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant', 'after-all',
         'partition-id', 'replica-id', 'opt-barrier', 'iota'}
_COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')


def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    n = 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    if dtype in _BYTES:
      total += n * _BYTES[dtype]
    else:  # s32 -> 4; sub-byte and fp8 types -> 1
      total += n * (1 if dtype.startswith('f8') else max(int(dtype[1:]) // 8, 1))
  return total


def _conv_category(line: str) -> str:
  """TPU compilers write many matmuls as convolutions: a window larger than 1 is a real conv."""
  if re.search(r'feature_group_count=(?!1\b)\d+', line):
    return 'depthwise/grouped convolution'
  window = re.search(r'window=\{size=([\dx]+)', line)
  if window and any(int(d) > 1 for d in window.group(1).split('x')):
    return 'convolution'
  return 'matmul (dot)'


def _fusion_category(body: str) -> str:
  convs = [line for line in body.splitlines() if ' convolution(' in line]
  if convs:
    kinds = {_conv_category(c) for c in convs}
    return next(k for k in ('depthwise/grouped convolution', 'convolution', 'matmul (dot)')
                if k in kinds) + ' fusion'
  for op, name in ((' dot(', 'matmul (dot)'),
                   ('scatter(', 'scatter'), ('reduce-window(', 'reduce-window'),
                   ('reduce(', 'reduction'), ('dynamic-update-slice(', 'dynamic-update-slice'),
                   ('gather(', 'gather')):
    if op in body:
      return name + ' fusion'
  if body.count(' slice(') >= 9 and ' multiply(' in body:
    return 'shifted multiply-add fusion (CPU depthwise conv)'  # layers._shift_correlate
  ops = set(re.findall(r'= [^ ]+ ([a-z-]+)\(', body)) - _FREE
  if ops and ops <= {'copy', 'transpose', 'slice', 'concatenate', 'pad', 'reshape', 'broadcast',
                     'dynamic-slice'}:
    return 'data movement fusion (copy/transpose/slice/pad)'
  return 'elementwise fusion'


def hlo_instructions(hlo_text: str) -> list[tuple[str, str, float]]:
  """(name, op category, bytes read + written x executions) per executed top-level instruction.

  Counts the operand and result shapes of every top-level instruction of a compiled module's text
  (a fusion's intermediates stay on chip), multiplying while-loop bodies by their known trip
  count: an estimate of cost_analysis()'s 'bytes accessed' that can be split by category.
  """
  comps, current, entry = {}, None, None
  for line in hlo_text.splitlines():
    if not line.startswith(' ') and line.rstrip().endswith('{'):
      current = line.split()[1 if line.startswith('ENTRY') else 0].lstrip('%')
      comps[current] = []
      entry = current if line.startswith('ENTRY') else entry
    elif current is not None and line.startswith(' ') and ' = ' in line:
      m = re.match(r'\s*(?:ROOT )?%?([\w.-]+) = (.*?) ([a-z-]+)\((.*)', line.split(', metadata=')[0])
      if m:
        comps[current].append(m.groups())
  bodies = {name: '\n'.join(f'{n} = {r} {o}({a}' for n, r, o, a in instrs)
            for name, instrs in comps.items()}
  out = []

  def visit(comp, scale, depth):
    result_bytes = {name: _shape_bytes(result) for name, result, _, _ in comps.get(comp, [])}
    for name, result, opcode, rest in comps.get(comp, []):
      if opcode in _FREE:
        continue
      line = rest
      if opcode == 'while' and depth < 8:
        trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
        body = re.search(r'body=%?([\w.-]+)', line)
        if body:
          visit(body.group(1), scale * (int(trip.group(1)) if trip else 1), depth + 1)
        continue
      if opcode in ('call', 'conditional') and depth < 8:
        for callee in re.findall(r'(?:to_apply=|calls=|branch_computations=\{)%?([\w.-]+)', line):
          visit(callee, scale, depth + 1)
        continue
      if opcode.endswith('-done'):  # async pair: counted at its -start
        continue
      if opcode == 'fusion':
        callee = re.search(r'calls=%?([\w.-]+)', line)
        category = _fusion_category(bodies.get(callee.group(1), '') if callee else '')
      elif opcode.startswith(_COLLECTIVES):
        category = f"collective ({opcode.replace('-start', '')})"
      elif opcode == 'convolution':
        category = _conv_category(line)
      elif opcode == 'dot':
        category = 'matmul (dot)'
      else:
        category = opcode
      operands = rest.split('), ')[0]
      # Compiled modules name their operands without shapes: look the names up.
      operand_bytes = _shape_bytes(operands) or sum(
          result_bytes.get(o, 0) for o in re.findall(r'%([\w.-]+)', operands))
      if opcode.endswith('-start'):  # result is a (source, destination, context) tuple
        category, nbytes = category.replace('copy-start', 'copy'), 2 * operand_bytes
      else:
        nbytes = _shape_bytes(result) + operand_bytes
      out.append((name, category, scale * nbytes))

  visit(entry, 1.0, 0)
  return out


def hlo_bytes_by_category(hlo_text: str) -> dict[str, float]:
  """Estimated HBM bytes per HLO op category over one execution of the module, largest first."""
  acc = collections.Counter()
  for _, category, nbytes in hlo_instructions(hlo_text):
    acc[category] += nbytes
  return dict(acc.most_common())


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
  from mambaout_jax.models import layers
  from mambaout_jax.models import ssm
  from mambaout_jax.tasks import get_task

  config = config.copy_and_resolve_references()
  devices = tpu_devices(topology)
  mesh = shd.create_mesh(config.mesh, devices=devices)
  task = get_task(config)
  num_classes = config.dataset.get('num_classes', 0) or num_classes
  # The schedule length only changes constants in the program, not its size.
  fns = train.create_step_functions(config, mesh, num_classes, schedule_steps_per_epoch=1000.0,
                                    task=task)
  batch_sharding = shd.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
           for k, v in task.abstract_train_batch(config, config.batch_size).items()}
  t0 = time.time()
  # 'auto' depthwise convs and SSM scans would pick their CPU formulation on this host: trace
  # them as on the target (an explicit config.model.dwconv_impl / scan_mode still wins).
  layers.set_default_depthwise_impl(layers.resolve_depthwise_impl('auto', backend='tpu'))
  ssm.set_default_scan_mode(ssm.default_scan_mode(backend='tpu'))
  try:
    compiled = fns.train_step.lower(fns.abstract_state, batch, fns.abstract_rest).compile()
  finally:
    layers.set_default_depthwise_impl(None)
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
  bytes_per_device = float(cost.get('bytes accessed', float('nan')))
  peak_flops, bandwidth = (x / devices_per_chip for x in PEAK.get(kind, (float('nan'),) * 2))
  by_category = hlo_bytes_by_category(compiled.as_text())
  by_category_total = sum(by_category.values())
  num_params = sum(x.size for x in jax.tree.leaves(fns.abstract_state['params']))
  return {
      'model': config.model.name, 'topology': topology, 'device_kind': kind,
      'num_devices': len(devices), 'num_chips': num_chips, 'mesh': dict(mesh.shape),
      'batch_size': config.batch_size,
      'task': task.name, 'batch_shapes': {k: list(v.shape) for k, v in batch.items()},
      'grad_accum_steps': config.grad_accum_steps, 'image_size': config.image_size,
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
      'bytes_accessed_per_device': bytes_per_device,
      'peak_flops_per_device': peak_flops,
      'hbm_bandwidth_per_device': bandwidth,
      **roofline(flops_per_device, bytes_per_device, peak_flops, bandwidth,
                 config.batch_size / len(devices), devices_per_chip),
      # Share of the module's HBM traffic (estimated from its HLO) per op category, largest first.
      'hlo_bytes_estimate_per_device': by_category_total,
      'hbm_bytes_share_by_category': {k: v / by_category_total for k, v in by_category.items()},
      'compile_seconds': compile_s,
      **({'cost_note': ACCUM_COST_NOTE.format(n=config.grad_accum_steps)}
         if config.grad_accum_steps > 1 else {}),
  }


# XLA's cost analysis counts a while loop's body once. A 2-trip micro-batch loop of a small model
# is unrolled and counted in full, but mamba_tiny's at grad_accum_steps=2 survived: 23.6 GFLOP per
# image on v5e:4x4 against 43.6 without accumulation on v4:2x2x4.
ACCUM_COST_NOTE = ('with {n} micro-batches XLA may count the micro-batch loop once (a while loop '
                   "body is counted once unless the compiler unrolls it): FLOPs, bytes and the "
                   'roofline can be up to {n}x low; compare with --config.grad_accum_steps=1')


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
      f"  roofline per device: {r['bytes_accessed_per_device'] / 1e9:.3g} GB accessed at "
      f"{r['hbm_bandwidth_per_device'] / 1e9:.0f} GB/s = {r['memory_seconds'] * 1e3:.2f} ms, "
      f"{r['flops_per_step_per_device'] / 1e12:.3g} TFLOP at "
      f"{r['peak_flops_per_device'] / 1e12:.0f} TFLOP/s bf16 = {r['compute_seconds'] * 1e3:.2f} ms"
      f" -> {r['bound']}-bound, step >= {r['roofline_seconds'] * 1e3:.2f} ms, "
      f"<= {r['images_per_second_per_chip_ceiling']:.0f} img/s per chip, "
      f"MFU <= {r['mfu_ceiling']:.0%} (intensity {r['arithmetic_intensity']:.0f} FLOP/byte, "
      f"ridge {r['ridge_intensity']:.0f})",
      '  HBM traffic by HLO op category: ' + ', '.join(
          f'{k} {v:.0%}' for k, v in list(r['hbm_bytes_share_by_category'].items())[:6]),
      f"  compiled in {r['compile_seconds']:.0f}s"]
      + ([f"  note: {r['cost_note']}"] if r.get('cost_note') else []))


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
