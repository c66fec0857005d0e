"""The selective state-space model (Mamba's S6) that MambaOut removes, so it can be put back.

Three layers, smallest first:

* `selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)`: the semantics of mamba_ssm's
  `selective_scan_ref` in a (batch, length, channels) layout, computed in float32 (float64 when the
  inputs are float64 under x64) and returned in the input dtype. Three algorithms for the recurrence
  h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t, y_t = <h_t, C_t>:

  - 'associative': one `jax.lax.associative_scan` over the whole length (log depth, but it
    materialises the (B, L, D, N) state tensor: memory O(B L D N)).
  - 'chunked': a `lax.scan` over chunks carrying the state, `associative_scan` inside each chunk,
    rematerialised under `jax.checkpoint`: memory O(B D N chunk + B D N L / chunk). The default on
    TPU/GPU, where the log-depth inner scan keeps the vector units busy.
  - 'sequential': a `lax.scan` over steps that keeps the state in the carry and emits y directly,
    with a hand-written backward pass (a reverse scan that recomputes each chunk's states from a
    checkpoint at the chunk start). The default on CPU, where an associative scan's log depth buys
    nothing and its extra work and memory traffic cost a lot.

* `SelectiveSSM`: one direction of Mamba's SSM with Mamba's parameters and initialisation
  (`x_proj` -> dt, B, C; `dt_proj` with the inverse-softplus dt init; `A_log` = log(1..N) (S4D-real);
  `D` = 1; optionally the depthwise causal conv1d + SiLU in front), on (B, L, C) sequences.
  `SSM2d` runs one `SelectiveSSM` per direction of a 2-D scan order over (B, H, W, C) images and
  sums them: 'raster' (causal, row-major), 'bidirectional' (Vision Mamba: raster + reversed) or
  'cross' (VMamba: rows, columns and both reversed).

* `MambaMixer` is Mamba's token mixer (in_proj -> x, z; conv1d + SiLU; SSM; y * SiLU(z); out_proj) and
  `MambaBlock` is the paper's Figure 1(a): the Gated CNN block of MambaOut with the SSM inserted
  after its convolution, so `mamba_*` and `mambaout_*` variants differ only by the SSM.

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

SCAN_MODES = ('auto', 'associative', 'chunked', 'sequential')
SCAN_ORDERS = ('raster', 'bidirectional', 'cross')
# Steps per chunk when chunk_size=None. 'sequential': measured fastest on CPU. 'chunked': each chunk
# materialises (chunk, B, D, N) float32 tensors in the backward pass; 32 keeps a mamba_tiny train
# step at batch 128 inside a 16 GiB v5e chip (64 planned 16.05 GiB) and was faster on CPU too.
DEFAULT_CHUNK_SIZE = {'sequential': 64, 'chunked': 32}


_SCAN_MODE_OVERRIDE: Optional[str] = None


def set_default_scan_mode(mode: Optional[str]) -> None:
  """Makes mode='auto' mean `mode` (None: per backend again). For compiling TPU programs on a CPU
  host (`mambaout_jax.aot`), where the default backend is not the target."""
  global _SCAN_MODE_OVERRIDE
  if mode is not None and mode not in SCAN_MODES[1:]:
    raise ValueError(f'unknown scan mode {mode!r}; choose one of {SCAN_MODES[1:]} or None')
  _SCAN_MODE_OVERRIDE = mode


def default_scan_mode(backend: Optional[str] = None) -> str:
  """'sequential' on CPU (measured fastest there), 'chunked' on TPU/GPU."""
  if _SCAN_MODE_OVERRIDE is not None and backend is None:
    return _SCAN_MODE_OVERRIDE
  backend = backend or jax.default_backend()
  return 'sequential' if backend == 'cpu' else 'chunked'


# ----------------------------------------------------------------------------------------------
# The linear recurrence h_t = a_t * h_{t-1} + b_t over the leading axis, with a hand-written VJP:
# the cotangent of b is the same recurrence run backwards with a shifted by one step, so the
# backward pass has the forward pass's parallel structure (and no log-depth autodiff residuals).

def _combine(x, y):
  """(a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2): composition of h -> a h + b maps."""
  return x[0] * y[0], y[0] * x[1] + y[1]


def _recurrence(a, b, h0, method: str, reverse: bool = False):
  if method == 'associative':
    edge = -1 if reverse else 0
    b = b.at[edge].add(a[edge] * h0)
    return jax.lax.associative_scan(_combine, (a, b), reverse=reverse)[1]

  def step(h, ab):
    h = ab[0] * h + ab[1]
    return h, h
  return jax.lax.scan(step, h0, (a, b), reverse=reverse)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def linear_recurrence(a, b, h0, method: str = 'associative'):
  """All states h_t = a_t h_{t-1} + b_t (t over axis 0), h_{-1} = h0. method: 'associative'|'sequential'."""
  return _recurrence(a, b, h0, method)


def _linear_recurrence_fwd(a, b, h0, method):
  h = _recurrence(a, b, h0, method)
  return h, (a, h, h0)


def _linear_recurrence_bwd(method, res, g_h):
  a, h, h0 = res
  a_next = jnp.concatenate([a[1:], jnp.zeros_like(a[:1])])
  g_b = _recurrence(a_next, g_h, jnp.zeros_like(h0), method, reverse=True)
  h_prev = jnp.concatenate([h0[None], h[:-1]])
  return g_b * h_prev, g_b, a[0] * g_b[0]


linear_recurrence.defvjp(_linear_recurrence_fwd, _linear_recurrence_bwd)


# ----------------------------------------------------------------------------------------------
# Scan cores. Inputs are already in the compute dtype: delta (after bias/softplus) and
# delta_u = delta * u are (Bt, L, D); A (D, N); B, C (Bt, L, N). They return y (Bt, L, D) and the
# last state (Bt, D, N). Chunked layouts are time-major: (num_chunks, chunk, Bt, F).

def _to_chunks(x, num_chunks: int, chunk: int):
  # Padding with zeros is exact: delta = 0 gives exp(0 A) = 1 and delta u B = 0, so the state is
  # carried through the padded steps unchanged, and their outputs are dropped.
  bsz, length = x.shape[:2]
  x = jnp.pad(x, ((0, 0), (0, num_chunks * chunk - length), (0, 0)))
  return x.reshape(bsz, num_chunks, chunk, -1).transpose(1, 2, 0, 3)


def _from_chunks(x, length: int):
  num_chunks, chunk, bsz = x.shape[:3]
  return x.reshape(num_chunks * chunk, bsz, -1).transpose(1, 0, 2)[:, :length]


def _scan_parallel(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool,
                   chunk: Optional[int]):
  """'associative' (chunk=None: one chunk of the whole length) and 'chunked' (remat per chunk).

  The whole of `selective_scan` happens inside each chunk: full-length arrays stay in the input
  dtype (bf16 in training) and only one chunk's float32 values live at a time.
  """
  bsz, length, dim = u.shape
  dtype_in = u.dtype
  ct = jnp.promote_types(dtype_in, jnp.float32)
  chunk = length if chunk is None else min(chunk, length)
  num_chunks = -(-length // chunk)
  valid = _to_chunks(jnp.ones((1, length, 1), jnp.bool_), num_chunks, chunk)[..., 0, 0]
  xs = tuple(None if x is None else _to_chunks(x, num_chunks, chunk) for x in (u, delta, B, C, z))
  A = A.astype(ct)

  def chunk_step(h, xs):
    (uc, dl, b, c, zc), ok = xs
    uc, dl, b, c = (x.astype(ct) for x in (uc, dl, b, c))
    if delta_bias is not None:
      dl = dl + delta_bias.astype(ct)
    if delta_softplus:
      dl = jax.nn.softplus(dl)
    dl = jnp.where(ok[:, None, None], dl, 0.0)  # padded steps leave the state unchanged
    dA = jnp.exp(dl[..., None] * A)              # (T, Bt, D, N)
    dBu = (dl * uc)[..., None] * b[:, :, None, :]
    hs = linear_recurrence(dA, dBu, h, 'associative')
    y = jnp.einsum('tbdn,tbn->tbd', hs, c)
    if D is not None:
      y = y + uc * D.astype(ct)
    if zc is not None:
      y = y * jax.nn.silu(zc.astype(ct))
    return hs[-1], y.astype(dtype_in)

  h0 = jnp.zeros((bsz, dim, A.shape[1]), ct)
  if num_chunks == 1:
    h_last, ys = chunk_step(h0, jax.tree.map(lambda x: x[0], (xs, valid)))
    ys = ys[None]
  else:
    h_last, ys = jax.lax.scan(jax.checkpoint(chunk_step), h0, (xs, valid))
  return _from_chunks(ys, length), h_last


def _steps(h, A, xs):
  """Steps through one chunk with the state in the carry, emitting y_t and h_t."""
  def step(h, x):
    dl, dlu, b, c = x
    h = jnp.exp(dl[..., None] * A) * h + dlu[..., None] * b[:, None, :]
    return h, (jnp.einsum('bdn,bn->bd', h, c), h)
  return jax.lax.scan(step, h, xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _scan_sequential(delta, delta_u, A, B, C, chunk: int):
  return _scan_sequential_fwd(delta, delta_u, A, B, C, chunk)[0]


def _scan_sequential_fwd(delta, delta_u, A, B, C, chunk):
  bsz, length, dim = delta.shape
  chunk = min(chunk, length)
  num_chunks = -(-length // chunk)
  xs = tuple(_to_chunks(x, num_chunks, chunk) for x in (delta, delta_u, B, C))

  def chunk_step(h, x):
    def step(h, x):  # emits y only: nothing of size (L, Bt, D, N) is kept
      dl, dlu, b, c = x
      h = jnp.exp(dl[..., None] * A) * h + dlu[..., None] * b[:, None, :]
      return h, jnp.einsum('bdn,bn->bd', h, c)
    h_end, y = jax.lax.scan(step, h, x)
    return h_end, (y, h)

  h0 = jnp.zeros((bsz, dim, A.shape[1]), delta.dtype)
  h_last, (ys, h_starts) = jax.lax.scan(chunk_step, h0, xs)
  return (_from_chunks(ys, length), h_last), (xs, A, h_starts)


def _scan_sequential_bwd(chunk, res, cotangents):
  xs, A, h_starts = res
  g_y, g_last = cotangents
  num_chunks, chunk = xs[0].shape[:2]
  length = g_y.shape[1]
  g_ys = _to_chunks(g_y, num_chunks, chunk)

  def chunk_step(carry, x):
    (dl, dlu, b, c), h_start, g_yc = x
    _, (_, hs) = _steps(h_start, A, (dl, dlu, b, c))    # recompute this chunk's states
    h_prev = jnp.concatenate([h_start[None], hs[:-1]])

    def step(carry, x):
      g_next, g_A = carry  # g_next: cotangent flowing into h_t from h_{t+1} (and from g_last)
      dl, dlu, b, c, g_yt, h, hp = x
      dA = jnp.exp(dl[..., None] * A)
      g_h = g_next + g_yt[..., None] * c[:, None, :]
      g_dA_dA = g_h * hp * dA                               # d/d(dl A) of exp(dl A) h_{t-1}
      grads = (jnp.einsum('bdn,dn->bd', g_dA_dA, A),         # delta
               jnp.einsum('bdn,bn->bd', g_h, b),             # delta_u
               jnp.einsum('bdn,bd->bn', g_h, dlu),           # B
               jnp.einsum('bdn,bd->bn', h, g_yt))            # C
      return (dA * g_h, g_A + jnp.einsum('bdn,bd->dn', g_dA_dA, dl)), grads

    return jax.lax.scan(step, carry, (dl, dlu, b, c, g_yc, hs, h_prev), reverse=True)

  init = (g_last, jnp.zeros_like(A))
  (_, g_A), grads = jax.lax.scan(chunk_step, init, (xs, h_starts, g_ys), reverse=True)
  g_delta, g_delta_u, g_B, g_C = (_from_chunks(g, length) for g in grads)
  return g_delta, g_delta_u, g_A, g_B, g_C


_scan_sequential.defvjp(_scan_sequential_fwd, _scan_sequential_bwd)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias):
  if u.ndim != 3:
    raise ValueError(f'u must be (batch, length, channels), got shape {u.shape}')
  bsz, length, dim = u.shape
  if A.ndim != 2 or A.shape[0] != dim:
    raise ValueError(f'A must be (channels={dim}, state), got shape {A.shape}')
  state = A.shape[1]
  expect = {'delta': (delta, (bsz, length, dim)), 'B': (B, (bsz, length, state)),
            'C': (C, (bsz, length, state)), 'D': (D, (dim,)), 'z': (z, (bsz, length, dim)),
            'delta_bias': (delta_bias, (dim,))}
  for name, (x, shape) in expect.items():
    if x is not None and tuple(x.shape) != shape:
      raise ValueError(f'{name} must have shape {shape} (u is {u.shape}, A is {A.shape}), '
                       f'got {tuple(x.shape)}')
  if length == 0:
    raise ValueError('selective_scan needs at least one step (length 0 given)')


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, mode: str = 'auto',
                   chunk_size: Optional[int] = None):
  """Mamba's selective scan (`selective_scan_ref` semantics) in (batch, length, channels) layout.

  u, delta, z: (B, L, D); A: (D, N); B, C: (B, L, N); D, delta_bias: (D,).
    delta <- softplus(delta + delta_bias) (each part optional)
    h_t = exp(delta_t A) * h_{t-1} + delta_t u_t B_t,   y_t = <h_t, C_t> + D u_t,   out = y * silu(z)
  Computed in float32 (float64 for float64 inputs), returned in u's dtype; with
  `return_last_state` also returns h_L, (B, D, N), in the compute dtype. `mode`: 'auto' (per
  backend, see `default_scan_mode`), 'associative', 'chunked' or 'sequential'. `chunk_size`: steps
  per chunk for 'chunked' and 'sequential' (None: `DEFAULT_CHUNK_SIZE[mode]`).
  """
  if mode not in SCAN_MODES:
    raise ValueError(f'unknown scan mode {mode!r}; choose one of {SCAN_MODES}')
  if mode == 'auto':
    mode = default_scan_mode()
  if chunk_size is None:
    chunk_size = DEFAULT_CHUNK_SIZE.get(mode, 64)
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be a positive number of steps, got {chunk_size}')
  _check_shapes(u, delta, A, B, C, D, z, delta_bias)
  if mode != 'sequential':
    y, h_last = _scan_parallel(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                               chunk_size if mode == 'chunked' else None)
    return (y, h_last) if return_last_state else y
  dtype_in = u.dtype
  ct = jnp.promote_types(dtype_in, jnp.float32)
  u, delta, A, B, C = (x.astype(ct) for x in (u, delta, A, B, C))
  if delta_bias is not None:
    delta = delta + delta_bias.astype(ct)
  if delta_softplus:
    delta = jax.nn.softplus(delta)
  y, h_last = _scan_sequential(delta, delta * u, A, B, C, chunk_size)
  if D is not None:
    y = y + u * D.astype(ct)
  if z is not None:
    y = y * jax.nn.silu(z.astype(ct))
  y = y.astype(dtype_in)
  return (y, h_last) if return_last_state else y


# ----------------------------------------------------------------------------------------------
# 2-D scan orders: an image (B, H, W, C) becomes one (B, H*W, C) sequence per direction, and the
# directions' outputs are mapped back to pixels and summed.

def _directions(scan_order: str) -> tuple[tuple[bool, bool], ...]:
  """(column-major?, reversed?) per direction."""
  if scan_order == 'raster':
    return ((False, False),)
  if scan_order == 'bidirectional':
    return ((False, False), (False, True))
  if scan_order == 'cross':
    return ((False, False), (True, False), (False, True), (True, True))
  raise ValueError(f'unknown scan_order {scan_order!r}; choose one of {SCAN_ORDERS}')


def image_to_sequence(x, column_major: bool, reverse: bool):
  b, h, w, c = x.shape
  if column_major:
    x = x.transpose(0, 2, 1, 3)
  x = x.reshape(b, h * w, c)
  return x[:, ::-1] if reverse else x


def sequence_to_image(x, h: int, w: int, column_major: bool, reverse: bool):
  if reverse:
    x = x[:, ::-1]
  b, _, c = x.shape
  if column_major:
    return x.reshape(b, w, h, c).transpose(0, 2, 1, 3)
  return x.reshape(b, h, w, c)


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
  """

  def __init__(self, d_inner: int, *, d_state: int = 16, dt_rank: int | str = 'auto',
               d_conv: int = 0, dt_min: float = 1e-3, dt_max: float = 0.1, dt_scale: float = 1.0,
               scan_mode: str = 'auto', chunk_size: Optional[int] = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if scan_mode not in SCAN_MODES:
      raise ValueError(f'unknown scan_mode {scan_mode!r}; choose one of {SCAN_MODES}')
    dt_rank = math.ceil(d_inner / 16) if dt_rank == 'auto' else int(dt_rank)
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
    self.direction_flags = _directions(scan_order)
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
    if dt_rank == 'auto':
      dt_rank = math.ceil(dim / 16)  # Mamba: ceil(d_model / 16)
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
    if dt_rank == 'auto':
      dt_rank = math.ceil(dim / 16)
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
