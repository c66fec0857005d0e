r"""mambaout_small_rw (timm's variant: no stem mid-norm, norm-first downsampling, layer scale,
norm-MLP head) on ImageNet-1k with the paper's recipe.

    python -m mambaout_jax.main --config=configs/small_rw.py --workdir=gs://BUCKET/mambaout_small_rw

timm's own training hyper-parameters for the `_rw` models are not published with the paper; this
config uses the paper's recipe (configs/femto.py docstring) with the drop path of mambaout_small (0.4).
Expected accuracy: timm's results table lists these weights; no run of this config has been made.
Sized for: the same slices as mambaout_small (check with `python -m mambaout_jax.aot`).
"""
from mambaout_jax import recipes


def get_config():
  c = recipes.imagenet_recipe('mambaout_small_rw')
  c.model.drop_path_rate = 0.4
  return c
