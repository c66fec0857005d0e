"""Training checkpoints (the trainer's part): an Orbax CheckpointManager over
DIR/checkpoints/<step>/{state, meta}.

`state` is the train state pytree (step, params, opt_state[, ema_params], model_state) restored
straight onto the current mesh's shardings, so a run resumes on any device count; the input
pipeline needs no state of its own (its position is a function of the global step). `meta` records
the model's structure and the train state's layout, so a checkpoint of another structure is
refused with a clear message instead of being mistaken for a corrupt one. Params-only checkpoints (convert
output, trainer export, `load_pretrained`) live in `mambaout_jax.params`.
"""
from __future__ import annotations

import os

from etils import epath

from mambaout_jax.params import abspath

CHECKPOINTS_DIR = 'checkpoints'


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoints belong to another model (variant or number of classes)."""


def create_checkpoint_manager(workdir: str, *, keep: int = 3, keep_best: int = 1,
                              async_save: bool = True, best_metric: str = 'eval/top1'):
  """Manager keeping the latest `keep` checkpoints plus the best `keep_best` by `best_metric`."""
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
      epath.Path(abspath(workdir)) / CHECKPOINTS_DIR, options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'meta': ocp.JsonCheckpointHandler()})


def save_train_state(manager, step: int, state, *, meta: dict,
                     metrics: dict | None = None) -> bool:
  """Starts an (async) save of `state` at `step`; True if it saved."""
  import orbax.checkpoint as ocp
  items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
  return manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


# Config key that sets each structural key (for the refusal's "fix" hint).
CONFIG_KEYS = {'variant': 'model.name', 'num_classes': 'dataset.num_classes',
               'scan_order': 'model.scan_order', 'img_size': 'image_size',
               'ema': 'ema_decay', 'optimizer': 'optimizer', 'grad_clip': 'grad_clip_norm'}


class CheckpointUnreadableError(RuntimeError):
  """The workdir holds checkpoints but none of them reads back."""


def train_meta(*, variant: str, model_kwargs: dict, state_layout: dict) -> dict:
  """What a train checkpoint records about its structure (JSON): the variant, every structural
  model kwarg and the train-state layout (EMA, optimizer, model_state, ...)."""
  return {'variant': variant, 'model_kwargs': dict(model_kwargs),
          'state_layout': dict(state_layout)}


def _mismatch(path, key, trained, configured):
  hint = CONFIG_KEYS.get(key)
  fix = f'set --config.{hint} back' if hint else 'set the config back'
  return CheckpointMismatchError(
      f'{path} was written with {key}={trained!r}, the config gives {key}={configured!r}; '
      f'use another --workdir or {fix} to resume it')


def check_train_meta(meta: dict, expected: dict, *, path: str):
  """Raises CheckpointMismatchError naming the first structural key that differs."""
  if meta.get('variant') != expected['variant']:
    raise _mismatch(path, 'variant', meta.get('variant'), expected['variant'])
  for group in ('model_kwargs', 'state_layout'):
    trained, configured = meta.get(group, {}), expected[group]
    for key in sorted(set(trained) | set(configured)):
      if trained.get(key) != configured.get(key):
        raise _mismatch(path, key, trained.get(key), configured.get(key))


def _leaf_signatures(tree) -> dict[str, tuple]:
  """{'a.b.0.c': (shape, dtype)}; tuples, lists, dicts and dataclass fields alike."""
  from jax import tree_util
  def name(k):
    for attr in ('key', 'idx', 'name'):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return {'.'.join(name(k) for k in path): (tuple(getattr(x, 'shape', ())),
                                              str(getattr(x, 'dtype', '')))
          for path, x in tree_util.tree_flatten_with_path(tree)[0]}


def check_state_tree(stored, abstract_state, *, path: str):
  """The stored train-state tree (Orbax metadata) must have the abstract state's paths, shapes
  and dtypes: the backstop for structural changes the recorded keys do not name."""
  want, have = _leaf_signatures(abstract_state), _leaf_signatures(getattr(stored, 'tree', stored))
  for key in sorted(set(want) | set(have)):
    if want.get(key) != have.get(key):
      raise CheckpointMismatchError(
          f'{path} holds a train state whose {key} is {have.get(key, "absent")} (shape, dtype); '
          f'the config gives {want.get(key, "absent")}; use another --workdir or set the config '
          f'back to the one in its config.json')


def restore_latest_train_state(manager, abstract_state, *, expected_meta: dict, log=print):
  """Restores the newest checkpoint that reads back, onto `abstract_state`'s shardings.

  Returns (step, state) or None when the workdir holds no checkpoint. A checkpoint whose
  structure differs from the config's (`expected_meta`, then the stored tree's shapes) raises
  CheckpointMismatchError before anything is written; only an unreadable checkpoint (missing,
  partial or corrupt files) is reported and the next older one tried; when none reads back,
  CheckpointUnreadableError (never a silent fresh start next to old checkpoints).
  """
  import orbax.checkpoint as ocp
  manager.reload()
  steps = sorted(manager.all_steps(), reverse=True)
  for step in steps:
    path = os.path.join(str(manager.directory), str(step))
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
      stored = manager.item_metadata(step)['state']
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back to an older one
      log(f'WARNING: checkpoint {path} is unreadable ({type(e).__name__}: {_first_line(e)}); '
          'trying an older one')
      continue
    check_train_meta(meta, expected_meta, path=path)
    if stored is not None:
      check_state_tree(stored, abstract_state, path=path)
    try:
      state = manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))['state']
    except Exception as e:  # noqa: BLE001 - the structure matched: the files are damaged
      log(f'WARNING: checkpoint {path} failed to restore ({type(e).__name__}: '
          f'{_first_line(e)}); trying an older one')
      continue
    return step, state
  if steps:
    raise CheckpointUnreadableError(
        f'none of the {len(steps)} checkpoints in {manager.directory} (steps '
        f'{", ".join(map(str, sorted(steps)))}) reads back; move them away to start afresh or '
        f'use another --workdir')
  return None


def _first_line(e: Exception) -> str:
  return str(e).splitlines()[0] if str(e) else ''

