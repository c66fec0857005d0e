"""Model families and the registry that maps variant names to constructors."""
from mambaout_jax.models.registry import create_model, get_model_fn, list_models, register_model

__all__ = ['create_model', 'get_model_fn', 'list_models', 'register_model']
