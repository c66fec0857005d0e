"""ViT: parity with timm's DeiT-style ViT-S/16 (weights copied), causal vs fully-visible attention,
bf16, and every registered variant."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from sgd_check import sgd_step

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


def randomise_(torch_model, seed=0):
  """Every timm parameter random and non-default (timm's init zeroes biases, sets norms to identity
  and the class token to ~0, which would hide a dropped bias or swapped norms): weights ~ N(0, 1/fan_in),
  norm scales 1 + N(0, 0.3^2), everything else N(0, 0.3^2)."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in torch_model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith('weight') and p.ndim >= 2:
        p.copy_(noise / p[0].numel() ** 0.5)
      elif name.endswith('weight'):
        p.copy_(1.0 + 0.3 * noise)
      else:
        p.copy_(0.3 * noise)


def test_matches_timm_vit_small_patch16():
  """Logits equal timm's with every parameter randomised; and dropping a qkv bias, swapping a
  block's two norms or dropping the final norm's bias would show (each moves the logits far)."""
  torch = pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  torch_model = timm.create_model('vit_small_patch16_224', pretrained=False, img_size=64,
                                  num_classes=7).eval()
  randomise_(torch_model)
  model = mo.create_model('vit_small_patch16', img_size=64, num_classes=7, rngs=nnx.Rngs(0))
  n_ours = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n_ours == sum(p.numel() for p in torch_model.parameters())
  copy_timm_weights(model, torch_model)
  images = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    want = torch_model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  forward = nnx.jit(lambda m, x: m(x))
  atol = 1e-4 * np.abs(want).max()
  np.testing.assert_allclose(forward(model, jnp.asarray(images)), want, rtol=1e-4, atol=atol)

  block = model.blocks[3]
  breaks = {
      'qkv bias dropped': [(block.attn.qkv.bias, jnp.zeros_like(block.attn.qkv.bias[...]))],
      'norm1/norm2 swapped': [(block.norm1.scale, block.norm2.scale[...]),
                              (block.norm1.bias, block.norm2.bias[...]),
                              (block.norm2.scale, block.norm1.scale[...]),
                              (block.norm2.bias, block.norm1.bias[...])],
      'final norm bias dropped': [(model.norm.bias, jnp.zeros_like(model.norm.bias[...]))],
  }
  for what, edits in breaks.items():
    saved = [(param, param[...]) for param, _ in edits]
    for param, value in edits:
      param[...] = value
    change = float(np.abs(np.asarray(forward(model, jnp.asarray(images))) - want).max())
    assert change > 100 * atol, (what, change, atol)
    for param, value in saved:
      param[...] = value


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
  images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  loss, grads, new_loss = sgd_step(model, images, jnp.arange(8) % 4, lr=0.1)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  assert new_loss < loss


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
