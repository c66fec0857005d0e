"""Grain pipelines: an infinite, resumable training stream and an exact-once eval pass.

Training (per host): indices 0..N-1 are shuffled globally with a new permutation each epoch
(`grain.MapDataset.shuffle` + `repeat`); host `p` of `P` takes every P-th position of that global
stream, so hosts read disjoint examples. Each example's augmentation draws from a generator seeded
with (seed, epoch, source index), so it does not depend on workers, hosts or restarts. Decoding
and augmentation run in `input.num_workers` processes (0: in this process) with `input.num_threads`
threads each; examples that fail to decode are skipped (and counted) after them, and batches of
`batch_size // P` are formed in this process, so the stream is the same for any number of workers.
The iterator's `get_state()` / `set_state()` resume it mid-epoch with exactly the same batches
(restore with the same `num_workers`: the state records each worker's position). Close the
iterator (`close()`) when done to stop its worker processes.

Eval (per host): host `p` takes examples p, p + P, p + 2P, ... and pads them to the same number of
batches on every host; padding rows (and undecodable images) have `mask` False.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from absl import flags
from absl import logging
import grain
import numpy as np

from mambaout_jax.data import sources
from mambaout_jax.data import transforms as T


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


# ----------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass(frozen=True)
class EpochAndIndex(grain.transforms.MapWithIndex):
  """Global stream position + source index -> (epoch, source index)."""
  num_examples: int

  def map_with_index(self, position: int, index: int):
    return position // self.num_examples, int(index)


@dataclasses.dataclass(frozen=True)
class TrainExample(grain.transforms.Map):
  """(epoch, index) -> augmented {'image', 'label', 'valid'}; 'valid' is False if undecodable."""
  source: Any
  transform: T.TrainTransform
  seed: int

  def map(self, element):
    epoch, index = element
    record = self.source[index]
    rng = np.random.default_rng((self.seed, epoch, index))
    try:
      image = self.transform(record['image'], rng)
    except T.ImageDecodeError as e:
      logging.warning('skipping example %d of the training split (epoch %d): cannot decode '
                      'image: %s', index, epoch, e)
      return {'image': np.zeros((1, 1, 3), np.float32), 'label': np.int32(-1), 'valid': False}
    return {'image': image, 'label': np.int32(record['label']), 'valid': True}


class DropInvalid(grain.transforms.Filter):
  """Drops undecodable examples (in the main process) and reports how many so far."""

  def __init__(self):
    self.num_skipped = 0

  def filter(self, element) -> bool:
    if element['valid']:
      return True
    self.num_skipped += 1
    logging.warning('skipped %d undecodable training image(s) so far on this host',
                    self.num_skipped)
    return False


class WithoutValid(grain.transforms.Map):

  def map(self, element):
    return {'image': element['image'], 'label': element['label']}


def create_train_iterator(config, *, process_index: int = 0, process_count: int = 1):
  """Infinite iterator of host-local batches {'image' float32 (b, S, S, 3), 'label' int32 (b,)}."""
  local_batch = _per_host(config.batch_size, process_count, 'batch_size')
  source = _open_source(config, 'train_split', 'train')
  num_examples = len(source)
  if local_batch * process_count > num_examples:
    raise ValueError(f'batch_size={config.batch_size} is larger than the {num_examples} training '
                     f'examples of {config.dataset.name!r}; lower batch_size')
  ds = grain.MapDataset.range(num_examples).shuffle(seed=config.seed % 2**32).repeat()
  ds = ds.map_with_index(EpochAndIndex(num_examples))
  ds = ds[process_index::process_count]
  ds = ds.map(TrainExample(source, T.TrainTransform.from_config(config), config.seed))
  ds = ds.to_iter_dataset(_read_options(config, local_batch))
  ds = _multiprocessing(ds, config)
  # Skipping after the worker processes keeps the stream the same for any number of workers.
  ds = ds.filter(DropInvalid()).map(WithoutValid())
  ds = ds.batch(local_batch, drop_remainder=True)
  return iter(ds)


# ----------------------------------------------------------------------------------------------
# Eval


@dataclasses.dataclass(frozen=True)
class EvalExample(grain.transforms.Map):
  """Host-local position -> {'image', 'label', 'mask'}; padding past the split has mask False."""
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
        return {'image': image, 'label': np.int32(record['label']), 'mask': np.True_}
      except T.ImageDecodeError as e:
        logging.warning('example %d of the eval split cannot be decoded (%s); it is masked out',
                        index, e)
    size = self.transform.size
    return {'image': np.zeros((size, size, 3), np.float32), 'label': np.int32(0), 'mask': np.False_}


def num_eval_batches(num_examples: int, local_batch: int, process_count: int) -> int:
  return math.ceil(math.ceil(num_examples / process_count) / local_batch)


def create_eval_iterator(config, *, process_index: int = 0, process_count: int = 1):
  """One pass over the eval split; host batches {'image', 'label', 'mask'}, same count per host."""
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
