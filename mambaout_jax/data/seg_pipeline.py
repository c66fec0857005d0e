"""Grain pipelines for semantic segmentation: a training stream that starts at any step, and an
exact-once eval pass over images of different sizes.

    it = create_train_iterator(config, process_index=p, process_count=P, start_step=s)
    batch = next(it)   # {'image': float32 (b, h, w, 3), 'label': int32 (b, h, w)}, (h, w) = crop
    for batch in create_eval_iterator(config, process_index=p, process_count=P):
      ...              # the eval batch format below
    get_dataset_info(config), class_names(config)   # sizes, 150 ADE20K names for the IoU table

Training: the classification pipeline's stream (`pipeline.StreamPosition`): global batch s is
positions [s*B, (s+1)*B) of one stream of source indices reshuffled every epoch, host p of P takes
rows [p*B/P, (p+1)*B/P) of it. So the batch of a step is a pure function of (seed, step): a run
resumed at step s calls this with `start_step=s` and gets the batches the uninterrupted run saw on
any number of processes (no iterator state to checkpoint). Each example is augmented with a
generator seeded by (seed, epoch, source index). A pair that cannot be used (corrupt file, label
size != image size) is replaced by the next usable source index, augmented with the original
example's generator; each replacement is logged with the file and counted, and the stream keeps
its length.

Eval batch format (per host; `b = eval_batch_size // P`; the canvases are fixed by the config so
every batch has the same shapes under jit):
  'image'     float32 (b, Hc, Wc, 3)  rescaled keeping the aspect ratio to `aug.eval_scale`
                                      (default = `aug.scale`, (2048, 512): long side <= 2048,
                                      short side <= 512), bilinear, normalised, at the top-left
                                      of the canvas, 0 elsewhere;
  'image_hw'  int32 (b, 2)            the valid (h, w) of 'image';
  'label'     int32 (b, Hl, Wl)       the ORIGINAL label map (reduce_zero_label applied) at the
                                      top-left, 255 (ignored) elsewhere;
  'label_hw'  int32 (b, 2)            the original (h, w): logits of the valid image region are
                                      resized to this before the argmax;
  'mask'      bool (b,)               False on padding rows and on pairs that cannot be used;
                                      those rows have all-255 labels and hw = the canvas sizes;
  'undecodable' bool (b,)             True on pairs that cannot be used (corrupt file, label size
                                      != image size; logged with the file), so that
                                      num_examples + num_undecodable is the size of the split.
Canvases: `input.eval_canvas` (Hc, Wc) and `input.eval_label_canvas` (Hl, Wl) when set; else
fitted to the split: the largest rescaled image and the largest label map, each side rounded up to
a multiple of 32, from the sizes `ade20k` records while preparing, else from the label headers of
every eval example (read once when the pass is created). An image or label that does not fit a
configured canvas is an error naming the file and the key to raise. Host p takes examples p,
p + P, ... and every host yields the same number of batches, so each validation image is counted
exactly once on any number of hosts.

What the padded canvas does to whole-image inference (mmseg runs each image alone at its exact
rescaled size, batch 1, upsamples the 1/4-resolution logits to that size, then resizes them to the
original label size, both bilinear with align_corners=False): convolutions see the valid region on
the same top-left grid, but near its bottom/right border they see canvas padding (features of a
normalised-zero image) where the exact-size run sees conv zero padding, and UperNet's pyramid
pooling averages over the whole canvas unless the model restricts it to `image_hw`. To stay close
to mmseg the inference function should (a) pool over the valid region only (bins from
`image_hw`), and (b) upsample the logits to the canvas, then map the valid region onto the label
canvas with a per-example scale `label_hw / image_hw`, e.g.
`jax.image.scale_and_translate(up, (Hl, Wl, C), (0, 1), label_hw / image_hw, (0, 0), 'linear',
antialias=False)` (align_corners=False semantics, static output shape), before the argmax;
pixels beyond `label_hw` are 255 and never count. Sliding-window inference (crop 512, stride 341)
over the valid region differs only in windows that reach into the padding.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

from absl import logging
import grain
import numpy as np

from mambaout_jax.data import pipeline
from mambaout_jax.data import seg_sources
from mambaout_jax.data import seg_transforms as T

# The classification pipeline's helpers, so that both streams read and shard alike.
# pylint: disable=protected-access
_per_host, _read_options = pipeline._per_host, pipeline._read_options
_multiprocessing = pipeline._multiprocessing
# pylint: enable=protected-access

get_dataset_info = seg_sources.get_seg_dataset_info  # DatasetInfo of config.dataset.
class_names = seg_sources.class_names  # The names for the per-class IoU table.



def _open_source(config, split_key: str, default_split: str):
  ds = config.dataset
  return seg_sources.open_seg_source(ds.name, ds.get(split_key, default_split),
                                     ds.get('data_dir', '') or None)


# ----------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass(frozen=True)
class SegTrainExample(grain.transforms.Map):
  """(epoch, index) -> augmented {'image', 'label', 'replaced'}; an unusable pair is replaced by
  the next usable source index (cyclically), augmented with the original example's generator."""
  source: Any
  transform: T.SegTrainTransform
  seed: int

  def map(self, element):
    epoch, index = element
    num_examples = len(self.source)
    errors = []
    for offset in range(min(num_examples, pipeline.MAX_CONSECUTIVE_UNDECODABLE)):
      record = self.source[(index + offset) % num_examples]
      rng = np.random.default_rng((self.seed, epoch, index))
      try:
        image, label = self.transform(record['image'], record['label'], rng, record['name'])
      except T.SegExampleError as e:
        errors.append(str(e))
        continue
      if offset:
        logging.warning('training pair %d cannot be used (%s); replaced by pair %d (epoch %d)',
                        index, errors[0], (index + offset) % num_examples, epoch)
      return {'image': image, 'label': label, 'replaced': bool(offset)}
    raise T.SegExampleError(
        f'{len(errors)} consecutive training pairs from index {index} cannot be used (first: '
        f'{errors[0]}); the dataset is damaged: prepare it again')


def create_train_iterator(config, *, process_index: int = 0, process_count: int = 1,
                          start_step: int = 0):
  """Infinite iterator of host-local batches {'image' float32 (b, h, w, 3), 'label' int32
  (b, h, w)}, (h, w) = the crop; its first batch is this host's rows of global batch
  `start_step` (module doc)."""
  local_batch = _per_host(config.batch_size, process_count, 'batch_size')
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0')
  source = _open_source(config, 'train_split', 'train')
  num_examples = len(source)
  if config.batch_size > num_examples:
    raise ValueError(f'batch_size={config.batch_size} is larger than the {num_examples} training '
                     f'examples of {config.dataset.name!r}; lower batch_size')
  order = grain.MapDataset.range(num_examples).shuffle(seed=config.seed % 2**32).repeat()
  ds = grain.MapDataset.range(sys.maxsize).map(pipeline.StreamPosition(
      order, num_examples, config.batch_size, local_batch, process_index, start_step))
  ds = ds.map(SegTrainExample(source, T.SegTrainTransform.from_config(config), config.seed))
  ds = ds.to_iter_dataset(_read_options(config, local_batch))
  ds = _multiprocessing(ds, config)
  ds = ds.map(pipeline.CountReplaced())  # In this process: one count whatever the workers.
  return iter(ds.batch(local_batch, drop_remainder=True))


# ----------------------------------------------------------------------------------------------
# Eval


@dataclasses.dataclass(frozen=True)
class SegEvalExample(grain.transforms.Map):
  """Host-local position -> one eval example (module doc); padding past the split masked out."""
  source: Any
  transform: T.SegEvalTransform
  process_index: int
  process_count: int
  num_examples: int

  def map(self, position: int):
    index = int(position) * self.process_count + self.process_index
    if index < self.num_examples:
      record = self.source[index]
      try:
        example = self.transform(record['image'], record['label'], record['name'])
        return {**example, 'mask': np.True_, 'undecodable': np.False_}
      except T.SegExampleError as e:
        logging.warning('eval pair %d cannot be used: %s; it is counted in eval/num_undecodable',
                        index, e)
        return {**self.transform.padding(), 'mask': np.False_, 'undecodable': np.True_}
    return {**self.transform.padding(), 'mask': np.False_, 'undecodable': np.False_}


def create_eval_iterator(config, *, process_index: int = 0, process_count: int = 1):
  """One pass over the eval split in the eval batch format; the same batch count on every host."""
  eval_batch = config.get('eval_batch_size', config.get('batch_size'))
  local_batch = _per_host(eval_batch, process_count, 'eval_batch_size')
  source = _open_source(config, 'eval_split', 'validation')
  num_examples = len(source)
  num_batches = pipeline.num_eval_batches(num_examples, local_batch, process_count)
  inp = config.get('input', {})
  fixed = inp.get('eval_canvas', None) and inp.get('eval_label_canvas', None)
  transform = T.SegEvalTransform.from_config(
      config, None if fixed else seg_sources.split_sizes(source))
  ds = grain.MapDataset.range(num_batches * local_batch)
  ds = ds.map(SegEvalExample(source, transform, process_index, process_count, num_examples))
  ds = ds.to_iter_dataset(_read_options(config, local_batch))
  ds = _multiprocessing(ds, config)
  return pipeline.EvalPass(ds.batch(local_batch, drop_remainder=True), num_batches)
