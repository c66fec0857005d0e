"""Training and evaluation: `train_and_evaluate(config, workdir)`, read top to bottom.

Sections: setup, mesh, data, model, optimizer, train state, steps, checkpoint, loop. The step is
functional: the model is `nnx.split` once into a graph definition, its parameters (a pure dict) and
the rest of its state (drop-path RNG streams); one `jax.jit` with explicit in/out shardings and a
donated train state merges them inside. Every random draw derives from (config.seed, step) by
`fold_in`, so a resumed run repeats the uninterrupted one exactly, on any device layout.
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
from mambaout_jax import data as data_lib
from mambaout_jax import optim
from mambaout_jax import params as params_lib
from mambaout_jax import sharding as shd
from mambaout_jax.jsonl_writer import JsonlWriter
from mambaout_jax.models.registry import create_model

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143: "stopped, checkpoint saved; run again to resume"
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class Preempted(Exception):
  """Raised after the preemption checkpoint has been written."""


# ----------------------------------------------------------------------------------------------
# Helpers used by the sections below.

def model_kwargs(config, num_classes: int) -> dict:
  if config.model.dtype not in DTYPES:
    raise ValueError(f'unknown config.model.dtype {config.model.dtype!r}; choose one of '
                     f'{sorted(DTYPES)}')
  kwargs = dict(num_classes=num_classes, drop_path_rate=config.model.drop_path_rate,
                dtype=DTYPES[config.model.dtype])
  if config.model.name.startswith('mamba') and config.model.get('dwconv_impl', 'auto') != 'auto':
    kwargs['dwconv_impl'] = config.model.dwconv_impl
  if config.model.name.startswith('mamba_') and config.model.get('scan_order'):
    kwargs['scan_order'] = config.model.scan_order
  if config.model.name.startswith('vit_'):  # the position embedding is sized for the images
    kwargs['img_size'] = config.image_size
  return kwargs


def build_model(config, num_classes: int):
  """The model with the run's seed; drop path uses the 'dropout' stream (reseeded every step)."""
  return create_model(config.model.name, rngs=nnx.Rngs(params=config.seed, dropout=config.seed),
                      **model_kwargs(config, num_classes))


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
  if config.batch_size % config.grad_accum_steps:
    raise ValueError(f'batch_size={config.batch_size} is not divisible by grad_accum_steps='
                     f'{config.grad_accum_steps}')
  for key in ('log_every_steps', 'checkpoint_every_steps'):
    if config[key] < 1:
      raise ValueError(f'config.{key} must be >= 1, got {config[key]}')


def masked_eval_sums(logits, labels, mask):
  """Sums over valid rows of loss, top-1 and top-5 hits (so any host layout gives exact totals)."""
  mask = mask.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  k = min(5, logits.shape[-1])
  top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1).astype(jnp.float32)
  return {'loss': jnp.sum(loss * mask), 'top1': jnp.sum(top1 * mask),
          'top5': jnp.sum(top5 * mask), 'count': jnp.sum(mask)}


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
  """What the loop (and `aot.py`) needs: the sharded initialiser and the two jitted steps."""
  graphdef: Any
  abstract_state: Any        # ShapeDtypeStructs carrying their target shardings
  abstract_rest: Any
  state_sharding: Any
  init: Any                  # () -> (train state, rest of the model state), sharded
  train_step: Any            # (state, batch, rest) -> (state, metrics); state donated
  eval_step: Any             # (params, rest, batch) -> masked sums


def create_step_functions(config, mesh, num_classes: int, schedule_steps_per_epoch: float,
                          ) -> StepFunctions:
  """Model (split once), optimizer, train state layout and the jitted steps with their shardings."""
  tx, schedule = optim.create_optimizer(config, schedule_steps_per_epoch)

  def init_model():
    _, params, rest = nnx.split(build_model(config, num_classes), nnx.Param, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

  def init_state(params):
    state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}
    if config.ema_decay > 0:
      state['ema_params'] = params
    return state

  def init():
    params, rest = init_model()
    return init_state(params), rest

  graphdef = nnx.split(nnx.eval_shape(lambda: build_model(config, num_classes)), nnx.Param, ...)[0]
  abstract_state, abstract_rest = jax.eval_shape(init)
  repl = shd.replicated(mesh)
  state_sharding = shd.state_shardings(mesh, abstract_state)
  with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  abstract_state = jax.tree.map(with_sharding, abstract_state, state_sharding)
  abstract_rest = jax.tree.map(lambda a: with_sharding(a, repl), abstract_rest)
  batch_sharding = shd.batch_sharding(mesh)
  step_fn = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                              config=config, num_classes=num_classes, mesh=mesh)
  return StepFunctions(
      graphdef=graphdef, abstract_state=abstract_state, abstract_rest=abstract_rest,
      state_sharding=state_sharding,
      init=functools.partial(run_once, jax.jit(init, out_shardings=(state_sharding, repl))),
      train_step=jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding, repl),
                         out_shardings=(state_sharding, repl), donate_argnums=(0,)),
      eval_step=jax.jit(functools.partial(eval_step, graphdef=graphdef),
                        in_shardings=(state_sharding['params'], repl, batch_sharding),
                        out_shardings=repl))


# ----------------------------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str, *, mode: str = 'train') -> dict[str, float]:
  """Trains (resuming from `workdir` when it holds a checkpoint) and evaluates; returns the last
  eval metrics. `mode='eval'` evaluates the latest checkpoint, `mode='export'` writes its params."""
  if mode not in ('train', 'eval', 'export'):
    raise ValueError(f"unknown mode {mode!r}; choose 'train', 'eval' or 'export'")
  validate_config(config)
  workdir = workdir if '://' in workdir else os.path.abspath(workdir)  # local or gs://
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    (epath.Path(workdir) / 'config.json').write_text(config.to_json_best_effort(indent=2))
  writer = create_writer(workdir)
  logging.info('process %d/%d, %d local / %d global devices (%s)', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.default_backend())

  # ---------------------------------------------------------------------------------- mesh
  mesh = shd.create_mesh(config.mesh)
  logging.info('mesh %s', dict(mesh.shape))

  # ---------------------------------------------------------------------------------- data
  info = data_lib.get_dataset_info(config)
  num_classes = config.dataset.num_classes or info.num_classes
  total_steps, schedule_steps_per_epoch = steps_for(config, info.num_train_examples)
  eval_every = config.eval_every_steps or max(1, info.num_train_examples // config.batch_size)
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  train_iter = data_lib.create_train_iterator(config, **process) if mode == 'train' else None

  # ------------------------------------------------- model, optimizer, train state, steps
  fns = create_step_functions(config, mesh, num_classes, schedule_steps_per_epoch)
  logging.info('%s, %d classes, parameters:\n%s', config.model.name, num_classes,
               parameter_summary(fns.abstract_state['params']))
  state, rest = fns.init()
  jit_train_step, jit_eval_step = fns.train_step, fns.eval_step
  variant_kwargs = {'num_classes': num_classes}

  def evaluate(step: int) -> dict[str, float]:
    t0 = time.time()
    results = {}
    trees = {'eval': state['params']}
    if 'ema_params' in state:
      trees['eval_ema'] = state['ema_params']
    sums = {name: None for name in trees}
    for batch in data_lib.create_eval_iterator(config, **process):
      batch = shd.host_local_to_global(batch, mesh)
      for name, tree in trees.items():
        out = jit_eval_step(tree, rest, batch)
        sums[name] = out if sums[name] is None else jax.tree.map(jnp.add, sums[name], out)
    for name in trees:
      s = jax.device_get(sums[name])
      n = float(s['count'])
      results.update({f'{name}/loss': float(s['loss']) / n, f'{name}/top1': float(s['top1']) / n,
                      f'{name}/top5': float(s['top5']) / n, f'{name}/num_examples': int(n)})
    writer.write_scalars(step, results)
    writer.flush()
    logging.info('eval at step %d (%.1fs): %s', step, time.time() - t0,
                 ', '.join(f'{k}={v:.4f}' for k, v in results.items()))
    return results

  # ----------------------------------------------------------------------------- checkpoint
  manager = ckpt_lib.create_checkpoint_manager(
      workdir, keep=config.keep_checkpoints, keep_best=config.keep_best_checkpoints,
      async_save=config.async_checkpointing)
  meta = {'variant': config.model.name, 'model_kwargs': variant_kwargs}
  restored = ckpt_lib.restore_latest_train_state(
      manager, fns.abstract_state,
      data_iterator=train_iter, variant=config.model.name, model_kwargs=variant_kwargs,
      log=logging.warning)
  if restored is not None:
    step, state, _ = restored
    logging.info('resumed from %s at step %d', manager.directory, step)
  elif mode != 'train':
    raise FileNotFoundError(f'no checkpoint in {manager.directory}; train first with '
                            f'`python -m mambaout_jax.main --config=... --workdir={workdir}`')
  step = int(jax.device_get(state['step']))

  def export_params():
    path = os.path.join(workdir, 'export')
    params_host = to_host(state['params'])
    params_lib.save_params(path, traverse_util.flatten_dict(params_host), variant=config.model.name,
                         model_kwargs=variant_kwargs, extra_meta={'step': step})
    logging.info('exported params of step %d to %s (load with mo.load_pretrained(%r, %r))',
                 step, path, config.model.name, path)
    return path

  if mode == 'eval':
    results = evaluate(step)
    manager.close()
    writer.close()
    return results
  if mode == 'export':
    export_params()
    manager.close()
    writer.close()
    return {}

  # ---------------------------------------------------------------------------------- loop
  preempted = []
  if jax.process_count() == 1:  # multi-host runs use JAX's preemption sync point instead
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))

  def check_finite(step_metrics, at_step):
    loss = float(step_metrics['train/loss'])
    if not math.isfinite(loss):
      last = manager.latest_step()
      raise FloatingPointError(
          f'train/loss is {loss} at step {at_step}; stopped without saving. The last good '
          f'checkpoint is step {last} in {manager.directory}. Lower --config.lr (now '
          f'{config.lr}) or set --config.grad_clip_norm=1.0, and rerun to resume from it.')
    return loss

  def save(at_step, metrics=None):
    if manager.latest_step() == at_step:
      return
    ckpt_lib.save_train_state(manager, at_step, state, data_iterator=train_iter, meta=meta,
                              metrics=metrics)

  results: dict[str, float] = {}
  first_step, t_last, step_last = step, time.time(), step
  step_metrics = None
  logging.info('training %s for %d steps from step %d (%.2f steps per epoch of the schedule)',
               config.model.name, total_steps, step, schedule_steps_per_epoch)
  try:
    while step < total_steps:
      if preempted or (jax.process_count() > 1 and
                       multihost_utils.reached_preemption_sync_point(step)):
        if step_metrics is not None:
          check_finite(step_metrics, step)
        save(step)
        manager.wait_until_finished()
        logging.warning('preempted: saved checkpoint of step %d; run again to resume', step)
        raise Preempted(step)
      batch = shd.host_local_to_global(next(train_iter), mesh)
      state, step_metrics = jit_train_step(state, batch, rest)
      step += 1

      if step % config.log_every_steps == 0 or step == total_steps:
        scalars = jax.device_get(step_metrics)
        check_finite(scalars, step)
        now = time.time()
        steps_per_s = (step - step_last) / max(now - t_last, 1e-9)
        scalars = {k: float(v) for k, v in scalars.items()}
        scalars.update({'train/steps_per_sec': steps_per_s,
                        'train/images_per_sec': steps_per_s * config.batch_size,
                        'train/epoch': step / schedule_steps_per_epoch})
        writer.write_scalars(step, scalars)
        writer.flush()
        eta = (total_steps - step) / max(steps_per_s, 1e-9)
        logging.info('step %d/%d: loss %.4f, lr %.3g, %.2f steps/s, %.0f img/s, ETA %s',
                     step, total_steps, scalars['train/loss'], scalars['train/lr'], steps_per_s,
                     scalars['train/images_per_sec'], time.strftime('%H:%M:%S', time.gmtime(eta)))
        t_last, step_last = time.time(), step

      is_eval = step % eval_every == 0 or step == total_steps
      if is_eval:
        results = evaluate(step)
      if is_eval or step % config.checkpoint_every_steps == 0:
        check_finite(jax.device_get(step_metrics), step)
        save(step, metrics={'eval/top1': results['eval/top1']} if is_eval else None)
    if step == first_step:  # nothing left to train: report the restored model
      results = evaluate(step)
    manager.wait_until_finished()
    export_params()
  finally:
    manager.close()
    writer.close()
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, previous_handler)
  return results


# ----------------------------------------------------------------------------------------------
# The jitted steps (module level so `aot.py` compiles exactly the same functions).

def train_step(state, batch, rest, *, graphdef, tx, schedule, config, num_classes, mesh):
  """One optimizer step on a global batch, in `config.grad_accum_steps` micro-batches."""
  step = state['step']
  step_key = jax.random.fold_in(jax.random.key(config.seed), step)
  aug = config.aug
  accum = config.grad_accum_steps

  def loss_fn(params, images, labels, key):
    mix_key, drop_key = jax.random.split(key)
    images, targets = data_lib.mixup_cutmix(
        mix_key, images, labels, num_classes=num_classes, mixup_alpha=aug.mixup,
        cutmix_alpha=aug.cutmix, switch_prob=aug.mixup_switch_prob, prob=aug.mixup_prob,
        label_smoothing=aug.label_smoothing)
    model = nnx.merge(graphdef, params, rest)
    model.train()
    nnx.reseed(model, dropout=drop_key, policy=per_layer_key)
    logits = model(images)
    return optax.softmax_cross_entropy(logits, targets).mean()

  grad_fn = jax.value_and_grad(loss_fn)
  if accum == 1:
    loss, grads = grad_fn(state['params'], batch['image'], batch['label'], step_key)
  else:
    # Micro-batch j takes rows j, j + accum, j + 2 accum, ...: every device holds a slice of each.
    def split(x):
      x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(
          x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, shd.BATCH_AXES)))
    micro = jax.tree.map(split, batch)

    def add_micro(carry, xs):
      j, mb = xs
      loss, grads = grad_fn(state['params'], mb['image'], mb['label'],
                            jax.random.fold_in(step_key, j))
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state['params']))
    (loss, grads), _ = jax.lax.scan(add_micro, zeros, (jnp.arange(accum), micro))
    loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))

  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  new_state = {'step': step + 1, 'params': params, 'opt_state': opt_state}
  if 'ema_params' in state:
    d = config.ema_decay
    new_state['ema_params'] = jax.tree.map(lambda e, p: d * e + (1 - d) * p,
                                           state['ema_params'], params)
  metrics = {'train/loss': loss, 'train/lr': schedule(step),
             'train/grad_norm': optax.global_norm(grads),
             'train/param_norm': optax.global_norm(params)}
  return new_state, metrics


def eval_step(params, rest, batch, *, graphdef):
  model = nnx.merge(graphdef, params, rest)
  model.eval()
  return masked_eval_sums(model(batch['image']), batch['label'], batch['mask'])
