"""Grain pipelines: an infinite training stream addressed by step and an exact-once eval pass.

Training: one global stream of source indices, shuffled with a new permutation each epoch
(`grain.MapDataset.shuffle` + `repeat`). Global batch `s` is stream positions [s*B, (s+1)*B); host
`p` of `P` takes rows [p*B/P, (p+1)*B/P) of it, the rows its devices hold in the global array. So
the batch of a step is a pure function of (seed, step): `create_train_iterator(...,
start_step=s)` resumes exactly at step s on any number of processes, and the P host batches of a
step concatenate to the 1-process batch. Each example's augmentation draws from a generator seeded
with (seed, epoch, source index), so it depends neither on workers, hosts nor restarts. An
undecodable training image is replaced, not skipped (skipping would shift every later batch): by
the next decodable source index in index order, augmented with the original example's generator;
each replacement is logged with the file and counted. Decoding and augmentation run in
`input.num_workers` processes (0: in this process) with `input.num_threads` threads each; batches
of `B/P` are formed in this process, so the stream is the same for any number of workers. Close the
iterator (`close()`) when done to stop its worker processes.

Eval (per host): host `p` takes examples p, p + P, p + 2P, ... and pads them to the same number of
batches on every host; padding rows and undecodable images have `mask` False, and undecodable
images have `undecodable` True (logged with their file), so that eval/num_examples +
eval/num_undecodable is the size of the split.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any

from absl import flags
from absl import logging
import grain
import numpy as np

from mambaout_jax.data import sources
from mambaout_jax.data import transforms as T

# Consecutive undecodable source indices after which the training split is declared unusable.
MAX_CONSECUTIVE_UNDECODABLE = 1000


def _open_source(config, split_key: str, default_split: str):
  ds = config.dataset
  split, data_dir = ds.get(split_key, default_split), ds.get('data_dir', '') or None
  return sources.open_source(ds.name, split, data_dir, class_split=ds.get('train_split', 'train'))


def _read_options(config, local_batch: int) -> grain.ReadOptions:
  """Threads decoding ahead in each process: `prefetch` batches, split over the worker processes."""
  inp = config.get('input', {})
  num_processes = max(1, inp.get('num_workers', 0))
  num_threads = inp.get('num_threads', 4)
  buffer = max(num_threads, inp.get('prefetch', 2) * local_batch // num_processes)
  return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=buffer)


def _multiprocessing(ds: grain.IterDataset, config) -> grain.IterDataset:
  num_workers = config.get('input', {}).get('num_workers', 0)
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; Colab/tests parse none.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return ds


def _per_host(global_size: int, process_count: int, what: str) -> int:
  if global_size % process_count:
    raise ValueError(f'{what}={global_size} is not divisible by the process count {process_count}; '
                     f'use a multiple of {process_count}')
  return global_size // process_count


def describe(source, index: int) -> str:
  """The file (image folders) or split[index] (TFDS) of a source's example, for log messages."""
  return source.describe(index) if hasattr(source, 'describe') else f'example {index}'


# ----------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass(frozen=True)
class StreamPosition(grain.transforms.Map):
  """Host-local position -> (epoch, source index) in the global stream, from `start_step` on.

  Local position L is row L % b of this host's batch L // b, i.e. row p*b + L % b of global batch
  start_step + L // b: global stream position (start_step + L // b) * B + p * b + L % b.
  """
  order: Any  # grain.MapDataset: global stream position -> source index, reshuffled every epoch.
  num_examples: int
  global_batch: int
  local_batch: int
  process_index: int
  start_step: int

  def map(self, position: int):
    step, row = divmod(int(position), self.local_batch)
    position = ((self.start_step + step) * self.global_batch + self.process_index * self.local_batch
                + row)
    return position // self.num_examples, int(self.order[position])


@dataclasses.dataclass(frozen=True)
class TrainExample(grain.transforms.Map):
  """(epoch, index) -> {'image', 'label', 'replaced'}; an undecodable image is replaced.

  The replacement is the next decodable source index (cyclically), augmented with the generator of
  the original (seed, epoch, index): deterministic, and the stream keeps its length.
  """
  source: Any
  transform: T.TrainTransform
  seed: int

  def map(self, element):
    epoch, index = element
    num_examples = len(self.source)
    errors = []
    for offset in range(min(num_examples, MAX_CONSECUTIVE_UNDECODABLE)):
      candidate = (index + offset) % num_examples
      record = self.source[candidate]
      try:
        image = self.transform(record['image'], np.random.default_rng((self.seed, epoch, index)))
      except T.ImageDecodeError as e:
        errors.append(f'{describe(self.source, candidate)}: {e}')
        continue
      if offset:
        logging.warning('training example %d (%s) cannot be decoded; replaced by example %d '
                        '(epoch %d)', index, errors[0], candidate, epoch)
      return {'image': image, 'label': np.int32(record['label']), 'replaced': bool(offset)}
    raise ValueError(
        f'{len(errors)} consecutive training examples from index {index} cannot be decoded as '
        f'images (first: {errors[0]}); check that the training split holds image files')


class CountReplaced(grain.transforms.Map):
  """Counts (in the main process) the replaced undecodable examples and drops the flag."""

  def __init__(self):
    self.num_replaced = 0

  def map(self, element):
    if element['replaced']:
      self.num_replaced += 1
      logging.warning('%d undecodable training image(s) replaced so far on this host',
                      self.num_replaced)
    return {'image': element['image'], 'label': element['label']}


def create_train_iterator(config, *, process_index: int = 0, process_count: int = 1,
                          start_step: int = 0):
  """Infinite iterator of host-local batches {'image' float32 (b, S, S, 3), 'label' int32 (b,)}.

  Its first batch is this host's rows of global batch `start_step` (see the module docstring): a
  run resumed at step s creates it with start_step=s and sees exactly the batches it would have.
  """
  local_batch = _per_host(config.batch_size, process_count, 'batch_size')
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0')
  source = _open_source(config, 'train_split', 'train')
  num_examples = len(source)
  if config.batch_size > num_examples:
    raise ValueError(f'batch_size={config.batch_size} is larger than the {num_examples} training '
                     f'examples of {config.dataset.name!r}; lower batch_size')
  order = grain.MapDataset.range(num_examples).shuffle(seed=config.seed % 2**32).repeat()
  ds = grain.MapDataset.range(sys.maxsize).map(StreamPosition(
      order, num_examples, config.batch_size, local_batch, process_index, start_step))
  ds = ds.map(TrainExample(source, T.TrainTransform.from_config(config), config.seed))
  ds = ds.to_iter_dataset(_read_options(config, local_batch))
  ds = _multiprocessing(ds, config)
  ds = ds.map(CountReplaced())  # In this process: one count whatever the number of workers.
  ds = ds.batch(local_batch, drop_remainder=True)
  return iter(ds)


# ----------------------------------------------------------------------------------------------
# Eval


@dataclasses.dataclass(frozen=True)
class EvalExample(grain.transforms.Map):
  """Host-local position -> {'image', 'label', 'mask', 'undecodable'}.

  Padding past the split has mask False; an undecodable image has mask False, undecodable True.
  """
  source: Any
  transform: T.EvalTransform
  process_index: int
  process_count: int
  num_examples: int

  def map(self, position: int):
    index = int(position) * self.process_count + self.process_index
    if index < self.num_examples:
      record = self.source[index]
      try:
        image = self.transform(record['image'])
        return {'image': image, 'label': np.int32(record['label']), 'mask': np.True_,
                'undecodable': np.False_}
      except T.ImageDecodeError as e:
        logging.warning('eval example %d (%s) cannot be decoded: %s; it is counted in '
                        'eval/num_undecodable', index, describe(self.source, index), e)
        return self._empty(undecodable=True)
    return self._empty(undecodable=False)

  def _empty(self, undecodable: bool):
    size = self.transform.size
    return {'image': np.zeros((size, size, 3), np.float32), 'label': np.int32(0),
            'mask': np.False_, 'undecodable': np.bool_(undecodable)}


def num_eval_batches(num_examples: int, local_batch: int, process_count: int) -> int:
  return math.ceil(math.ceil(num_examples / process_count) / local_batch)


def create_eval_iterator(config, *, process_index: int = 0, process_count: int = 1):
  """One pass over the eval split; host batches {'image', 'label', 'mask', 'undecodable'}, the
  same number on every host."""
  eval_batch = config.get('eval_batch_size', config.get('batch_size'))
  local_batch = _per_host(eval_batch, process_count, 'eval_batch_size')
  source = _open_source(config, 'eval_split', 'validation')
  num_examples = len(source)
  num_batches = num_eval_batches(num_examples, local_batch, process_count)
  transform = T.EvalTransform.from_config(config)
  ds = grain.MapDataset.range(num_batches * local_batch)
  ds = ds.map(EvalExample(source, transform, process_index, process_count, num_examples))
  ds = ds.to_iter_dataset(_read_options(config, local_batch))
  ds = _multiprocessing(ds, config)
  return EvalPass(ds.batch(local_batch, drop_remainder=True), num_batches)


class EvalPass:
  """A re-iterable eval pass: each `iter()` runs one full pass and then closes its workers."""

  def __init__(self, dataset: grain.IterDataset, num_batches: int):
    self._dataset = dataset
    self.num_batches = num_batches

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self):
    iterator = iter(self._dataset)
    try:
      yield from iterator
    finally:
      iterator.close()
