"""Mamba's SSM modules: initialisation and dt_rank rule, causality of the scan orders, bf16, and the
Mamba-block variants (the MambaOut skeletons with the SSM put back)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from sgd_check import sgd_step

import mambaout_jax as mo
from mambaout_jax.models import mamba, ssm

def test_selective_ssm_initialisation_follows_mamba():
  m = mamba.SelectiveSSM(64, dt_rank=4, d_state=16, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(jnp.exp(m.A_log[...]), np.tile(np.arange(1, 17), (64, 1)), rtol=1e-6)
  np.testing.assert_array_equal(m.D[...], np.ones(64))
  dt = jax.nn.softplus(m.dt_proj.bias[...])
  assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001
  assert float(jnp.abs(m.dt_proj.kernel[...]).max()) <= 4 ** -0.5
  assert {'A_log', 'D'} <= {str(path[-1]) for path, _ in nnx.to_flat_state(nnx.state(m))}


def test_dt_rank_is_ceil_of_model_width_over_16():
  """Mamba's rule, dt_rank = ceil(d_model / 16), with d_model the mixer's / block's width (40 -> 3),
  not the SSM's inner width (mixer: 2 * 40 -> 5; block: int(8/3 * 40) = 106 -> 7)."""
  mixer = mamba.MambaMixer(40, d_state=4, rngs=nnx.Rngs(0))
  block = mamba.MambaBlock(40, d_state=4, scan_order='raster', rngs=nnx.Rngs(0))
  for ssm_module, d_inner in ((mixer.ssm.directions[0], 80), (block.ssm.directions[0], 106)):
    assert ssm_module.dt_rank == 3
    assert ssm_module.dt_proj.kernel.shape == (3, d_inner)
    assert ssm_module.x_proj.kernel.shape == (d_inner, 3 + 2 * 4)
  assert mamba.MambaMixer(40, d_state=4, dt_rank=5, rngs=nnx.Rngs(0)).ssm.directions[0].dt_rank == 5
  with pytest.raises(ValueError, match='dt_rank'):
    mamba.MambaMixer(40, dt_rank='full', rngs=nnx.Rngs(0))


def _change_per_token(module, x, t):
  """|f(x') - f(x)| per token (row-major order) where x' perturbs only token t."""
  b, h, w, c = x.shape
  x2 = x.reshape(b, h * w, c).at[:, t].add(10.0).reshape(x.shape)
  f = nnx.jit(lambda m, x: m(x))
  diff = jnp.abs(f(module, x2) - f(module, x)).reshape(b, h * w, -1)
  return np.asarray(diff.max(axis=(0, 2)))


@pytest.mark.parametrize('scan_order', ssm.SCAN_ORDERS)
def test_raster_mixer_is_causal_and_other_orders_are_not(scan_order):
  mixer = mamba.MambaMixer(8, d_state=4, scan_order=scan_order, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (2, 4, 5, 8))
  t = 9
  change = _change_per_token(mixer, x, t)
  assert change[t] > 1e-3 and change[t + 1] > 1e-6  # the perturbed token and later ones change
  if scan_order == 'raster':
    assert change[:t].max() == 0.0
  else:
    assert change[:t].max() > 1e-6


def test_mixer_on_sequences_and_conv_is_causal():
  mixer = mamba.MambaMixer(8, d_state=4, rngs=nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(1), (2, 12, 8))
  f = nnx.jit(lambda m, x: m(x))
  y = f(mixer, x)
  assert y.shape == (2, 12, 8)
  np.testing.assert_allclose(f(mixer, x[:, :7]), y[:, :7], rtol=1e-5, atol=1e-6)


def test_mixer_bfloat16():
  mixer = mamba.MambaMixer(8, d_state=4, scan_order='cross', dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
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
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  loss, grads, new_loss = sgd_step(model, images, jnp.arange(4) % 5, lr=0.05)
  flat = nnx.to_flat_state(grads)
  ssm_grads = [v for path, v in flat if 'ssm' in map(str, path)]
  assert ssm_grads and all(bool(jnp.isfinite(g[...]).all()) for g in ssm_grads)
  assert any(float(jnp.abs(v[...]).max()) > 0 for path, v in flat if str(path[-1]) == 'A_log')
  assert new_loss < loss


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
  for stage, dim in zip(model.stages, mamba.MAMBA_VARIANTS[name]['dims']):  # Mamba: ceil(dim / 16)
    assert stage.blocks[0].ssm.directions[0].dt_proj.kernel.shape[0] == math.ceil(dim / 16)
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                       jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32))
  assert out.shape == (2, 1000) and out.dtype == jnp.float32


def test_mamba_block_bfloat16_and_scan_orders():
  """bf16 activations in, bf16 out; each scan order gives a different (finite) block output."""
  outs = {}
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 16), jnp.bfloat16)
  for order in ssm.SCAN_ORDERS:
    block = mamba.MambaBlock(16, scan_order=order, d_state=4, dtype=jnp.bfloat16,
                           rngs=nnx.Rngs(0))
    outs[order] = nnx.jit(lambda m, x: m(x))(block, x)
    assert outs[order].dtype == jnp.bfloat16 and outs[order].shape == x.shape
    assert bool(jnp.isfinite(outs[order]).all())
  assert float(jnp.abs(outs['raster'] - outs['cross']).max()) > 0
