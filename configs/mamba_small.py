r"""Ablation: mamba_small, the mambaout_small skeleton with Mamba blocks (Gated CNN + selective SSM), trained
with the paper's recipe and the drop path of mambaout_small, so the pair isolates the SSM token mixer.

    python -m mambaout_jax.main --config=configs/mamba_small.py --workdir=gs://BUCKET/mamba_small

The paper's claim (Sec. 5): on ImageNet the SSM does not help; expect top-1 at or below mambaout_small's.
No run of this config has been made here. Sized for: the same slices as mambaout_small; the SSM scan adds
memory (check with `python -m mambaout_jax.aot --config=configs/mamba_small.py --topology=v5e:4x4`).
"""
from mambaout_jax import recipes


def get_config():
  return recipes.mamba_ablation('mamba_small', 'mambaout_small')
