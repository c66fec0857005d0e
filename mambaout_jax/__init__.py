"""mambaout_jax: MambaOut (CVPR 2025) in JAX/Flax NNX.

    import mambaout_jax as mo
    mo.list_models()
    model = mo.create_model('mambaout_femto', rngs=nnx.Rngs(0))
    model = mo.load_pretrained('mambaout_femto', '/path/to/export')

Importing this package parses no absl flags, so it works in Colab and notebooks.
"""
from mambaout_jax.models.registry import create_model, list_models

__version__ = '0.1.0'


def load_pretrained(name: str, path: str, **overrides):
  """Builds `name` and loads a converted (`mambaout_jax.convert`) or exported checkpoint from `path`."""
  from mambaout_jax.params import load_pretrained as _load
  return _load(name, path, **overrides)


__all__ = ['create_model', 'list_models', 'load_pretrained', '__version__']
