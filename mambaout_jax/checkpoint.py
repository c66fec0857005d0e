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


def _abspath(directory: str) -> str:
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
  directory = _abspath(directory)
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
  directory = _abspath(directory)
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


def load_pretrained(name: str, path: str, *, seed: int = 0, **overrides):
  """Builds variant `name` and loads the params checkpoint at `path` onto the default device."""
  params, meta = read_params(path)
  if meta.get('variant') not in (None, name):
    raise ValueError(f'{path} holds a {meta["variant"]} checkpoint, not {name}; '
                     f'call load_pretrained({meta["variant"]!r}, {path!r})')
  kwargs = {**meta.get('model_kwargs', {}), **overrides}
  model = build_uninitialised(name, seed=seed, **kwargs)
  check_params_match(model, params, source=path, variant=name)
  assign_params(model, params)
  model.eval()
  return model


# ----------------------------------------------------------------------------------------------
# Training checkpoints (the trainer's part): an Orbax CheckpointManager over
#   DIR/checkpoints/<step>/{state, data, meta}
# `state` is the train state pytree (step, params, opt_state[, ema_params]) restored straight onto
# the current mesh's shardings, so a run resumes on any device count; `data` is the Grain iterator
# state of every process (one JSON file each); `meta` names the variant and model kwargs so a
# checkpoint of another model is refused with a clear message.

CHECKPOINTS_DIR = 'checkpoints'


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoints belong to another model (variant or number of classes)."""


def create_checkpoint_manager(workdir: str, *, keep: int = 3, keep_best: int = 1,
                              async_save: bool = True, best_metric: str = 'eval/top1'):
  """Manager keeping the latest `keep` checkpoints plus the best `keep_best` by `best_metric`."""
  import grain.checkpoint
  import orbax.checkpoint as ocp
  from orbax.checkpoint import checkpoint_managers as policies
  keep_policies = [policies.LatestN(n=keep)]
  if keep_best > 0:
    keep_policies.append(policies.BestN(get_metric_fn=lambda m: m[best_metric], n=keep_best,
                                        keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy(keep_policies),
      enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      epath.Path(_abspath(workdir)) / CHECKPOINTS_DIR, options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler(),
                     'meta': ocp.JsonCheckpointHandler()})


def save_train_state(manager, step: int, state, *, data_iterator=None, meta: dict,
                     metrics: dict | None = None) -> bool:
  """Starts an (async) save of `state` and the iterator state at `step`; True if it saved."""
  import grain.checkpoint
  import orbax.checkpoint as ocp
  items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
  if data_iterator is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def check_train_meta(meta: dict, *, variant: str, model_kwargs: dict, path: str):
  if meta.get('variant') != variant:
    raise CheckpointMismatchError(
        f'{path} holds a checkpoint of {meta.get("variant")}, but config.model.name is {variant}; '
        f'use another --workdir or set --config.model.name={meta.get("variant")}')
  trained = meta.get('model_kwargs', {}).get('num_classes')
  if trained != model_kwargs.get('num_classes'):
    raise CheckpointMismatchError(
        f'{path} was trained with num_classes={trained}, the config gives '
        f'{model_kwargs.get("num_classes")}; use another --workdir')


def restore_latest_train_state(manager, abstract_state, *, data_iterator=None, variant: str,
                               model_kwargs: dict, log=print):
  """Restores the newest checkpoint that reads back, onto `abstract_state`'s shardings.

  Returns (step, state, meta) or None when there is none. A checkpoint that fails to restore
  (partial or corrupt files) is reported and the next older one is tried. The data iterator is
  restored in place when its state was saved by the same number of processes; otherwise it starts
  afresh (reported).
  """
  import grain.checkpoint
  import orbax.checkpoint as ocp
  manager.reload()
  for step in sorted(manager.all_steps(), reverse=True):
    path = os.path.join(str(manager.directory), str(step))
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to an older one
      log(f'WARNING: checkpoint {path} is unreadable ({type(e).__name__}: {e}); '
          'trying an older one')
      continue
    check_train_meta(meta, variant=variant, model_kwargs=model_kwargs, path=path)
    try:
      state = manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))['state']
    except Exception as e:  # noqa: BLE001
      log(f'WARNING: checkpoint {path} failed to restore ({type(e).__name__}: '
          f'{str(e).splitlines()[0] if str(e) else ""}); trying an older one')
      continue
    if data_iterator is not None:
      try:
        manager.restore(step, args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
      except Exception as e:  # noqa: BLE001
        log(f'WARNING: input pipeline state in {path} not restored ({type(e).__name__}: {e}); '
            f'the input pipeline starts from its beginning')
    return step, state, meta
  return None
