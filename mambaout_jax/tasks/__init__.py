"""Tasks: what the one trainer (`mambaout_jax.train`) needs to know about a problem.

A task supplies its dataset sizes, the structural model kwargs, the data iterators, the loss, the
masked eval sums and the metrics made from them; the trainer keeps the mesh, sharding, train state,
checkpoints, preemption, exact resume, metrics logging and export in one place. `get_task(config)`
picks the task named by `config.task`.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

TASKS = {'classification': 'mambaout_jax.tasks.classification:ClassificationTask',
         'segmentation': 'mambaout_jax.tasks.segmentation:SegmentationTask'}


@functools.lru_cache(maxsize=None)
def constructor_keywords(name: str) -> dict[str, Any]:
  """{keyword: default} of every keyword that model `name`'s constructor accepts: its builder's
  own keywords and, when the builder forwards `**overrides`, those of the model class it builds
  and those of the registered model it hands the rest to (a builder's `forwards_to`: UperNet's
  backbone, so `dwconv_impl` or `scan_order` reach it). Tasks decide which kwargs apply from this,
  not from the variant's name."""
  from flax import nnx
  from mambaout_jax.models.registry import get_model_fn
  fn = get_model_fn(name)
  params = dict(inspect.signature(fn).parameters)
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    model = nnx.eval_shape(lambda: fn(rngs=nnx.Rngs(0)))
    params = {**inspect.signature(type(model).__init__).parameters, **params}
  own = {k: p.default for k, p in params.items()
         if k not in ('self', 'rngs') and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
  forwarded = getattr(fn, 'forwards_to', None)
  return {**constructor_keywords(forwarded), **own} if forwarded else own


def scan_order_kwargs(config, accepted: dict[str, Any]) -> dict[str, str]:
  """{'scan_order': ...} when the model has Mamba blocks (`accepted` = its constructor_keywords):
  config.model.scan_order, or the variant's default when unset; a structural kwarg (the SSM's
  direction parameters follow it). A set scan_order on a model without an SSM is an error."""
  if 'scan_order' in accepted:
    return {'scan_order': config.model.get('scan_order') or accepted['scan_order']}
  if config.model.get('scan_order'):
    raise ValueError(f'config.model.scan_order={config.model.scan_order!r} does not apply to '
                     f'{config.model.name} (it has no SSM); set --config.model.scan_order=""')
  return {}


class Task:
  """The interface the trainer calls (see each method); subclasses implement the abstract ones."""
  name: str = ''
  best_metric: str = ''          # metric the best-N checkpoints are kept by, e.g. 'eval/top1'

  def __init__(self, config=None):
    self.config = config         # the run's config (tasks whose jitted eval needs it keep it)

  def dataset_info(self, config):
    """-> object with .num_classes, .num_train_examples, .num_eval_examples."""
    raise NotImplementedError

  def model_kwargs(self, config, num_classes: int) -> dict:
    """Every constructor kwarg that changes the parameter tree or its meaning (JSON values);
    recorded in checkpoints and exports, `load_pretrained` rebuilds the model from them."""
    raise NotImplementedError

  def build_model(self, config, num_classes: int, *, rngs, **runtime_kwargs):
    """The model: `config.model.name` with the structural and the runtime kwargs (dtype, ...)."""
    from mambaout_jax.models.registry import create_model
    return create_model(config.model.name, rngs=rngs, **self.model_kwargs(config, num_classes),
                        **runtime_kwargs)

  def abstract_train_batch(self, config, batch_size: int) -> dict:
    """{key: jax.ShapeDtypeStruct} of one global train batch as `create_train_iterator` yields it
    (shapes and dtypes only: `mambaout_jax.aot` compiles the train step from it, reading no data)."""
    raise NotImplementedError

  def create_train_iterator(self, config, *, process_index: int, process_count: int,
                            start_step: int = 0):
    """Infinite iterator of host-local numpy batches, positioned by (config.seed, start_step)."""
    raise NotImplementedError

  def create_eval_iterator(self, config, *, process_index: int, process_count: int):
    """One exact pass over the eval split; every batch has 'mask' (False on padding rows)."""
    raise NotImplementedError

  def train_loss(self, model, batch, key, *, config, num_classes: int):
    """Inside jit, model in train mode: -> (mean loss, {name: scalar} logged as train/<name>)."""
    raise NotImplementedError

  def eval_sums(self, model, batch) -> dict:
    """Inside jit, model in eval mode: masked SUMS only, added over batches by the trainer."""
    raise NotImplementedError

  def eval_metrics(self, sums: dict) -> dict[str, float]:
    """Host side, on the totals: metrics without the 'eval/' prefix."""
    raise NotImplementedError

  def write_eval_report(self, sums: dict, *, workdir: str, step: int) -> None:
    """Optional extra files beside metrics.jsonl."""

  def init_params_from(self, config, params: dict) -> dict:
    """Applies config.init_from to freshly initialised params (nested pure dict of numpy)."""
    raise NotImplementedError(f'the {self.name} task cannot start from config.init_from')


def get_task(config) -> Task:
  """The task named by `config.task` ('classification' when the config has no such key)."""
  import importlib
  name = config.get('task', 'classification')
  if name not in TASKS:
    raise ValueError(f'unknown config.task {name!r}; choose one of {", ".join(sorted(TASKS))}')
  module, cls = TASKS[name].split(':')
  try:
    return getattr(importlib.import_module(module), cls)(config)
  except ModuleNotFoundError as e:
    if e.name != module:
      raise
    raise ValueError(f'config.task={name!r} is not available in this checkout ({module} is '
                     'missing)') from None
