r"""mambaout_tiny on ImageNet-1k: the paper's recipe (expected top-1 82.7 at 224 px).

    python -m mambaout_jax.main --config=configs/tiny.py --workdir=gs://BUCKET/mambaout_tiny \
        --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets

Recipe (official scripts, timm 0.6.11): global batch 4096, AdamW lr 4e-3 (1e-3 per 1024 images),
weight decay 0.05 (not on biases / norms / layer scales), 20 warm-up epochs from 1e-6, cosine to
1e-5 over 300 epochs + 10 cool-down epochs, drop path as in the paper, RandAugment m9, random
erasing 0.25, Mixup 0.8 / CutMix 1.0, label smoothing 0.1, bf16 compute with fp32 parameters.
Sized for: a TPU pod slice holding the 4096 batch (the official runs used TPU v3 and 8 GPUs);
check per-chip memory first with `python -m mambaout_jax.aot --config=configs/tiny.py --topology=v5e:4x4`.
Measured with aot.py: v5e-16 (v5e:4x4) 14.3 of 16 GiB per chip, v4-32 (v4:2x2x4) 17.0 of 32 GiB;
113-116 TFLOP per step, 28 GFLOP per image.
Dataset: TFDS imagenet2012 prepared with `python -m mambaout_jax.data.prepare --dataset=imagenet2012
--manual_dir=DIR_WITH_THE_TARS --data_dir=...`.
"""
from mambaout_jax import recipes


def get_config():
  return recipes.imagenet_recipe('mambaout_tiny')
