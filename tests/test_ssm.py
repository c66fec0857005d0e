"""Selective scan vs a float64 NumPy transcription of mamba_ssm's `selective_scan_ref`, forward and
gradients, for every mode; bf16 inputs with a float32 recurrence; the per-backend mode; 2-D orders."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mambaout_jax.models import ssm

MODES = ('associative', 'chunked', 'sequential')
GRAD_ARGS = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')


def scan(*args, mode, chunk_size=64, **kwargs):
  """`selective_scan` under jit (eager dispatch of the scans' many small ops is slow)."""
  return jax.jit(functools.partial(ssm.selective_scan, mode=mode, chunk_size=chunk_size,
                                   **kwargs))(*args)


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
  """`selective_scan_ref` as a float64 NumPy loop, in (batch, length, channels) layout."""
  u, delta, A, B, C = (np.asarray(x, np.float64) for x in (u, delta, A, B, C))
  if delta_bias is not None:
    delta = delta + np.asarray(delta_bias, np.float64)
  if delta_softplus:
    delta = np.log1p(np.exp(delta))
  bsz, length, dim = u.shape
  h = np.zeros((bsz, dim, A.shape[1]))
  ys = []
  for t in range(length):
    h = np.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
    ys.append(np.einsum('bdn,bn->bd', h, C[:, t]))
  y = np.stack(ys, axis=1)
  if D is not None:
    y = y + u * np.asarray(D, np.float64)
  if z is not None:
    z = np.asarray(z, np.float64)
    y = y * z / (1 + np.exp(-z))
  return y, h


def random_inputs(seed, bsz, length, dim, state, dtype=np.float32):
  rng = np.random.default_rng(seed)
  f = lambda *s: rng.standard_normal(s).astype(dtype)
  return dict(u=f(bsz, length, dim), delta=(0.5 * f(bsz, length, dim) - 1.0).astype(dtype),
              A=-np.exp(0.5 * f(dim, state)).astype(dtype), B=f(bsz, length, state),
              C=f(bsz, length, state), D=f(dim), z=f(bsz, length, dim),
              delta_bias=(0.1 * f(dim)).astype(dtype))


# (batch, length, dim, state, chunk): L = 1, L not divisible by the chunk, L < chunk, L = k chunks.
SHAPES = [(2, 1, 3, 2, 4), (2, 37, 5, 4, 8), (1, 13, 4, 3, 64), (3, 32, 6, 5, 16)]


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_forward_matches_reference(mode, shape):
  bsz, length, dim, state, chunk = shape
  x = random_inputs(0, bsz, length, dim, state)
  want, want_h = reference_scan(**x, delta_softplus=True)
  got, got_h = scan(*(jnp.asarray(x[k]) for k in GRAD_ARGS[:5]), D=jnp.asarray(x['D']),
                    z=jnp.asarray(x['z']), delta_bias=jnp.asarray(x['delta_bias']),
                    delta_softplus=True, return_last_state=True, mode=mode, chunk_size=chunk)
  assert got.dtype == jnp.float32 and got.shape == (bsz, length, dim)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(got_h, want_h, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('mode', MODES)
def test_optional_inputs_follow_reference(mode):
  """D, z and delta_bias are each optional; without softplus delta is used as given."""
  x = random_inputs(1, 2, 11, 4, 3)
  x['delta'] = np.abs(x['delta'])
  for drop in [('D', 'z', 'delta_bias'), ('z',), ('D',)]:
    kw = {k: v for k, v in x.items() if k not in drop}
    want, _ = reference_scan(**kw)
    args = [jnp.asarray(kw.pop(k)) for k in GRAD_ARGS[:5]]
    got = scan(*args, **{k: jnp.asarray(v) for k, v in kw.items()}, mode=mode, chunk_size=4)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def _loss_and_grads(x, weights, mode, chunk, with_last_state):
  def loss(*args):
    y, h = ssm.selective_scan(*args[:5], D=args[5], z=args[6], delta_bias=args[7],
                              delta_softplus=True, return_last_state=True, mode=mode,
                              chunk_size=chunk)
    out = jnp.sum(y * weights[0])
    return out + jnp.sum(h * weights[1]) if with_last_state else out
  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(8))))


@pytest.mark.parametrize('shape', [(2, 1, 3, 2, 4), (2, 19, 4, 3, 8)],
                         ids=lambda s: 'x'.join(map(str, s)))
def test_gradients_match_finite_differences_in_float64(shape):
  """All modes give the same gradients w.r.t. every input, equal to central differences (f64)."""
  bsz, length, dim, state, chunk = shape
  with jax.enable_x64(True):
    x = random_inputs(2, bsz, length, dim, state, np.float64)
    args = [jnp.asarray(x[k]) for k in GRAD_ARGS]
    rng = np.random.default_rng(3)
    weights = (jnp.asarray(rng.standard_normal((bsz, length, dim))),
               jnp.asarray(rng.standard_normal((bsz, dim, state))))
    grads = {}
    for mode in MODES:
      value, grads[mode] = _loss_and_grads(x, weights, mode, chunk, True)(*args)
      assert value.dtype == jnp.float64
    for mode in MODES[1:]:
      for name, g, g0 in zip(GRAD_ARGS, grads[mode], grads[MODES[0]]):
        np.testing.assert_allclose(g, g0, rtol=1e-9, atol=1e-9, err_msg=f'{mode} d/d{name}')
    # Directional derivatives along random directions, per input, against central differences.
    f = _loss_and_grads(x, weights, 'sequential', chunk, True)
    eps = 1e-6
    for i, name in enumerate(GRAD_ARGS):
      v = jnp.asarray(rng.standard_normal(args[i].shape))
      plus = [a + eps * v if j == i else a for j, a in enumerate(args)]
      minus = [a - eps * v if j == i else a for j, a in enumerate(args)]
      fd = (f(*plus)[0] - f(*minus)[0]) / (2 * eps)
      analytic = jnp.vdot(grads['sequential'][i], v)
      np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-7, err_msg=f'd/d{name}')


def test_gradients_float32_agree_across_modes():
  x = random_inputs(4, 2, 45, 6, 4)
  args = [jnp.asarray(x[k]) for k in GRAD_ARGS]
  weights = (jnp.ones((2, 45, 6)), jnp.ones((2, 6, 4)))
  results = [_loss_and_grads(x, weights, mode, 16, False)(*args) for mode in MODES]
  for (v, g), (v0, g0) in zip(results[1:], results[:1] * 2):
    np.testing.assert_allclose(v, v0, rtol=1e-5)
    for name, a, b in zip(GRAD_ARGS, g, g0):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


def _assert_float32_accuracy(got_bf16, want):
  """`got_bf16` is the float64 answer rounded once to bf16: within 2^-8 |want| (half a bf16 ulp is at
  most 2^-8 relative) plus float32 roundoff. A recurrence carried in bf16 (2^-8 rounding per step
  over a slowly decaying state) misses this by far on a long sequence."""
  got = np.asarray(got_bf16, np.float64)
  np.testing.assert_array_less(np.abs(got - want), 2.0 ** -8 * np.abs(want) + 1e-5 * np.abs(want).max())


def _bf16_inputs(length):
  """bf16 inputs with slow decay (softplus(delta) ~ 0.02, |A| ~ 1): the state sums ~50 steps."""
  x = random_inputs(5, 2, length, 4, 3)
  x['delta'] = (x['delta'] - 3.0).astype(np.float32)
  bf = {k: jnp.asarray(v, jnp.bfloat16) for k, v in x.items()}
  want, _ = reference_scan(**{k: np.asarray(v, np.float64) for k, v in bf.items()},
                           delta_softplus=True)
  return bf, want


@pytest.mark.parametrize('mode', MODES)
def test_bfloat16_inputs_compute_in_float32(mode):
  """bf16 in, bf16 out, and a float32 recurrence inside: on 1024 steps the output is the float64
  answer (on the same bf16 inputs) rounded once to bf16."""
  bf, want = _bf16_inputs(1024)
  args = [bf.pop(k) for k in GRAD_ARGS[:5]]
  got = scan(*args, **bf, delta_softplus=True, mode=mode, chunk_size=64)
  assert got.dtype == jnp.bfloat16 and got.shape == (2, 1024, 4)
  _assert_float32_accuracy(got, want)


def test_bfloat16_check_rejects_a_bfloat16_recurrence():
  """The check above fails for a scan whose state is carried in bf16 (everything else float32)."""
  bf, want = _bf16_inputs(1024)
  u, delta, A, B, C = (bf[k].astype(jnp.float32) for k in GRAD_ARGS[:5])
  delta = jax.nn.softplus(delta + bf['delta_bias'].astype(jnp.float32))

  def step(h, x):
    dl, ut, b, c = x
    h = (jnp.exp(dl[..., None] * A) * h + (dl * ut)[..., None] * b[:, None, :]).astype(jnp.bfloat16)
    return h, jnp.einsum('bdn,bn->bd', h.astype(jnp.float32), c)

  h0 = jnp.zeros((2, 4, 3), jnp.bfloat16)
  xs = tuple(jnp.swapaxes(x, 0, 1) for x in (delta, u, B, C))
  y = jnp.swapaxes(jax.jit(lambda xs: jax.lax.scan(step, h0, xs)[1])(xs), 0, 1)
  z = bf['z'].astype(jnp.float32)
  y = ((y + u * bf['D'].astype(jnp.float32)) * jax.nn.silu(z)).astype(jnp.bfloat16)
  with pytest.raises(AssertionError):
    _assert_float32_accuracy(y, want)


def test_bad_inputs_raise_clear_errors():
  x = {k: jnp.asarray(v) for k, v in random_inputs(0, 2, 5, 4, 3).items()}
  with pytest.raises(ValueError, match='B must have shape'):
    ssm.selective_scan(**{**x, 'B': x['B'][:, :, :2]})
  with pytest.raises(ValueError, match='unknown scan mode'):
    ssm.selective_scan(**x, mode='parallel')
  with pytest.raises(ValueError, match='unknown scan_order'):
    ssm.scan_directions('zigzag')


def test_auto_mode_picks_per_backend():
  assert ssm.default_scan_mode('cpu') == 'sequential'
  assert ssm.default_scan_mode('tpu') == 'chunked'
  assert ssm.default_scan_mode('gpu') == 'chunked'
  assert ssm.default_scan_mode() == 'sequential'  # tests run on CPU
  ssm.set_default_scan_mode('chunked')  # what aot.py does to compile TPU programs on a CPU host
  try:
    assert ssm.default_scan_mode() == 'chunked'
  finally:
    ssm.set_default_scan_mode(None)
  assert ssm.default_scan_mode() == 'sequential'


def test_memory_does_not_hold_the_state_sequence():
  """XLA's plan for forward + backward: 'sequential' and 'chunked' keep a few (B, L, D) arrays,
  never the (B, L, D, N) state sequence that 'associative' materialises (several times over)."""
  bsz, length, dim, state = 2, 4096, 32, 16
  x = random_inputs(0, bsz, length, dim, state)
  args = [jnp.asarray(x[k]) for k in GRAD_ARGS]
  temp = {}
  for mode in MODES:
    loss = lambda *a, mode=mode: jnp.sum(ssm.selective_scan(
        *a[:5], D=a[5], z=a[6], delta_bias=a[7], delta_softplus=True, mode=mode))
    compiled = jax.jit(jax.grad(loss, argnums=tuple(range(8)))).lower(*args).compile()
    temp[mode] = compiled.memory_analysis().temp_size_in_bytes
  per_token_array = bsz * length * dim * 4
  assert temp['associative'] > state * per_token_array  # >= one state sequence
  for mode in ('sequential', 'chunked'):
    assert temp[mode] < 16 * per_token_array, (mode, temp)
    assert temp[mode] < 0.1 * temp['associative'], (mode, temp)


def test_scan_orders_round_trip_pixels():
  x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
  for column_major, reverse in itertools.product([False, True], repeat=2):
    seq = ssm.image_to_sequence(x, column_major, reverse)
    np.testing.assert_array_equal(ssm.sequence_to_image(seq, 3, 4, column_major, reverse), x)
  np.testing.assert_array_equal(ssm.image_to_sequence(x, True, False)[:, 1], x[:, 1, 0])
