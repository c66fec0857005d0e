"""Mamba's selective SSM as Flax modules, and the Mamba-block variants (MambaOut with the SSM put back).

* `SelectiveSSM`: one direction of Mamba's SSM with Mamba's parameters and initialisation
  (`x_proj` -> dt, B, C; `dt_proj` with the inverse-softplus dt init; `A_log` = log(1..N) (S4D-real);
  `D` = 1; optionally the depthwise causal conv1d + SiLU in front), on (B, L, C) sequences, computed
  by `mambaout_jax.models.ssm.selective_scan`. `SSM2d` runs one `SelectiveSSM` per direction of a
  2-D scan order over (B, H, W, C) images and sums them: 'raster' (causal, row-major),
  'bidirectional' (Vision Mamba: raster + reversed) or 'cross' (VMamba: rows, columns and both
  reversed).

* `MambaMixer` is Mamba's token mixer (in_proj -> x, z; conv1d + SiLU; SSM; y * SiLU(z); out_proj) and
  `MambaBlock` is the paper's Figure 1(a): the Gated CNN block of MambaOut with the SSM inserted
  after its convolution, so `mamba_*` and `mambaout_*` variants differ only by the SSM.

`dt_rank='auto'` follows Mamba's one rule, ceil(d_model / 16) with d_model the block's (or mixer's)
model width, not the SSM's inner width (`mamba_dt_rank`).

`A_log` and `D` keep Mamba's names: the trainer's weight-decay mask excludes them by name, as
Mamba's `_no_weight_decay` does.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from mambaout_jax.models.layers import get_act, linear
from mambaout_jax.models.mambaout import VARIANTS as MAMBAOUT_VARIANTS
from mambaout_jax.models.mambaout import GatedCNNBlock, MambaOut
from mambaout_jax.models.registry import register_model
from mambaout_jax.models.ssm import (SCAN_MODES, image_to_sequence, scan_directions,
                                     selective_scan, sequence_to_image)


# ----------------------------------------------------------------------------------------------
# Modules.

class CausalConv1d(nnx.Module):
  """`nn.Conv1d(C, C, k, groups=C, padding=k-1)[..., :L]` on (B, L, C): y_t sees x_{t-k+1..t}.

  kernel: (k, C), kernel[j] multiplies x_{t-(k-1)+j} (PyTorch's weight[:, 0, j]).
  """

  def __init__(self, channels: int, kernel_size: int, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    # PyTorch's default Conv1d init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = k.
    bound = 1.0 / math.sqrt(kernel_size)
    self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (kernel_size, channels),
                                               param_dtype, -bound, bound))
    self.bias = nnx.Param(jax.random.uniform(rngs.params(), (channels,), param_dtype,
                                             -bound, bound))
    self.dtype = dtype

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    w = self.kernel[...].astype(dtype)
    k, length = w.shape[0], x.shape[1]
    xp = jnp.pad(x, ((0, 0), (k - 1, 0), (0, 0)))
    out = sum(xp[:, j:j + length] * w[j] for j in range(k))
    return out + self.bias[...].astype(dtype)


def mamba_dt_rank(d_model: int, dt_rank: int | str = 'auto') -> int:
  """Mamba's rule: dt_rank='auto' is ceil(d_model / 16), d_model the model (block) width."""
  if dt_rank == 'auto':
    return math.ceil(d_model / 16)
  if isinstance(dt_rank, str) or int(dt_rank) < 1:
    raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
  return int(dt_rank)


def dt_bias_init(key, shape, dtype=jnp.float32, dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4):
  """Mamba's dt_proj bias: inverse softplus of dt ~ log-uniform in [dt_min, dt_max]."""
  dt = jnp.exp(jax.random.uniform(key, shape) * (math.log(dt_max) - math.log(dt_min))
               + math.log(dt_min))
  dt = jnp.maximum(dt, dt_init_floor)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


class SelectiveSSM(nnx.Module):
  """Mamba's selective SSM on (B, L, d_inner) sequences (one scan direction).

  [conv1d + SiLU] -> x_proj -> (dt, B, C); dt_proj(dt) is `delta`, its bias `delta_bias`;
  A = -exp(A_log); out = selective_scan(x, delta, A, B, C, D, delta_softplus=True).
  `d_conv=0` leaves the causal conv out (the Mamba block on the MambaOut skeleton has its own conv).
  `dt_rank` is explicit: Mamba's default depends on the enclosing model width, which this module
  does not see (`MambaMixer` and `MambaBlock` pass `mamba_dt_rank(dim)`).
  """

  def __init__(self, d_inner: int, *, dt_rank: int, d_state: int = 16, d_conv: int = 0, dt_min: float = 1e-3, dt_max: float = 0.1, dt_scale: float = 1.0,
               scan_mode: str = 'auto', chunk_size: Optional[int] = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if scan_mode not in SCAN_MODES:
      raise ValueError(f'unknown scan_mode {scan_mode!r}; choose one of {SCAN_MODES}')
    self.d_state, self.dt_rank = d_state, dt_rank
    self.scan_mode, self.chunk_size, self.dtype = scan_mode, chunk_size, dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1d = CausalConv1d(d_inner, d_conv, **kw) if d_conv else None
    self.x_proj = linear(d_inner, dt_rank + 2 * d_state, use_bias=False, **kw)
    dt_std = dt_rank ** -0.5 * dt_scale
    self.dt_proj = nnx.Linear(  # Mamba's dt_init='random': kernel ~ U(-std, std)
        dt_rank, d_inner,
        kernel_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -dt_std, dt_std),
        bias_init=functools.partial(dt_bias_init, dt_min=dt_min, dt_max=dt_max),
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # S4D-real: A = -(1, 2, ..., N) for every channel.
    self.A_log = nnx.Param(jnp.log(jnp.tile(jnp.arange(1, d_state + 1, dtype=param_dtype),
                                            (d_inner, 1))))
    self.D = nnx.Param(jnp.ones((d_inner,), param_dtype))

  def __call__(self, x):
    if self.conv1d is not None:
      x = jax.nn.silu(self.conv1d(x))
    dbc = self.x_proj(x)
    r, n = self.dt_rank, self.d_state
    dt, b, c = dbc[..., :r], dbc[..., r:r + n], dbc[..., r + n:]
    delta = dt @ self.dt_proj.kernel[...].astype(dt.dtype)  # the bias is added in fp32 in the scan
    A = -jnp.exp(self.A_log[...].astype(jnp.float32))
    return selective_scan(x, delta, A, b, c, self.D[...], delta_bias=self.dt_proj.bias[...],
                          delta_softplus=True, mode=self.scan_mode, chunk_size=self.chunk_size)


class SSM2d(nnx.Module):
  """A 2-D scan order over (B, H, W, C) images: one `SelectiveSSM` per direction, outputs summed.

  `remat=True` recomputes the scans in the backward pass and keeps only the input. (Rematerialising
  each direction separately planned more memory for a mamba_tiny TPU train step: 22.4 vs 19.0 GiB.)
  """

  def __init__(self, d_inner: int, *, scan_order: str = 'raster', remat: bool = False,
               **ssm_kwargs):
    self.scan_order, self.remat = scan_order, remat
    self.direction_flags = scan_directions(scan_order)
    self.directions = nnx.List([SelectiveSSM(d_inner, **ssm_kwargs)
                                for _ in self.direction_flags])

  def __call__(self, x):
    if self.remat:
      return nnx.remat(lambda m, x: m.scan(x))(self, x)
    return self.scan(x)

  def scan(self, x):
    _, h, w, _ = x.shape
    out = None
    for ssm, (column_major, reverse) in zip(self.directions, self.direction_flags):
      y = ssm(image_to_sequence(x, column_major, reverse))
      y = sequence_to_image(y, h, w, column_major, reverse)
      out = y if out is None else out + y
    return out


class MambaMixer(nnx.Module):
  """Mamba's token mixer on (B, H, W, C) images, or (B, L, C) sequences (as one row).

  in_proj -> (x, z); per scan direction conv1d + SiLU + SSM; y * SiLU(z); out_proj. With
  scan_order='raster' the output at token t depends only on tokens <= t (row-major order).
  """

  def __init__(self, dim: int, *, expand: float = 2.0, d_state: int = 16, d_conv: int = 4,
               dt_rank: int | str = 'auto', scan_order: str = 'raster', scan_mode: str = 'auto',
               chunk_size: Optional[int] = None, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    d_inner = int(expand * dim)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dt_rank = mamba_dt_rank(dim, dt_rank)
    self.d_inner = d_inner
    self.in_proj = linear(dim, 2 * d_inner, use_bias=False, **kw)
    self.ssm = SSM2d(d_inner, scan_order=scan_order, d_state=d_state, dt_rank=dt_rank,
                     d_conv=d_conv, scan_mode=scan_mode, chunk_size=chunk_size, **kw)
    self.out_proj = linear(d_inner, dim, use_bias=False, **kw)

  def __call__(self, x):
    sequence = x.ndim == 3
    if sequence:
      x = x[:, None]
    x, z = jnp.split(self.in_proj(x), 2, axis=-1)
    y = self.out_proj(self.ssm(x) * jax.nn.silu(z))
    return y[:, 0] if sequence else y


class MambaBlock(GatedCNNBlock):
  """The Mamba block on the MambaOut skeleton: Gated CNN block + SSM (the paper's Figure 1(a)).

  x + DropPath(LS(fc2(act(g) * SSM(act([i, dwconv(c)]))))) with (g, i, c) = split(fc1(LN(x))).
  Same parameters as `GatedCNNBlock` plus `ssm` (an `SSM2d` over the hidden channels), so a
  `mamba_*` variant differs from its `mambaout_*` twin only by the SSM. `remat_ssm` recomputes the
  SSM in the backward pass and keeps only its input: its float32 per-direction activations (delta,
  delta*u, B, C, y, ...) would otherwise dominate training memory (a mamba_tiny train step at batch
  128 planned 74 GiB per chip without it).
  """

  def __init__(self, dim, *, scan_order: str = 'cross', d_state: int = 16,
               dt_rank: int | str = 'auto', scan_mode: str = 'auto',
               chunk_size: Optional[int] = None, remat_ssm: bool = True,
               expansion_ratio=8 / 3, dtype=None, param_dtype=jnp.float32, rngs,
               **gated_cnn_kwargs):
    super().__init__(dim, expansion_ratio=expansion_ratio, dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs, **gated_cnn_kwargs)
    dt_rank = mamba_dt_rank(dim, dt_rank)
    self.ssm = SSM2d(int(expansion_ratio * dim), scan_order=scan_order, remat=remat_ssm,
                     d_state=d_state,
                     dt_rank=dt_rank, scan_mode=scan_mode, chunk_size=chunk_size, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    shortcut = x
    x = self.fc1(self.norm(x))
    hidden, n_id, _ = self.split_indices
    g, i, c = x[..., :hidden], x[..., hidden:hidden + n_id], x[..., hidden + n_id:]
    x = self.act(jnp.concatenate([i, self.conv(c)], axis=-1))
    x = self.ssm(x)
    x = self.fc2(self.act(g) * x)
    if self.ls is not None:
      x = self.ls(x)
    if self.drop_path is not None:
      x = self.drop_path(x)
    return x + shortcut


# ----------------------------------------------------------------------------------------------
# Variants: the MambaOut skeletons with Mamba blocks. Overrides: scan_order, d_state, scan_mode,
# chunk_size, remat_ssm, plus every MambaOut argument (num_classes, drop_path_rate, dtype, ...).

MAMBA_VARIANTS: dict[str, dict[str, Any]] = {
    'mamba_femto': MAMBAOUT_VARIANTS['mambaout_femto'],
    'mamba_tiny': MAMBAOUT_VARIANTS['mambaout_tiny'],
    'mamba_small': MAMBAOUT_VARIANTS['mambaout_small'],
    'mamba_test': MAMBAOUT_VARIANTS['mambaout_test'],
}
_BLOCK_ARGS = ('expansion_ratio', 'kernel_size', 'conv_ratio', 'ls_init_value', 'dwconv_impl')
_BLOCK_DEFAULTS = dict(expansion_ratio=8 / 3, kernel_size=7, conv_ratio=1.0, ls_init_value=None,
                       dwconv_impl='auto')


def _make_mamba_variant(name: str) -> Callable[..., MambaOut]:
  def build(*, rngs: nnx.Rngs, scan_order: str = 'cross', d_state: int = 16,
            scan_mode: str = 'auto', chunk_size: Optional[int] = None, remat_ssm: bool = True,
            **overrides) -> MambaOut:
    cfg = {**MAMBA_VARIANTS[name], **overrides}
    block_kwargs = {k: cfg.pop(k, _BLOCK_DEFAULTS[k]) for k in _BLOCK_ARGS}
    block_kwargs.update(act=get_act(cfg.get('act', 'gelu')), scan_order=scan_order,
                        d_state=d_state, scan_mode=scan_mode, chunk_size=chunk_size,
                        remat_ssm=remat_ssm)
    return MambaOut(**cfg, block_cls=MambaBlock, block_kwargs=block_kwargs, rngs=rngs)
  build.__name__ = name
  build.__doc__ = f'{name}: MambaOut skeleton {MAMBA_VARIANTS[name]} with Mamba blocks (Gated CNN + SSM)'
  return build


for _name in MAMBA_VARIANTS:
  globals()[_name] = register_model(_make_mamba_variant(_name))
