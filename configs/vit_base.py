r"""Ablation: vit_base_patch16 on ImageNet-1k with DeiT's recipe (the paper's causal-attention experiment).

    python -m mambaout_jax.main --config=configs/vit_base.py --workdir=gs://BUCKET/vit_base

Expected top-1: 81.8 (DeiT reports 79.8 / 81.8 for fully-visible ViT-S / ViT-B; the paper finds
causal attention lowers accuracy). No run of this config has been made here.
Sized for: a TPU pod slice holding batch 1024 (check with `python -m mambaout_jax.aot`).
"""
from mambaout_jax import recipes


def get_config():
  return recipes.deit_recipe('vit_base_patch16')
