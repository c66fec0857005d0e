"""Device mesh, parameter partition rules and host-local <-> global arrays.

One `jax.sharding.Mesh` with axes ('data', 'fsdp'). The batch is sharded over both axes; parameters
and optimizer state are replicated, or with `fsdp > 1` each large array is split along its largest
dimension divisible by the fsdp size (ZeRO-3 style, as big_vision's `fsdp` rule). The same code runs
on 1 CPU device, 8 fake CPU devices, several processes and a TPU pod.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')  # the batch dimension is split over every device
FSDP_MIN_SIZE = 2 ** 12  # smaller arrays stay replicated: splitting them costs more than it saves


def mesh_shape(config_mesh: Sequence[Sequence[Any]], num_devices: int) -> tuple[int, int]:
  """(data, fsdp) sizes from `config.mesh`, e.g. (('data', -1), ('fsdp', 1)); -1 takes the rest."""
  sizes = dict(config_mesh)
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f'unknown mesh axes {sorted(unknown)} in config.mesh; valid axes: {MESH_AXES}')
  sizes = {axis: int(sizes.get(axis, 1)) for axis in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f'config.mesh {tuple(config_mesh)}: at most one axis may be -1')
  fixed = int(np.prod([s for s in sizes.values() if s != -1]))
  if free:
    if num_devices % fixed:
      raise ValueError(f'config.mesh {tuple(config_mesh)} does not divide {num_devices} devices')
    sizes[free[0]] = num_devices // fixed
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise ValueError(f'config.mesh {tuple(config_mesh)} needs {np.prod(list(sizes.values()))} '
                     f'devices but {num_devices} are available; set one axis to -1')
  return sizes['data'], sizes['fsdp']


def create_mesh(config_mesh, devices=None) -> Mesh:
  """The ('data', 'fsdp') mesh over all devices; with fixed sizes whose product is smaller (and one
  process), over the first devices only, e.g. (('data', 1), ('fsdp', 1)) for a 1-device run."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = dict(config_mesh)
  wanted = int(np.prod([int(sizes.get(axis, 1)) for axis in MESH_AXES]))
  if -1 not in sizes.values() and 0 < wanted < len(devices) and jax.process_count() == 1:
    devices = devices[:wanted]
  shape = mesh_shape(config_mesh, len(devices))
  # Auto axes: XLA's sharding propagation (the pjit model) rather than sharding-in-types.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape: Sequence[int], fsdp_size: int) -> P:
  """FSDP rule: split the largest dimension divisible by `fsdp_size` (arrays >= FSDP_MIN_SIZE)."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return P()
  for dim in np.argsort(shape)[::-1]:
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, abstract_tree) -> Any:
  """NamedShardings for a tree of arrays / ShapeDtypeStructs (params, optimizer state, EMA)."""
  fsdp_size = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp_size)), abstract_tree)


def host_local_to_global(batch: dict, mesh: Mesh) -> dict:
  """Per-host numpy batch (this host's rows) -> global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
