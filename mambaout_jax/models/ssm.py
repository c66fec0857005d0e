"""The selective scan of Mamba's S6 state-space model, as pure functions (no modules, no parameters).

`selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)` has the semantics of mamba_ssm's
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

Also here: `linear_recurrence` (h_t = a_t h_{t-1} + b_t with a hand-written VJP), the per-backend
mode choice (`default_scan_mode`, `set_default_scan_mode`) and the 2-D scan orders that turn an
image into sequences (`scan_directions`, `image_to_sequence`, `sequence_to_image`). The modules that
own Mamba's parameters and use these are in `mambaout_jax.models.mamba`.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

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

def scan_directions(scan_order: str) -> tuple[tuple[bool, bool], ...]:
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
