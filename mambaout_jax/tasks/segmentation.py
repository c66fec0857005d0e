"""Semantic segmentation (UperNet on ADE20K, or the embedded `digit_scenes` demo) as a trainer task.

Sections: dataset and model, data, loss, eval (masked per-class sums -> mmseg's metrics), init.
Loss: the decode head's logits (stride 4) and the auxiliary FCN head's (stride 16) are upsampled
bilinearly (align_corners=False) to the label size; per-pixel cross-entropy with ignore index 255;
total = decode + `seg.aux_loss_weight` (0.4) x auxiliary, as mmsegmentation's UperNet configs.
Eval: the segmodel inference (whole image or sliding window, optional multi-scale + flip) predicts
a label map at each image's original size, and `seg_metrics.pixel_sums` counts it against the
label; the trainer adds those sums over batches, devices and hosts, so each validation image is
counted exactly once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mambaout_jax import seg_metrics
from mambaout_jax.data import digit_scenes
from mambaout_jax.tasks import Task, constructor_keywords, scan_order_kwargs

IGNORE_INDEX = seg_metrics.IGNORE_INDEX


def upsample_logits(logits, size: tuple[int, int]):
  """(B, h, w, C) -> (B, H, W, C) float32, bilinear with half-pixel centres (PyTorch's
  F.interpolate(mode='bilinear', align_corners=False) when upsampling)."""
  logits = logits.astype(jnp.float32)
  if logits.shape[1:3] == tuple(size):
    return logits
  return jax.image.resize(logits, (logits.shape[0], *size, logits.shape[-1]), 'bilinear',
                          antialias=False)


def cross_entropy_ignore(logits, labels):
  """mmsegmentation's default `CrossEntropyLoss` on (B, H, W, C) logits and (B, H, W) labels.

  mmseg's CrossEntropyLoss has `avg_non_ignore=False` by default (and Swin's UperNet config, like
  every ADE20K config of the paper's era, predates the flag): the per-pixel loss is 0 on pixels
  labelled 255 and the MEAN IS TAKEN OVER ALL PIXELS, ignored ones included
  (`weight_reduce_loss(..., reduction='mean', avg_factor=None)` -> `loss.mean()`). PyTorch's own
  F.cross_entropy(ignore_index=255) would divide by the non-ignored count instead.
  """
  labels = labels.astype(jnp.int32)
  valid = labels != IGNORE_INDEX
  safe = jnp.where(valid, labels, 0)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  return jnp.mean(jnp.where(valid, nll, 0.0))


def segmentation_loss(outputs, labels, *, aux_weight: float):
  """(total, {'loss_decode', 'loss_aux'}): outputs = decode logits or (decode, auxiliary)."""
  decode, aux = (outputs if isinstance(outputs, (tuple, list)) else (outputs, None))
  size = labels.shape[1:3]
  loss_decode = cross_entropy_ignore(upsample_logits(decode, size), labels)
  parts = {'loss_decode': loss_decode}
  total = loss_decode
  if aux is not None and aux_weight:
    loss_aux = cross_entropy_ignore(upsample_logits(aux, size), labels)
    parts['loss_aux'] = loss_aux
    total = total + aux_weight * loss_aux
  return total, parts


# ----------------------------------------------------------------------------------------------
# The task


class SegmentationTask(Task):
  """UperNet semantic segmentation: mmseg's loss, inference and IoU metric (see module doc)."""
  name = 'segmentation'
  best_metric = 'eval/mIoU'

  def __init__(self, config=None):
    super().__init__(config)
    self.num_classes = None      # set by dataset_info (the trainer calls it first)
    self.class_names = ()

  # ---------------------------------------------------------------------- dataset and model
  def dataset_info(self, config):
    from mambaout_jax.data import seg_pipeline
    info = seg_pipeline.get_dataset_info(config)
    self.num_classes = config.dataset.get('num_classes', 0) or info.num_classes
    self.class_names = (digit_scenes.CLASS_NAMES if config.dataset.name == digit_scenes.NAME
                        else seg_pipeline.class_names(config))
    return info

  def model_kwargs(self, config, num_classes):
    # The model's keywords include its backbone's (constructor_keywords follows the builder's
    # `forwards_to`): scan_order for Mamba-block backbones, the one structural backbone kwarg
    # a config sets.
    accepted = constructor_keywords(config.model.name)
    return {'num_classes': num_classes, **scan_order_kwargs(config, accepted)}

  # ---------------------------------------------------------------------------------- data
  def abstract_train_batch(self, config, batch_size):
    s = config.image_size  # the square training crop; labels at the crop's size
    return {'image': jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.float32),
            'label': jax.ShapeDtypeStruct((batch_size, s, s), jnp.int32)}

  def create_train_iterator(self, config, *, process_index, process_count, start_step=0):
    from mambaout_jax.data import seg_pipeline
    return seg_pipeline.create_train_iterator(config, process_index=process_index,
                                              process_count=process_count, start_step=start_step)

  def create_eval_iterator(self, config, *, process_index, process_count):
    from mambaout_jax.data import seg_pipeline
    return seg_pipeline.create_eval_iterator(config, process_index=process_index,
                                             process_count=process_count)

  # ---------------------------------------------------------------------------------- loss
  def train_loss(self, model, batch, key, *, config, num_classes):
    del key, num_classes  # no task-level randomness (augmentation happens in the input pipeline)
    aux_weight = config.seg.aux_loss_weight
    outputs = model(batch['image'], return_aux=bool(aux_weight))
    return segmentation_loss(outputs, batch['label'], aux_weight=aux_weight)

  # ---------------------------------------------------------------------------------- eval
  def eval_sums(self, model, batch):
    from mambaout_jax.tasks import seg_inference
    pred = seg_inference.predict(model, batch, self.config)   # -1 beyond each label's size
    sums = seg_metrics.pixel_sums(pred, batch['label'], batch['mask'], self.num_classes)
    if 'undecodable' in batch:  # validation pairs the pipeline could not use (masked out)
      sums['num_undecodable'] = jnp.sum(batch['undecodable'].astype(jnp.int32))
    return sums

  def eval_metrics(self, sums):
    metrics = seg_metrics.metrics_from_sums(sums)
    if 'num_undecodable' in sums:
      metrics['num_undecodable'] = int(np.asarray(sums['num_undecodable']))
    return metrics

  def write_eval_report(self, sums, *, workdir, step):
    from absl import logging
    logging.info('per-class IoU / Acc (%%) at step %d:\n%s', step,
                 seg_metrics.per_class_table(sums, self.class_names))
    if jax.process_index() == 0:
      seg_metrics.write_report(sums, self.class_names, workdir=workdir, step=step)

  # ---------------------------------------------------------------------------------- init
  def init_params_from(self, config, params):
    """config.init_from -> params['backbone'] (ImageNet classification weights: the source's head
    dropped, every backbone key required except the new output norms norm0..3); the UperNet
    heads keep their fresh initialisation."""
    from mambaout_jax import pretrained
    from mambaout_jax.models.upernet import UPERNET_VARIANTS
    if config.model.name not in UPERNET_VARIANTS:
      raise ValueError(f'config.model.name={config.model.name!r} is not a segmentation model; '
                       f'choose one of {", ".join(sorted(UPERNET_VARIANTS))}')
    backbone = pretrained.init_params(config.init_from, params['backbone'],
                                      variant=UPERNET_VARIANTS[config.model.name]['backbone'],
                                      backbone_only=True)
    return {**params, 'backbone': backbone}
