r"""mambaout_base on ImageNet-1k: the paper's recipe (expected top-1 84.2 at 224 px).

    python -m mambaout_jax.main --config=configs/base.py --workdir=gs://BUCKET/mambaout_base \
        --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets

Recipe (official scripts, timm 0.6.11): global batch 4096, AdamW lr 4e-3 (1e-3 per 1024 images),
weight decay 0.05 (not on biases / norms / layer scales), 20 warm-up epochs from 1e-6, cosine to
1e-5 over 300 epochs + 10 cool-down epochs, drop path as in the paper, RandAugment m9, random
erasing 0.25, Mixup 0.8 / CutMix 1.0, label smoothing 0.1, bf16 compute with fp32 parameters.
Sized for: a TPU pod slice holding the 4096 batch (the official runs used TPU v3 and 8 GPUs);
check per-chip memory first with `python -m mambaout_jax.aot --config=configs/base.py --topology=v5e:4x4`.
Dataset: TFDS imagenet2012 prepared with `python -m mambaout_jax.data.prepare --dataset=imagenet2012
--manual_dir=DIR_WITH_THE_TARS --data_dir=...`.
"""
from mambaout_jax import recipes


def get_config():
  return recipes.imagenet_recipe('mambaout_base')
