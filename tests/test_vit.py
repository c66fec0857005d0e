"""ViT: parity with timm's DeiT-style ViT-S/16 (weights copied), causal vs fully-visible attention,
bf16, and every registered variant."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mambaout_jax as mo
from mambaout_jax.models import vit


def copy_timm_weights(model, torch_model):
  """Copies a timm VisionTransformer state dict onto our module (names match; layouts differ)."""
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  for key, tensor in torch_model.state_dict().items():
    value = tensor.detach().numpy()
    path = key.split('.')
    leaf = path[-1]
    if leaf == 'weight' and value.ndim == 4:       # conv (out, in, kh, kw) -> (kh, kw, in, out)
      value, leaf = value.transpose(2, 3, 1, 0), 'kernel'
    elif leaf == 'weight' and 'norm' in path[-2]:  # LayerNorm
      leaf = 'scale'
    elif leaf == 'weight':                          # Linear (out, in) -> (in, out)
      value, leaf = value.T, 'kernel'
    path = tuple(int(p) if p.isdigit() else p for p in path[:-1] + [leaf])
    assert path in flat, f'no parameter for timm key {key} ({path})'
    assert flat[path][...].shape == value.shape, key
    flat[path][...] = jnp.asarray(value)
  nnx.update(model, state)


def test_matches_timm_vit_small_patch16():
  torch = pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  torch_model = timm.create_model('vit_small_patch16_224', pretrained=False, img_size=64,
                                  num_classes=7).eval()
  model = mo.create_model('vit_small_patch16', img_size=64, num_classes=7, rngs=nnx.Rngs(0))
  n_ours = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n_ours == sum(p.numel() for p in torch_model.parameters())
  copy_timm_weights(model, torch_model)
  images = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    want = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  got = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _tokens_changed(model, images, patch):
  """Max |change| per token of the final features when only patch `patch` (row-major) changes."""
  p = model.patch_embed.patch_size
  gw = images.shape[2] // p
  r, c = divmod(patch, gw)
  perturbed = images.at[:, r * p:(r + 1) * p, c * p:(c + 1) * p].add(1.0)
  f = nnx.jit(lambda m, x: m.forward_features(x))
  return np.asarray(jnp.abs(f(model, perturbed) - f(model, images)).max(axis=(0, 2)))


def test_causal_attention_is_causal_and_class_token_sees_everything():
  model = mo.create_model('vit_test', attention_mode='causal', rngs=nnx.Rngs(0))
  assert model.class_token_last
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  t = 6  # of 16 patches; tokens are the patches in row-major order, then the class token
  change = _tokens_changed(model, images, t)
  assert change[:t].max() == 0.0
  assert change[t] > 1e-3 and change[t + 1:].min() > 1e-6   # later patches and the class token
  logits = model(images)
  np.testing.assert_allclose(logits, model.head(model.forward_features(images)[:, -1]),
                             rtol=1e-5, atol=1e-6)


def test_fully_visible_attention_is_not_causal():
  model = mo.create_model('vit_test', rngs=nnx.Rngs(0))
  assert not model.class_token_last
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  change = _tokens_changed(model, images, 6)
  assert change.min() > 1e-6  # every token, class token (first) included, sees patch 6


def test_causal_with_class_token_first_sees_nothing():
  """The option exists, and shows why the class token goes last: first, it sees only itself."""
  model = mo.create_model('vit_test', attention_mode='causal', class_token_last=False,
                          rngs=nnx.Rngs(0))
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  logits = model(images)
  np.testing.assert_allclose(model(images + 1.0), logits, rtol=1e-6, atol=1e-6)


def test_bfloat16():
  model = mo.create_model('vit_test', attention_mode='causal', dtype=jnp.bfloat16,
                          rngs=nnx.Rngs(0))
  feats = model.forward_features(jnp.ones((2, 32, 32, 3)))
  assert feats.dtype == jnp.bfloat16 and feats.shape == (2, 17, 32)
  logits = model(jnp.ones((2, 32, 32, 3)))
  assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize('mode', vit.ATTENTION_MODES)
def test_vit_test_trains(mode):
  model = mo.create_model('vit_test', num_classes=4, attention_mode=mode, drop_path_rate=0.1,
                          rngs=nnx.Rngs(0))
  model.train()
  images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  labels = jnp.arange(8) % 4
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def loss_fn(params, rest):
    logits = nnx.merge(graphdef, params, rest)(images)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  loss, grads = jax.value_and_grad(loss_fn)(params, rest)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  assert float(loss_fn(params, rest)) < float(loss)


@pytest.mark.parametrize('name, params_m', [
    ('vit_small_patch16', 22.05), ('vit_base_patch16', 86.57),
    ('vit_small_patch16_causal', 22.05), ('vit_base_patch16_causal', 86.57)])
def test_paper_variants_build(name, params_m):
  """DeiT-S/B parameter counts (timm: 22.05M / 86.57M at 224 px) and output shapes."""
  model = nnx.eval_shape(lambda: mo.create_model(name, rngs=nnx.Rngs(0)))
  count = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert round(count / 1e6, 2) == params_m
  assert model.attention_mode == ('causal' if name.endswith('causal') else 'fully_visible')
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                       jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
  assert out.shape == (2, 1000)


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match='unknown attention_mode'):
    mo.create_model('vit_test', attention_mode='sparse')
  model = mo.create_model('vit_test', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='img_size=64'):
    model(jnp.ones((1, 64, 64, 3)))
