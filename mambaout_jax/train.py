"""The one trainer: `train_and_evaluate(config, workdir)` for any task (`mambaout_jax.tasks`).

`setup` builds the mesh, the task's model, the optimizer and the jitted steps, and restores the
workdir's newest checkpoint (refusing one of another structure before anything is written) or
initialises (optionally from `config.init_from`); then `train`, `evaluate` or `export` runs, each
top to bottom. The step is functional: the model is `nnx.split` once into a graph definition, its
parameters, its BatchNorm statistics (`model_state`, part of the train state) and the rest (drop-path
RNG streams); one `jax.jit` with explicit in/out shardings and a donated train state merges them
inside. Every random draw derives from (config.seed, step) by `fold_in`, so a resumed run repeats
the uninterrupted one exactly, on any device layout.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from etils import epath
from flax import nnx, traverse_util
from jax.experimental import multihost_utils

from mambaout_jax import checkpoint as ckpt_lib
from mambaout_jax import optim
from mambaout_jax import params as params_lib
from mambaout_jax import sharding as shd
from mambaout_jax.jsonl_writer import JsonlWriter
from mambaout_jax.tasks import Task, constructor_keywords, get_task
from mambaout_jax.models.registry import get_model_fn

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143: "stopped, checkpoint saved; run again to resume"
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class Preempted(Exception):
  """Raised after the preemption checkpoint has been written."""


# ----------------------------------------------------------------------------------------------
# Helpers used by the sections below.

def model_kwargs(config, num_classes: int) -> dict:
  """The structural model kwargs of `config`'s task (recorded in checkpoints and exports)."""
  return get_task(config).model_kwargs(config, num_classes)


def runtime_kwargs(config) -> dict:
  """The constructor kwargs that change neither the parameter tree nor its meaning."""
  if config.model.dtype not in DTYPES:
    raise ValueError(f'unknown config.model.dtype {config.model.dtype!r}; choose one of '
                     f'{sorted(DTYPES)}')
  accepted = constructor_keywords(config.model.name)  # a UperNet's include its backbone's
  kwargs = dict(drop_path_rate=config.model.drop_path_rate, dtype=DTYPES[config.model.dtype])
  impl = config.model.get('dwconv_impl', 'auto')
  if impl != 'auto' and 'dwconv_impl' not in accepted:
    raise ValueError(f'config.model.dwconv_impl={impl!r} does not apply to {config.model.name} '
                     '(it has no depthwise convolution); set --config.model.dwconv_impl=auto')
  if impl != 'auto':
    kwargs['dwconv_impl'] = impl
  return kwargs


def state_layout(config, abstract_state=None) -> dict:
  """The train state's layout beyond the model: recorded in checkpoints, checked on resume."""
  layout = {'ema': config.ema_decay > 0, 'optimizer': config.optimizer,
            'grad_clip': config.grad_clip_norm > 0}
  if abstract_state is not None:
    layout['model_state'] = bool(jax.tree.leaves(abstract_state['model_state']))
  return layout


def build_model(config, num_classes: int, task: Task | None = None):
  """The model with the run's seed; drop path uses the 'dropout' stream (reseeded every step)."""
  task = task or get_task(config)
  return task.build_model(config, num_classes,
                          rngs=nnx.Rngs(params=config.seed, dropout=config.seed),
                          **runtime_kwargs(config))


def per_layer_key(path, key, shape):
  """nnx.reseed policy: every drop-path layer gets its own key, fold_in(step key, hash(path))."""
  del shape
  return jax.random.fold_in(key, zlib.crc32('/'.join(map(str, path)).encode()) & 0x7FFFFFFF)


def parameter_summary(params) -> str:
  """A table of parameter counts per module (stem, each stage, head) and the total."""
  rows = []
  for name, sub in params.items():
    if isinstance(sub, dict) and all(isinstance(k, int) for k in sub):  # stages
      rows += [(f'{name}.{i}', s) for i, s in sub.items()]
    else:
      rows.append((name, sub))
  counts = [(n, sum(x.size for x in jax.tree.leaves(s))) for n, s in rows]
  total = sum(c for _, c in counts)
  width = max(len(n) for n, _ in counts) + 2
  lines = [f'{n:<{width}}{c:>12,}' for n, c in counts] + [f'{"total":<{width}}{total:>12,}']
  return '\n'.join(lines)


def steps_for(config, num_train_examples: int) -> tuple[int, float]:
  """(total optimizer steps, steps per schedule epoch)."""
  steps_per_epoch = num_train_examples // config.batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'batch_size={config.batch_size} exceeds the {num_train_examples} training '
                     'examples; lower --config.batch_size')
  schedule_epochs = config.num_epochs + config.cooldown_epochs
  if config.total_steps > 0:  # the whole recipe (warm-up, cosine, cool-down) squeezed into it
    return config.total_steps, config.total_steps / schedule_epochs
  return int(math.ceil(schedule_epochs * steps_per_epoch)), float(steps_per_epoch)


def validate_config(config):
  get_model_fn(config.model.name)  # UnknownModelError before any data is read
  if config.batch_size % config.grad_accum_steps:
    raise ValueError(f'batch_size={config.batch_size} is not divisible by grad_accum_steps='
                     f'{config.grad_accum_steps}')
  for key in ('log_every_steps', 'checkpoint_every_steps'):
    if config[key] < 1:
      raise ValueError(f'config.{key} must be >= 1, got {config[key]}')


def create_writer(workdir: str):
  """TensorBoard + logging (clu) and DIR/metrics.jsonl; only process 0 writes files."""
  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main,
                                                asynchronous=False)
  if is_main:
    jsonl = JsonlWriter(os.path.join(workdir, 'metrics.jsonl'))
    writer = metric_writers.MultiWriter([writer, jsonl])
  return writer


def to_host(tree):
  """Global arrays (possibly sharded over several processes) -> numpy on every host."""
  return multihost_utils.process_allgather(tree, tiled=True)


# XLA:CPU spends most of a model initialiser's compile time optimising code that runs once.
CPU_RUN_ONCE_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0,
                                 'xla_llvm_disable_expensive_passes': True}


def run_once(jitted, *args):
  """Runs a jitted function that is called once (the initialiser), compiled cheaply on CPU.

  Initialising inside jit gives one program with sharded outputs instead of hundreds of eager ops.
  """
  lowered = jitted.lower(*args)
  options = CPU_RUN_ONCE_COMPILER_OPTIONS if jax.default_backend() == 'cpu' else None
  return lowered.compile(compiler_options=options)(*args)


@dataclasses.dataclass(frozen=True)
class StepFunctions:
  """What the loop (and `aot.py`) needs: the sharded initialisers and the two jitted steps."""
  task: Task
  graphdef: Any
  abstract_state: Any        # ShapeDtypeStructs carrying their target shardings
  abstract_rest: Any         # the model's RNG streams (drop path), replicated
  state_sharding: Any
  init: Any                  # () -> (train state, rest), sharded
  init_rest: Any             # () -> rest (a resumed run needs no parameter init)
  train_step: Any            # (state, batch, rest) -> (state, metrics); state donated
  eval_step: Any             # (params, model_state, rest, batch) -> the task's masked sums


def split_model(model):
  """(graphdef, params, model_state, rest) with pure-dict states: nnx.Param, nnx.BatchStat (the
  running statistics training updates besides the parameters) and the rest (RNG streams)."""
  graphdef, params, model_state, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(model_state), nnx.to_pure_dict(rest)


def create_step_functions(config, mesh, num_classes: int, schedule_steps_per_epoch: float,
                          task: Task | None = None) -> StepFunctions:
  """Model (split once), optimizer, train state layout and the jitted steps with their shardings."""
  task = task or get_task(config)
  tx, schedule = optim.create_optimizer(config, schedule_steps_per_epoch)
  make_model = functools.partial(build_model, config, num_classes, task)

  def init():
    _, params, model_state, rest = split_model(make_model())
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
             'model_state': model_state}
    if config.ema_decay > 0:
      state['ema_params'] = params
    return state, rest

  graphdef = split_model(nnx.eval_shape(make_model))[0]
  abstract_state, abstract_rest = jax.eval_shape(init)
  repl = shd.replicated(mesh)
  state_sharding = shd.state_shardings(mesh, abstract_state)
  with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  abstract_state = jax.tree.map(with_sharding, abstract_state, state_sharding)
  abstract_rest = jax.tree.map(lambda a: with_sharding(a, repl), abstract_rest)
  batch_sharding = shd.batch_sharding(mesh)
  step_fn = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                              config=config, num_classes=num_classes, mesh=mesh, task=task)
  return StepFunctions(
      task=task, graphdef=graphdef, abstract_state=abstract_state, abstract_rest=abstract_rest,
      state_sharding=state_sharding,
      init=functools.partial(run_once, jax.jit(init, out_shardings=(state_sharding, repl))),
      init_rest=functools.partial(run_once, jax.jit(lambda: init()[1], out_shardings=repl)),
      train_step=jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding, repl),
                         out_shardings=(state_sharding, repl), donate_argnums=(0,)),
      eval_step=jax.jit(functools.partial(eval_step, graphdef=graphdef, task=task),
                        in_shardings=(state_sharding['params'], state_sharding['model_state'],
                                      repl, batch_sharding),
                        out_shardings=repl))


# ----------------------------------------------------------------------------------------------
# The run: setup shared by the three modes, then train / evaluate / export, each top to bottom.

@dataclasses.dataclass
class Run:
  """What every mode shares once the workdir's checkpoint (if any) is restored."""
  config: Any
  workdir: str
  task: Task
  mesh: Any
  info: Any
  num_classes: int
  fns: StepFunctions
  manager: Any
  meta: dict
  state: Any
  rest: Any
  step: int
  writer: Any = None

  @property
  def process(self) -> dict:
    return dict(process_index=jax.process_index(), process_count=jax.process_count())

  def close(self):
    self.manager.close()
    if self.writer is not None:
      self.writer.close()


def train_and_evaluate(config, workdir: str, *, mode: str = 'train',
                       task: Task | None = None) -> dict[str, float]:
  """Trains (resuming from `workdir` when it holds a checkpoint) and evaluates; returns the last
  eval metrics. `mode='eval'` evaluates the latest checkpoint (or, in a fresh workdir, the
  parameters `config.init_from` gives), `mode='export'` writes its params."""
  if mode not in ('train', 'eval', 'export'):
    raise ValueError(f"unknown mode {mode!r}; choose 'train', 'eval' or 'export'")
  validate_config(config)
  run = setup(config, workdir, mode=mode, task=task)
  try:
    if mode == 'eval':
      return evaluate(run)
    if mode == 'export':
      export(run)
      return {}
    return train(run)
  finally:
    run.close()


def setup(config, workdir: str, *, mode: str, task: Task | None = None) -> Run:
  """Mesh, task, train state: restored from the workdir, else initialised (and `init_from`).

  A checkpoint of another structure stops the run here, before anything is written."""
  workdir = workdir if '://' in workdir else os.path.abspath(workdir)  # local or gs://
  logging.info('process %d/%d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())
  # ---------------------------------------------------------------------------- mesh, task
  mesh = shd.create_mesh(config.mesh)
  logging.info('mesh %s', dict(mesh.shape))
  task = task or get_task(config)
  info = task.dataset_info(config)
  num_classes = config.dataset.get('num_classes', 0) or info.num_classes
  # Only training needs the schedule (and a batch that fits in the training split).
  schedule_steps_per_epoch = (steps_for(config, info.num_train_examples)[1] if mode == 'train'
                              else 1.0)

  # ----------------------------------------------- model, optimizer, train state, steps
  fns = create_step_functions(config, mesh, num_classes, schedule_steps_per_epoch, task)
  logging.info('%s, %d classes, parameters:\n%s', config.model.name, num_classes,
               parameter_summary(fns.abstract_state['params']))

  # ------------------------------------------------------------------------ checkpoint
  manager = ckpt_lib.create_checkpoint_manager(
      workdir, keep=config.keep_checkpoints, keep_best=config.keep_best_checkpoints,
      async_save=config.async_checkpointing, best_metric=task.best_metric)
  meta = ckpt_lib.train_meta(variant=config.model.name,
                             model_kwargs=task.model_kwargs(config, num_classes),
                             state_layout=state_layout(config, fns.abstract_state))
  try:
    restored = ckpt_lib.restore_latest_train_state(manager, fns.abstract_state,
                                                   expected_meta=meta, log=logging.warning)
    if restored is None and mode != 'train' and not config.get('init_from', ''):
      raise FileNotFoundError(f'no checkpoint in {manager.directory}; train first with '
                              f'`python -m mambaout_jax.main --config=... --workdir={workdir}` '
                              'or evaluate pretrained weights with --config.init_from=...')
  except Exception:
    manager.close()
    raise
  if restored is not None:
    step, state = restored
    rest = fns.init_rest()
    logging.info('resumed from %s at step %d', manager.directory, step)
  else:
    state, rest = fns.init()
    if config.get('init_from', ''):  # an existing checkpoint always wins (exact resume)
      state = apply_init_from(config, task, state, fns.state_sharding)
  step = int(jax.device_get(state['step']))

  # -------------------------------------------- from here on the workdir is written
  if jax.process_index() == 0:
    (epath.Path(workdir) / 'config.json').write_text(config.to_json_best_effort(indent=2))
  return Run(config=config, workdir=workdir, task=task, mesh=mesh, info=info,
             num_classes=num_classes, fns=fns, manager=manager, meta=meta, state=state,
             rest=rest, step=step, writer=create_writer(workdir))


def apply_init_from(config, task: Task, state, state_sharding):
  """The task's `init_params_from` on the fresh params; EMA starts from the same values."""
  params = task.init_params_from(config, jax.tree.map(np.asarray, to_host(state['params'])))
  params = jax.device_put(jax.tree.map(lambda x, a: np.asarray(x, a.dtype), params,
                                       state['params']), state_sharding['params'])
  logging.info('initialised the parameters from %s', config.init_from)
  state = {**state, 'params': params}
  if 'ema_params' in state:
    state['ema_params'] = jax.device_put(params, state_sharding['ema_params'])
  return state


# ---------------------------------------------------------------------------------- eval

def evaluate(run: Run) -> dict[str, float]:
  """One exact pass over the eval split for the params (and the EMA params); logs eval/*."""
  t0 = time.time()
  state = run.state
  trees = {'eval': state['params']}
  if 'ema_params' in state:
    trees['eval_ema'] = state['ema_params']
  sums = {name: None for name in trees}
  for batch in run.task.create_eval_iterator(run.config, **run.process):
    batch = shd.host_local_to_global(batch, run.mesh)
    for name, tree in trees.items():
      out = run.fns.eval_step(tree, state['model_state'], run.rest, batch)
      sums[name] = out if sums[name] is None else jax.tree.map(jnp.add, sums[name], out)
  results = {}
  for name in trees:
    totals = jax.tree.map(np.asarray, jax.device_get(sums[name]))
    results.update({f'{name}/{k}': v for k, v in run.task.eval_metrics(totals).items()})
    if name == 'eval' and jax.process_index() == 0:
      run.task.write_eval_report(totals, workdir=run.workdir, step=run.step)
  run.writer.write_scalars(run.step, results)
  run.writer.flush()
  logging.info('eval at step %d (%.1fs): %s', run.step, time.time() - t0,
               ', '.join(f'{k}={v:.4f}' for k, v in results.items()))
  return results


# -------------------------------------------------------------------------------- export

def export(run: Run) -> str:
  """The params and BatchNorm statistics as a params checkpoint (with every structural kwarg) in
  DIR/export: what `load_pretrained`, `predict` and `segment` read."""
  path = os.path.join(run.workdir, 'export')
  # The parameters and the BatchNorm statistics (model_state) in one flat namespace.
  flat = {**traverse_util.flatten_dict(to_host(run.state['params'])),
          **traverse_util.flatten_dict(to_host(run.state['model_state']))}
  params_lib.save_params(path, flat,
                         variant=run.config.model.name, model_kwargs=run.meta['model_kwargs'],
                         extra_meta={'step': run.step})
  logging.info('exported params of step %d to %s (load with mo.load_pretrained(%r, %r))',
               run.step, path, run.config.model.name, path)
  return path


# --------------------------------------------------------------------------------- train

def train(run: Run) -> dict[str, float]:
  """The loop: steps, logging, eval, checkpoints, preemption; then eval and export at the end."""
  config, manager = run.config, run.manager
  total_steps, schedule_steps_per_epoch = steps_for(config, run.info.num_train_examples)
  eval_every = config.eval_every_steps or max(1, run.info.num_train_examples // config.batch_size)
  # The stream's position is a function of the global step: created after the restore.
  train_iter = run.task.create_train_iterator(config, **run.process, start_step=run.step)

  preempted = []
  if jax.process_count() == 1:  # multi-host runs use JAX's preemption sync point instead
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))

  def check_finite(step_metrics, at_step):
    loss = float(step_metrics['train/loss'])
    if not math.isfinite(loss):
      last = manager.latest_step()
      last = (f'The last good checkpoint is step {last} in {manager.directory}' if last is not None
              else f'No checkpoint was saved yet in {manager.directory}')
      raise FloatingPointError(
          f'train/loss is {loss} at step {at_step}; stopped without saving. {last}. Lower '
          f'--config.lr (now {config.lr}) or set --config.grad_clip_norm=1.0, and rerun '
          '(it resumes from the last good checkpoint, if any).')
    return loss

  def save(at_step, metrics=None):
    if manager.latest_step() == at_step:
      return
    ckpt_lib.save_train_state(manager, at_step, run.state, meta=run.meta, metrics=metrics)

  results: dict[str, float] = {}
  first_step, t_last, step_last = run.step, time.time(), run.step
  step_metrics = train_step = None
  logging.info('training %s for %d steps from step %d (%.2f steps per epoch of the schedule)',
               config.model.name, total_steps, run.step, schedule_steps_per_epoch)
  try:
    while run.step < total_steps:
      if preempted or (jax.process_count() > 1 and
                       multihost_utils.reached_preemption_sync_point(run.step)):
        if step_metrics is not None:
          check_finite(step_metrics, run.step)
        save(run.step)
        manager.wait_until_finished()
        logging.warning('preempted: saved checkpoint of step %d; run again to resume', run.step)
        raise Preempted(run.step)
      batch = shd.host_local_to_global(next(train_iter), run.mesh)
      if train_step is None:
        train_step = compile_then_sync(run.fns.train_step, run.state, batch, run.rest)
      run.state, step_metrics = train_step(run.state, batch, run.rest)
      run.step += 1
      step = run.step

      if step % config.log_every_steps == 0 or step == total_steps:
        scalars = jax.device_get(step_metrics)
        check_finite(scalars, step)
        now = time.time()
        steps_per_s = (step - step_last) / max(now - t_last, 1e-9)
        scalars = {k: float(v) for k, v in scalars.items()}
        scalars.update({'train/steps_per_sec': steps_per_s,
                        'train/images_per_sec': steps_per_s * config.batch_size,
                        # passes over the training split (the input stream's epochs), not the
                        # schedule's: a 160k-step ADE20K run is ~123 epochs of 20k images
                        'train/epoch': step * config.batch_size / run.info.num_train_examples})
        run.writer.write_scalars(step, scalars)
        run.writer.flush()
        eta = (total_steps - step) / max(steps_per_s, 1e-9)
        logging.info('step %d/%d: loss %.4f, lr %.3g, %.2f steps/s, %.0f img/s, ETA %s',
                     step, total_steps, scalars['train/loss'], scalars['train/lr'], steps_per_s,
                     scalars['train/images_per_sec'], time.strftime('%H:%M:%S', time.gmtime(eta)))
        t_last, step_last = time.time(), step

      is_eval = step % eval_every == 0 or step == total_steps
      if is_eval:
        results = evaluate(run)
      if is_eval or step % config.checkpoint_every_steps == 0:
        check_finite(jax.device_get(step_metrics), step)
        best = run.task.best_metric
        save(step, metrics={best: results[best]} if is_eval else None)
    if run.step == first_step:  # nothing left to train: report the restored model
      results = evaluate(run)
    manager.wait_until_finished()
    export(run)
  finally:
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, previous_handler)
  return results


def compile_then_sync(jitted, *args):
  """Compiles `jitted` for `args`; with several processes, waits until every process has compiled
  it, so that the first step's collectives do not time out while a slower host is still compiling
  (gloo, the CPU collectives, gives up after 30 s)."""
  compiled = jitted.lower(*args).compile()
  if jax.process_count() > 1:
    from jax._src import distributed  # the coordination service jax.distributed started
    distributed.global_state.client.wait_at_barrier('mambaout_train_step_compiled',
                                                    timeout_in_ms=60 * 60 * 1000)
  return compiled


# ----------------------------------------------------------------------------------------------
# The jitted steps (module level so `aot.py` compiles exactly the same functions).

def train_step(state, batch, rest, *, graphdef, tx, schedule, config, num_classes, mesh, task):
  """One optimizer step on a global batch, in `config.grad_accum_steps` micro-batches."""
  step = state['step']
  step_key = jax.random.fold_in(jax.random.key(config.seed), step)
  accum = config.grad_accum_steps

  def loss_fn(params, model_state, micro_batch, key):
    task_key, drop_key = jax.random.split(key)
    model = nnx.merge(graphdef, params, model_state, rest)
    model.train()
    nnx.reseed(model, dropout=drop_key, policy=per_layer_key)
    loss, aux = task.train_loss(model, micro_batch, task_key, config=config,
                                num_classes=num_classes)
    return loss, (aux, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum == 1:
    (loss, (aux, model_state)), grads = grad_fn(state['params'], state['model_state'], batch,
                                                step_key)
  else:
    # Micro-batch j takes rows j, j + accum, j + 2 accum, ...: every device holds a slice of each.
    def split(x):
      x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(
          x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, shd.BATCH_AXES)))
    micro = jax.tree.map(split, batch)

    def add_micro(carry, xs):
      (loss_sum, aux_sum, grads_sum), model_state = carry
      j, mb = xs
      (loss, (aux, model_state)), grads = grad_fn(state['params'], model_state, mb,
                                                  jax.random.fold_in(step_key, j))
      return (jax.tree.map(jnp.add, (loss_sum, aux_sum, grads_sum), (loss, aux, grads)),
              model_state), None

    aux_shape = jax.eval_shape(lambda: grad_fn(state['params'], state['model_state'],
                                               jax.tree.map(lambda x: x[0], micro),
                                               step_key)[0][1][0])
    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, aux_shape),
             jax.tree.map(jnp.zeros_like, state['params']))
    ((loss, aux, grads), model_state), _ = jax.lax.scan(
        add_micro, (zeros, state['model_state']), (jnp.arange(accum), micro))
    loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))

  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  new_state = {'step': step + 1, 'params': params, 'opt_state': opt_state,
               'model_state': model_state}
  if 'ema_params' in state:
    d = config.ema_decay
    new_state['ema_params'] = jax.tree.map(lambda e, p: d * e + (1 - d) * p,
                                           state['ema_params'], params)
  metrics = {'train/loss': loss, 'train/lr': schedule(step),
             'train/grad_norm': optax.global_norm(grads),
             'train/param_norm': optax.global_norm(params),
             **{f'train/{k}': v for k, v in aux.items()}}
  return new_state, metrics


def eval_step(params, model_state, rest, batch, *, graphdef, task):
  model = nnx.merge(graphdef, params, model_state, rest)
  model.eval()
  return task.eval_sums(model, batch)
