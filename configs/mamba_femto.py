r"""Ablation: mamba_femto, the mambaout_femto skeleton with Mamba blocks (Gated CNN + selective SSM), trained
with the paper's recipe and the drop path of mambaout_femto, so the pair isolates the SSM token mixer.

    python -m mambaout_jax.main --config=configs/mamba_femto.py --workdir=gs://BUCKET/mamba_femto

The paper's claim (Sec. 5): on ImageNet the SSM does not help; expect top-1 at or below mambaout_femto's.
No run of this config has been made here. Sized for: the same slices as mambaout_femto; the SSM scan adds
memory (check with `python -m mambaout_jax.aot --config=configs/mamba_femto.py --topology=v5e:4x4`).
"""
from mambaout_jax import recipes


def get_config():
  return recipes.mamba_ablation('mamba_femto', 'mambaout_femto')
