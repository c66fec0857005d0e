"""Small layers shared by the model families: PyTorch-equivalent LayerNorm/GELU,
layer scale, and a depthwise convolution whose formulation is chosen per backend.

Depthwise convolution on XLA:CPU is far slower as a grouped `conv_general_dilated` than the same
op written as k*k shifted multiply-adds (`benchmarks/cpu_vs_timm.py` times the models with both
formulations). On TPU/GPU the
grouped convolution is the fast, well-trodden path. `depthwise_conv2d(..., impl='auto')` picks per
backend; both formulations compute the same cross-correlation as `torch.nn.Conv2d(groups=C)`, and the
shifted one carries a custom VJP whose input gradient is again a shifted correlation (with the
flipped kernel) instead of XLA's k*k pad-and-add transposes.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

LN_EPS = 1e-6  # timm's LayerNorm default, used by every MambaOut norm
trunc_normal_init = nnx.initializers.truncated_normal(stddev=0.02)


def gelu(x):
  """Exact (erf) GELU, as `torch.nn.GELU()`."""
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable] = {'gelu': gelu, 'silu': jax.nn.silu}


def get_act(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise ValueError(f'unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}')
  return ACTIVATIONS[name]


def layer_norm(dim, *, dtype, param_dtype, rngs):
  return nnx.LayerNorm(dim, epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def linear(din, dout, *, dtype, param_dtype, rngs, use_bias=True):
  return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=trunc_normal_init,
                    bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)


def conv3x3_s2(din, dout, *, dtype, param_dtype, rngs):
  """3x3 stride-2 conv with PyTorch's symmetric padding=1 ('SAME' would pad (0, 1))."""
  return nnx.Conv(din, dout, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                  kernel_init=trunc_normal_init, bias_init=nnx.initializers.zeros_init(),
                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class LayerScale(nnx.Module):
  """Per-channel residual scale `gamma` (timm's LayerScale), initialised to `init_value`."""

  def __init__(self, dim: int, init_value: float, *, param_dtype=jnp.float32):
    self.gamma = nnx.Param(jnp.full((dim,), init_value, param_dtype))

  def __call__(self, x):
    return x * self.gamma[...].astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Depthwise convolution.

def _shift_correlate(x, w):
  """sum_{i,j} xpad[:, i:i+H, j:j+W, :] * w[i, j, :] with 'same' zero padding k//2 (odd k)."""
  k = w.shape[0]
  p = k // 2
  _, h, wd, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  out = None
  for i in range(k):
    for j in range(k):
      term = xp[:, i:i + h, j:j + wd, :] * w[i, j]
      out = term if out is None else out + term
  return out


@jax.custom_vjp
def _shift_depthwise(x, w):
  return _shift_correlate(x, w)


def _shift_depthwise_fwd(x, w):
  return _shift_correlate(x, w), (x, w)


def _shift_depthwise_bwd(res, g):
  x, w = res
  k = w.shape[0]
  p = k // 2
  _, h, wd, _ = x.shape
  # Input gradient: correlation of g with the spatially flipped kernel.
  dx = _shift_correlate(g, w[::-1, ::-1])
  # Kernel gradient: dw[i, j, c] = sum_{b,h,w} xpad[b, h+i, w+j, c] * g[b, h, w, c], accumulated
  # one image at a time so both operands stay in cache (2.5x faster than one pass per tap).
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))

  def add_image(acc, xg):
    xb, gb = xg
    taps = [[jnp.sum(xb[i:i + h, j:j + wd] * gb, axis=(0, 1), dtype=jnp.float32)
             for j in range(k)] for i in range(k)]
    return acc + jnp.stack([jnp.stack(row) for row in taps]), None

  dw, _ = jax.lax.scan(add_image, jnp.zeros(w.shape, jnp.float32), (xp, g))
  dw = dw.astype(w.dtype)
  return dx, dw


_shift_depthwise.defvjp(_shift_depthwise_fwd, _shift_depthwise_bwd)


def _grouped_depthwise(x, w):
  c = x.shape[-1]
  p = w.shape[0] // 2
  return jax.lax.conv_general_dilated(
      x, w[:, :, None, :], window_strides=(1, 1), padding=((p, p), (p, p)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)


_IMPL_OVERRIDE = None


def set_default_depthwise_impl(impl: str | None) -> None:
  """Makes impl='auto' mean `impl` (None: per backend again). For compiling TPU programs on a CPU
  host (`mambaout_jax.aot`), where the default backend is not the target."""
  global _IMPL_OVERRIDE
  if impl not in (None, 'shift', 'conv'):
    raise ValueError(f"unknown depthwise conv impl {impl!r}; choose 'shift', 'conv' or None")
  _IMPL_OVERRIDE = impl


def resolve_depthwise_impl(impl: str, backend: str | None = None) -> str:
  """'auto' -> 'shift' on CPU, 'conv' elsewhere (`backend`: the default backend when None)."""
  if impl == 'auto':
    if _IMPL_OVERRIDE is not None and backend is None:
      return _IMPL_OVERRIDE
    return 'shift' if (backend or jax.default_backend()) == 'cpu' else 'conv'
  if impl not in ('shift', 'conv'):
    raise ValueError(f"unknown depthwise conv impl {impl!r}; choose 'auto', 'shift' or 'conv'")
  return impl


def depthwise_conv2d(x, kernel, bias=None, impl: str = 'auto'):
  """Depthwise 'same' cross-correlation, NHWC. `kernel` is (k, k, C) with odd k."""
  if kernel.shape[0] % 2 != 1 or kernel.shape[0] != kernel.shape[1]:
    raise ValueError(f'depthwise kernel must be square with odd size, got {kernel.shape[:2]}')
  fn = _shift_depthwise if resolve_depthwise_impl(impl) == 'shift' else _grouped_depthwise
  y = fn(x, kernel.astype(x.dtype))
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y


class DepthwiseConv2d(nnx.Module):
  """`nn.Conv2d(C, C, k, padding=k//2, groups=C)` in NHWC. kernel: (k, k, 1, C) like nnx.Conv."""

  def __init__(self, channels: int, kernel_size: int, *, impl: str = 'auto',
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.impl = impl
    self.dtype = dtype
    self.kernel = nnx.Param(trunc_normal_init(rngs.params(), (kernel_size, kernel_size, 1, channels),
                                              param_dtype))
    self.bias = nnx.Param(jnp.zeros((channels,), param_dtype))

  def __call__(self, x):
    if self.dtype is not None:
      x = x.astype(self.dtype)
    return depthwise_conv2d(x, self.kernel[...][:, :, 0, :], self.bias[...], self.impl)

