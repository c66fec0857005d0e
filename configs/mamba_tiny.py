r"""Ablation: mamba_tiny, the mambaout_tiny skeleton with Mamba blocks (Gated CNN + selective SSM), trained
with the paper's recipe and the drop path of mambaout_tiny, so the pair isolates the SSM token mixer.

    python -m mambaout_jax.main --config=configs/mamba_tiny.py --workdir=gs://BUCKET/mamba_tiny

The paper's claim (Sec. 5): on ImageNet the SSM does not help; expect top-1 at or below mambaout_tiny's.
No run of this config has been made here. Sized for: the same slices as mambaout_tiny; the SSM scan adds
memory (check with `python -m mambaout_jax.aot --config=configs/mamba_tiny.py --topology=v5e:4x4`).
"""
from mambaout_jax import recipes


def get_config():
  return recipes.mamba_ablation('mamba_tiny', 'mambaout_tiny')
