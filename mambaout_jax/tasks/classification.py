"""Image classification (the paper's ImageNet experiments and the digits demo).

Loss: soft-target cross-entropy after on-device Mixup/CutMix with label smoothing (timm's recipe).
Eval: masked sums of cross-entropy, top-1 and top-5 hits and the example count (so any host/device
layout gives the exact totals), plus the number of undecodable validation images when the data
pipeline reports them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mambaout_jax import data as data_lib
from mambaout_jax.tasks import Task, constructor_keywords, scan_order_kwargs


def masked_eval_sums(logits, labels, mask):
  """Sums over valid rows of loss, top-1 and top-5 hits (so any host layout gives exact totals)."""
  mask = mask.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  k = min(5, logits.shape[-1])
  top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1).astype(jnp.float32)
  return {'loss': jnp.sum(loss * mask), 'top1': jnp.sum(top1 * mask),
          'top5': jnp.sum(top5 * mask), 'count': jnp.sum(mask)}


class ClassificationTask(Task):
  name = 'classification'
  best_metric = 'eval/top1'

  def dataset_info(self, config):
    return data_lib.get_dataset_info(config)

  def model_kwargs(self, config, num_classes: int) -> dict:
    accepted = constructor_keywords(config.model.name)
    kwargs = {'num_classes': num_classes, **scan_order_kwargs(config, accepted)}
    if 'img_size' in accepted:  # the position embedding is sized for the images
      kwargs['img_size'] = config.image_size
    return kwargs

  def abstract_train_batch(self, config, batch_size):
    s = config.image_size
    return {'image': jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.float32),
            'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

  def create_train_iterator(self, config, *, process_index, process_count, start_step=0):
    return data_lib.create_train_iterator(config, process_index=process_index,
                                          process_count=process_count, start_step=start_step)

  def create_eval_iterator(self, config, *, process_index, process_count):
    return data_lib.create_eval_iterator(config, process_index=process_index,
                                         process_count=process_count)

  def train_loss(self, model, batch, key, *, config, num_classes):
    aug = config.aug
    images, targets = data_lib.mixup_cutmix(
        key, batch['image'], batch['label'], num_classes=num_classes, mixup_alpha=aug.mixup,
        cutmix_alpha=aug.cutmix, switch_prob=aug.mixup_switch_prob, prob=aug.mixup_prob,
        label_smoothing=aug.label_smoothing)
    return optax.softmax_cross_entropy(model(images), targets).mean(), {}

  def eval_sums(self, model, batch):
    sums = masked_eval_sums(model(batch['image']), batch['label'], batch['mask'])
    if 'undecodable' in batch:  # validation images the pipeline could not decode
      sums['num_undecodable'] = jnp.sum(batch['undecodable'].astype(jnp.int32))
    return sums

  def eval_metrics(self, sums):
    n = float(sums['count'])
    metrics = {'loss': float(sums['loss']) / n, 'top1': float(sums['top1']) / n,
               'top5': float(sums['top5']) / n, 'num_examples': int(n)}
    if 'num_undecodable' in sums:
      metrics['num_undecodable'] = int(np.asarray(sums['num_undecodable']))
    return metrics

  def init_params_from(self, config, params):
    from mambaout_jax import pretrained  # the pretrained-weights module (hub, .pth, exports)
    return pretrained.init_params(config.init_from, params, variant=config.model.name,
                                  init_head=config.get('init_head', ''))
