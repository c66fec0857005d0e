"""One plain SGD step on a model in train mode: the loss, gradients and the loss after the step."""
import jax
import jax.numpy as jnp
from flax import nnx


def sgd_step(model, images, labels, lr):
  """Returns (loss, grads as an nnx.State, loss after params -= lr * grads); jitted."""
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def loss_fn(params, rest):
    logits = nnx.merge(graphdef, params, rest)(images)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, rest)
  new_params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
  return float(loss), grads, float(loss_fn(new_params, rest))
