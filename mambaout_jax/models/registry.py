"""Model registry: variant name -> constructor. Families register themselves on import."""
from __future__ import annotations

from typing import Callable

_MODELS: dict[str, Callable] = {}


class UnknownModelError(ValueError):
  """A variant name that no family registers."""


def register_model(fn: Callable) -> Callable:
  if fn.__name__ in _MODELS:
    raise ValueError(f'model {fn.__name__!r} registered twice')
  _MODELS[fn.__name__] = fn
  return fn


def _import_families():
  # Importing the family modules fills the registry.
  from mambaout_jax.models import mambaout, mamba, vit  # noqa: F401
  from mambaout_jax.models import upernet  # noqa: F401  (after the backbones it builds on)


def list_models() -> list[str]:
  _import_families()
  return sorted(_MODELS)


def get_model_fn(name: str) -> Callable:
  _import_families()
  if name not in _MODELS:
    raise UnknownModelError(f'unknown model {name!r}; valid names: {", ".join(sorted(_MODELS))}')
  return _MODELS[name]


def create_model(name: str, *, rngs=None, **overrides):
  """Builds variant `name`; `overrides` (num_classes, drop_path_rate, dtype, ...) replace defaults."""
  from flax import nnx
  fn = get_model_fn(name)
  if rngs is None:
    rngs = nnx.Rngs(0)
  elif isinstance(rngs, int):
    rngs = nnx.Rngs(rngs)
  return fn(rngs=rngs, **overrides)
