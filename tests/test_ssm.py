"""Selective scan vs a float64 NumPy transcription of mamba_ssm's `selective_scan_ref`, forward and
gradients, for every mode; the SSM modules' initialisation and causality; the Mamba-block variants."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mambaout_jax as mo
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


@pytest.mark.parametrize('mode', MODES)
def test_bfloat16_inputs_compute_in_float32(mode):
  x = random_inputs(5, 2, 20, 4, 3)
  bf = {k: jnp.asarray(v, jnp.bfloat16) for k, v in x.items()}
  args = [bf.pop(k) for k in GRAD_ARGS[:5]]
  got = scan(*args, **bf, delta_softplus=True, mode=mode,
             chunk_size=8)
  want, _ = reference_scan(**{k: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32)
                              for k, v in x.items()}, delta_softplus=True)
  assert got.dtype == jnp.bfloat16 and got.shape == (2, 20, 4)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)


def test_bad_inputs_raise_clear_errors():
  x = {k: jnp.asarray(v) for k, v in random_inputs(0, 2, 5, 4, 3).items()}
  with pytest.raises(ValueError, match='B must have shape'):
    ssm.selective_scan(**{**x, 'B': x['B'][:, :, :2]})
  with pytest.raises(ValueError, match='unknown scan mode'):
    ssm.selective_scan(**x, mode='parallel')
  with pytest.raises(ValueError, match='unknown scan_order'):
    ssm.SSM2d(8, scan_order='zigzag', rngs=nnx.Rngs(0))


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


def test_selective_ssm_initialisation_follows_mamba():
  m = ssm.SelectiveSSM(64, d_state=16, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(jnp.exp(m.A_log[...]), np.tile(np.arange(1, 17), (64, 1)), rtol=1e-6)
  np.testing.assert_array_equal(m.D[...], np.ones(64))
  dt = jax.nn.softplus(m.dt_proj.bias[...])
  assert m.dt_rank == 4 and float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001
  assert float(jnp.abs(m.dt_proj.kernel[...]).max()) <= 4 ** -0.5
  assert {'A_log', 'D'} <= {str(path[-1]) for path, _ in nnx.to_flat_state(nnx.state(m))}


def test_scan_orders_round_trip_pixels():
  x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
  for column_major, reverse in itertools.product([False, True], repeat=2):
    seq = ssm.image_to_sequence(x, column_major, reverse)
    np.testing.assert_array_equal(ssm.sequence_to_image(seq, 3, 4, column_major, reverse), x)
  np.testing.assert_array_equal(ssm.image_to_sequence(x, True, False)[:, 1], x[:, 1, 0])


def _change_per_token(module, x, t):
  """|f(x') - f(x)| per token (row-major order) where x' perturbs only token t."""
  b, h, w, c = x.shape
  x2 = x.reshape(b, h * w, c).at[:, t].add(10.0).reshape(x.shape)
  f = nnx.jit(lambda m, x: m(x))
  diff = jnp.abs(f(module, x2) - f(module, x)).reshape(b, h * w, -1)
  return np.asarray(diff.max(axis=(0, 2)))


@pytest.mark.parametrize('scan_order', ssm.SCAN_ORDERS)
def test_raster_mixer_is_causal_and_other_orders_are_not(scan_order):
  mixer = ssm.MambaMixer(8, d_state=4, scan_order=scan_order, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 4, 5, 8))
  t = 9
  change = _change_per_token(mixer, x, t)
  assert change[t] > 1e-3 and change[t + 1] > 1e-6  # the perturbed token and later ones change
  if scan_order == 'raster':
    assert change[:t].max() == 0.0
  else:
    assert change[:t].max() > 1e-6


def test_mixer_on_sequences_and_conv_is_causal():
  mixer = ssm.MambaMixer(8, d_state=4, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(1), (2, 12, 8))
  f = nnx.jit(lambda m, x: m(x))
  y = f(mixer, x)
  assert y.shape == (2, 12, 8)
  np.testing.assert_allclose(f(mixer, x[:, :7]), y[:, :7], rtol=1e-5, atol=1e-6)


def test_mixer_bfloat16():
  mixer = ssm.MambaMixer(8, d_state=4, scan_order='cross', dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8), jnp.bfloat16)
  y = mixer(x)
  assert y.dtype == jnp.bfloat16 and y.shape == x.shape and bool(jnp.isfinite(y).all())


# ----------------------------------------------------------------------------------------------
# Variants.

def _param_count(model):
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_mamba_variants_are_registered():
  assert {'mamba_femto', 'mamba_tiny', 'mamba_small', 'mamba_test'} <= set(mo.list_models())


def test_mamba_test_variant_trains():
  """Forward + backward; the SSM gets gradients; an SGD step lowers the loss. (One block per
  stage and two scan directions keep the compile short: each scan is compiled separately.)"""
  model = mo.create_model('mamba_test', num_classes=5, depths=(1, 1, 1, 1), kernel_size=3,
                          scan_order='bidirectional', drop_path_rate=0.1, rngs=nnx.Rngs(0))
  model.train()
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  labels = jnp.arange(4) % 5
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def loss_fn(params, rest):
    logits = nnx.merge(graphdef, params, rest)(images)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, rest)
  flat = nnx.to_flat_state(grads)
  ssm_grads = [v for path, v in flat if 'ssm' in map(str, path)]
  assert ssm_grads and all(bool(jnp.isfinite(g[...]).all()) for g in ssm_grads)
  assert any(float(jnp.abs(v[...]).max()) > 0 for path, v in flat if str(path[-1]) == 'A_log')
  new_params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
  assert float(loss_fn(new_params, rest)) < float(loss)


@pytest.mark.parametrize('name', ['mamba_femto', 'mamba_tiny'])
def test_paper_sized_mamba_variants_build(name):
  """A Mamba block adds the SSM to MambaOut's Gated CNN block and nothing else (abstract build)."""
  def count(model, only_ssm=False):
    return sum(p.size for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param))
               if not only_ssm or 'ssm' in map(str, path))
  model = nnx.eval_shape(lambda: mo.create_model(name, scan_order='bidirectional',
                                                 rngs=nnx.Rngs(0)))
  twin = nnx.eval_shape(lambda: mo.create_model(name.replace('mamba_', 'mambaout_'),
                                                rngs=nnx.Rngs(0)))
  assert count(model) == count(twin) + count(model, only_ssm=True) > count(twin)
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                       jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  assert out.shape == (2, 1000) and out.dtype == jnp.float32


def test_mamba_block_bfloat16_and_scan_orders():
  """bf16 activations in, bf16 out; each scan order gives a different (finite) block output."""
  outs = {}
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 16), jnp.bfloat16)
  for order in ssm.SCAN_ORDERS:
    block = ssm.MambaBlock(16, scan_order=order, d_state=4, dtype=jnp.bfloat16,
                           rngs=nnx.Rngs(0))
    outs[order] = nnx.jit(lambda m, x: m(x))(block, x)
    assert outs[order].dtype == jnp.bfloat16 and outs[order].shape == x.shape
    assert bool(jnp.isfinite(outs[order]).all())
  assert float(jnp.abs(outs['raster'] - outs['cross']).max()) > 0
