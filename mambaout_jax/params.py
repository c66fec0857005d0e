"""Params-only checkpoints: what `convert` writes, the trainer exports, and `load_pretrained` reads.

A params checkpoint is a directory holding an Orbax PyTree checkpoint (`params/`) of the model's
parameters as a nested dict with string keys, and `mambaout_meta.json` naming the variant and the
constructor overrides it needs (e.g. `num_classes`). Loading checks every key and shape against the
model and refuses a mismatch with a message naming the first offending key — never a partial load.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx

META_FILE = 'mambaout_meta.json'
PARAMS_DIR = 'params'


def abspath(directory: str) -> str:
  """Absolute local path; URLs such as gs://bucket/dir are kept as they are."""
  return directory if '://' in directory else os.path.abspath(directory)


def flat_params(model_or_state) -> dict[tuple, Any]:
  """{path tuple: array} for every nnx.Param of a module (or a State of params)."""
  state = model_or_state
  if isinstance(model_or_state, nnx.Module):
    state = nnx.state(model_or_state, nnx.Param)
  return {path: var.get_value() if hasattr(var, 'get_value') else var
          for path, var in nnx.to_flat_state(state)}


def path_str(path: tuple) -> str:
  return '.'.join(str(p) for p in path)


def nest(flat: dict[tuple, Any]) -> dict:
  """Flat {path tuple: value} -> nested dict with string keys (Orbax-friendly)."""
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(str(p), {})
    node[str(path[-1])] = value
  return tree


def flatten(tree: dict, prefix=()) -> dict[tuple, Any]:
  """Nested dict with string keys -> {path tuple: value}, string digits turned back into ints."""
  out = {}
  for k, v in tree.items():
    key = int(k) if isinstance(k, str) and k.isdigit() else k
    if isinstance(v, dict):
      out.update(flatten(v, prefix + (key,)))
    else:
      out[prefix + (key,)] = v
  return out


def save_params(directory: str, params, *, variant: str, model_kwargs: dict | None = None,
                extra_meta: dict | None = None) -> str:
  """Writes a params checkpoint; `params` is a module, a State of params or {path tuple: array}."""
  import orbax.checkpoint as ocp
  if not isinstance(params, dict):
    params = flat_params(params)
  directory = abspath(directory)
  epath.Path(directory).mkdir(parents=True, exist_ok=True)
  tree = nest({k: np.asarray(jax.device_get(v)) for k, v in params.items()})
  ckptr = ocp.PyTreeCheckpointer()
  ckptr.save(epath.Path(directory) / PARAMS_DIR, tree, force=True)
  meta = {'variant': variant, 'model_kwargs': model_kwargs or {}, **(extra_meta or {})}
  (epath.Path(directory) / META_FILE).write_text(json.dumps(meta, indent=2))
  return directory


def read_params(directory: str) -> tuple[dict[tuple, np.ndarray], dict]:
  """Returns ({path tuple: numpy array}, meta) from a params checkpoint directory."""
  import orbax.checkpoint as ocp
  directory = abspath(directory)
  meta_path = epath.Path(directory) / META_FILE
  if not meta_path.exists():
    raise FileNotFoundError(
        f'{directory} is not a mambaout_jax params checkpoint (no {META_FILE}); make one with '
        f'`python -m mambaout_jax.convert --variant=NAME --src=FILE.pth --out={directory}` or '
        f'`python -m mambaout_jax.main --mode=export ...`')
  meta = json.loads(meta_path.read_text())
  tree = ocp.PyTreeCheckpointer().restore(epath.Path(directory) / PARAMS_DIR)
  return flatten(tree), meta


def check_params_match(model, params: dict[tuple, Any], *, source: str, variant: str):
  """Raises ValueError naming the first missing / unexpected / mis-shaped key."""
  expected = {k: tuple(v.shape) for k, v in flat_params(model).items()}
  for k in sorted(expected, key=path_str):
    if k not in params:
      raise ValueError(f'{source} does not fit {variant}: missing parameter {path_str(k)!r} '
                       f'(expected shape {expected[k]}); is it a checkpoint of another variant?')
  for k in sorted(params, key=path_str):
    if k not in expected:
      raise ValueError(f'{source} does not fit {variant}: unexpected parameter {path_str(k)!r} '
                       f'(shape {tuple(np.shape(params[k]))}); is it a checkpoint of another variant?')
    if tuple(np.shape(params[k])) != expected[k]:
      raise ValueError(f'{source} does not fit {variant}: parameter {path_str(k)!r} has shape '
                       f'{tuple(np.shape(params[k]))} in the checkpoint but {expected[k]} in the model')


def assign_params(model, params: dict[tuple, Any]):
  """Copies {path tuple: array} into the model's nnx.Params, casting to each param's dtype."""
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  for path, var in flat.items():
    var.set_value(jax.numpy.asarray(params[path], dtype=var.get_value().dtype))
  nnx.update(model, state)
  return model


def build_uninitialised(name: str, *, seed: int = 0, **kwargs):
  """Builds variant `name` without running its random parameter init (params are placeholders).

  Random init on CPU costs one small XLA compile per parameter shape (tens of seconds for the big
  variants); a model whose parameters are about to be overwritten does not need it. The RNG state
  that drop path keeps is computed for real, in one jitted call in which the params are dead code.
  """
  from mambaout_jax.models.registry import create_model

  def make():
    return create_model(name, rngs=nnx.Rngs(seed), **kwargs)

  model = nnx.eval_shape(make)
  rest = jax.jit(lambda: nnx.state(make(), nnx.Not(nnx.Param)))()
  nnx.update(model, rest)
  return model


def split_batch_stats(model, flat: dict[tuple, Any], *, source: str, variant: str):
  """(weights, stats): the checkpoint's entries split into parameters and the model's BatchNorm
  statistics (nnx.BatchStat, exported with the parameters); every statistic must be present."""
  stat_paths = [path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))]
  missing = sorted((k for k in stat_paths if k not in flat), key=path_str)
  if missing:
    raise ValueError(f'{source} has no BatchNorm statistics for {variant} (first missing: '
                     f'{path_str(missing[0])!r}); export the checkpoint with its model_state '
                     '(python -m mambaout_jax.main --mode=export)')
  stats = {k: flat[k] for k in stat_paths}
  return {k: v for k, v in flat.items() if k not in stats}, stats


def assign_batch_stats(model, stats: dict[tuple, Any]):
  """Copies {path tuple: array} into the model's nnx.BatchStat variables."""
  state = nnx.state(model, nnx.BatchStat)
  for path, var in nnx.to_flat_state(state):
    var.set_value(jax.numpy.asarray(stats[path], dtype=var.get_value().dtype))
  nnx.update(model, state)
  return model


def load_pretrained(name: str, path: str, *, seed: int = 0, **overrides):
  """Builds variant `name` from the checkpoint's recorded constructor kwargs (`overrides` win) and
  loads its params (and BatchNorm statistics, if the model has any) onto the default device."""
  params, meta = read_params(path)
  if meta.get('variant') not in (None, name):
    raise ValueError(f'{path} holds a {meta["variant"]} checkpoint, not {name}; '
                     f'call load_pretrained({meta["variant"]!r}, {path!r})')
  kwargs = {**meta.get('model_kwargs', {}), **overrides}
  model = build_uninitialised(name, seed=seed, **kwargs)
  params, stats = split_batch_stats(model, params, source=path, variant=name)
  check_params_match(model, params, source=path, variant=name)
  assign_params(model, params)
  assign_batch_stats(model, stats)
  model.eval()
  return model
