"""Input pipeline: TFDS (ArrayRecord) / image-folder sources, Grain pipelines, timm augmentations.

    info = get_dataset_info(config)
    train_iter = create_train_iterator(config, process_index=jax.process_index(),
                                       process_count=jax.process_count(), start_step=step)
    batch = next(train_iter)            # {'image': float32 (b, S, S, 3), 'label': int32 (b,)}
                                        # this host's rows of global batch `step`, on any hosts
    for batch in create_eval_iterator(config, process_index=..., process_count=...):
      ...                               # + 'mask': every example exactly once over all hosts,
                                        # + 'undecodable': rows whose image did not decode
    images, targets = mixup_cutmix(rng, images, labels, num_classes=..., ...)  # on device
"""
from mambaout_jax.data.mixup import mixup_cutmix
from mambaout_jax.data.pipeline import create_eval_iterator, create_train_iterator
from mambaout_jax.data.sources import DatasetInfo, DatasetNotFoundError, get_dataset_info

__all__ = ['DatasetInfo', 'DatasetNotFoundError', 'create_eval_iterator', 'create_train_iterator',
           'get_dataset_info', 'mixup_cutmix']
