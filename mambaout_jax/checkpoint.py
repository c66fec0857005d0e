"""Training checkpoints (the trainer's part): an Orbax CheckpointManager over
DIR/checkpoints/<step>/{state, data, meta}.

`state` is the train state pytree (step, params, opt_state[, ema_params]) restored straight onto
the current mesh's shardings, so a run resumes on any device count; `data` is the Grain iterator
state of every process (one JSON file each); `meta` names the variant and model kwargs so a
checkpoint of another model is refused with a clear message. Params-only checkpoints (convert
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
      epath.Path(abspath(workdir)) / CHECKPOINTS_DIR, options=options,
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
