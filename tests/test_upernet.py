"""UperNet: backbone stage outputs, UPerHead + FCN auxiliary head against an independent PyTorch
implementation (written here from mmsegmentation's description, timm's MambaOut as backbone) on the
same weights; PyTorch-equivalent resize and adaptive pooling; BatchNorm training semantics."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

import jax
import jax.numpy as jnp
import mambaout_jax as mo
from mambaout_jax import params as params_lib
from mambaout_jax.convert import to_torch_layout, torch_key
from mambaout_jax.models import upernet

import torch_reference as ref

NUM_CLASSES = 5
IMAGE = (2, 72, 104)  # strides 4..32: 18x26, 9x13, 5x7, 3x4 (odd sizes, overlapping 6-bin pooling)


def rel_err(a, b):
  return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


# ----------------------------------------------------------------------------------------------
# The reference: mmsegmentation's UPerHead / FCNHead from their description, in PyTorch (NCHW).

class TConvModule(nn.Module):
  def __init__(self, cin, cout, k):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
    self.bn = nn.BatchNorm2d(cout)  # momentum 0.1, eps 1e-5

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def up(x, size):
  return F.interpolate(x, size=size, mode='bilinear', align_corners=False)


class TUPerHead(nn.Module):
  def __init__(self, in_channels, channels, num_classes, pool_scales=(1, 2, 3, 6)):
    super().__init__()
    self.pools = nn.ModuleList([nn.AdaptiveAvgPool2d(s) for s in pool_scales])
    self.psp_modules = nn.ModuleList([TConvModule(in_channels[-1], channels, 1)
                                      for _ in pool_scales])
    self.bottleneck = TConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3)
    self.lateral_convs = nn.ModuleList([TConvModule(c, channels, 1) for c in in_channels[:-1]])
    self.fpn_convs = nn.ModuleList([TConvModule(channels, channels, 3) for _ in in_channels[:-1]])
    self.fpn_bottleneck = TConvModule(len(in_channels) * channels, channels, 3)
    self.conv_seg = nn.Conv2d(channels, num_classes, 1)

  def forward(self, feats):
    x = feats[-1]
    psp = [x] + [up(conv(pool(x)), x.shape[2:])
                 for pool, conv in zip(self.pools, self.psp_modules)]
    lat = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
    lat.append(self.bottleneck(torch.cat(psp, 1)))
    for i in range(3, 0, -1):
      lat[i - 1] = lat[i - 1] + up(lat[i], lat[i - 1].shape[2:])
    outs = [conv(lat[i]) for i, conv in enumerate(self.fpn_convs)] + [lat[3]]
    outs = [outs[0]] + [up(o, outs[0].shape[2:]) for o in outs[1:]]
    return self.conv_seg(self.fpn_bottleneck(torch.cat(outs, 1)))  # dropout: identity in eval


class TUperNet(nn.Module):
  def __init__(self, timm_model, dims, channels, aux_channels, num_classes):
    super().__init__()
    self.body = timm_model
    self.norms = nn.ModuleList([nn.LayerNorm(d, eps=1e-6) for d in dims])
    self.decode_head = TUPerHead(dims, channels, num_classes)
    self.aux_conv = TConvModule(dims[2], aux_channels, 3)
    self.aux_seg = nn.Conv2d(aux_channels, num_classes, 1)

  def forward(self, x_nhwc):
    x = x_nhwc.permute(0, 3, 1, 2)
    feats = self.body.forward_intermediates(x, output_fmt='NHWC', intermediates_only=True)
    feats = [n(f).permute(0, 3, 1, 2) for n, f in zip(self.norms, feats)]
    return feats, self.decode_head(feats), self.aux_seg(self.aux_conv(feats[2]))


_BN = {'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}


def torch_name(path):
  """Our parameter path -> the reference module's state-dict key."""
  path = tuple(str(p) for p in path)
  if path[0] == 'backbone':
    if path[1].startswith('norm'):
      return f'norms.{path[1][4:]}.' + {'scale': 'weight', 'bias': 'bias'}[path[2]]
    return 'body.' + torch_key(path[1:])
  if path[0] == 'auxiliary_head':
    head = {'convs': 'aux_conv', 'conv_seg': 'aux_seg'}[path[1]]
    rest = path[3:] if path[1] == 'convs' else path[2:]
  else:
    head, rest = 'decode_head.' + path[1], path[2:]
    if path[1] in ('psp_modules', 'lateral_convs', 'fpn_convs'):
      head, rest = f'{head}.{path[2]}', path[3:]
  if rest[0] == 'bn':
    return f'{head}.bn.{_BN[rest[1]]}'
  leaf = {'kernel': 'weight', 'bias': 'bias'}[rest[-1]]
  return '.'.join((head,) + rest[:-1] + (leaf,))


def randomize(model, seed=0):
  """Every parameter and BatchNorm statistic random (no default can hide a mis-mapped one)."""
  rs = np.random.RandomState(seed)
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  for path, var in nnx.to_flat_state(state):
    shape = var.get_value().shape
    if path[-1] == 'var':
      v = rs.uniform(0.5, 2.0, shape)
    elif path[-1] in ('scale', 'gamma'):
      v = 1 + 0.3 * rs.randn(*shape)
    elif len(shape) == 1:
      v = 0.3 * rs.randn(*shape)
    else:
      v = rs.randn(*shape) / np.sqrt(np.prod(shape[:-1]))
    var.set_value(jnp.asarray(v, jnp.float32))
  nnx.update(model, state)
  return model


def build(name, **kwargs):
  model = params_lib.build_uninitialised(name, num_classes=NUM_CLASSES, **kwargs)
  return randomize(model)


def torch_twin(model):
  import timm
  dims = model.backbone.dims
  tm = TUperNet(timm.create_model(ref.TIMM_NAMES['mambaout_test'], pretrained=False), dims,
                model.decode_head.conv_seg.in_features, model.auxiliary_head.conv_seg.in_features,
                NUM_CLASSES)
  sd = {}
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  for path, var in nnx.to_flat_state(state):
    sd[torch_name(path)] = torch.from_numpy(to_torch_layout(np.asarray(var.get_value())).copy())
  missing, unexpected = tm.load_state_dict(sd, strict=False)
  assert not unexpected, unexpected
  assert all(k.startswith('body.head.') or k.endswith('num_batches_tracked') for k in missing), \
      missing
  return tm


def run_jax(model, images, train=False):
  model.train() if train else model.eval()
  graphdef, state = nnx.split(model)

  @jax.jit
  def f(state, x):
    m = nnx.merge(graphdef, state)
    out = (m.forward_features(x), *m(x, return_aux=True))
    return out, nnx.state(m)

  out, new_state = f(state, images)
  nnx.update(model, new_state)
  return jax.tree.map(np.asarray, out)


@pytest.fixture(scope='module')
def pair():
  model = build('upernet_mambaout_test')
  return model, torch_twin(model).eval()


@pytest.fixture(scope='module')
def images():
  return np.random.RandomState(1).randn(*IMAGE, 3).astype(np.float32)


# ----------------------------------------------------------------------------------------------

def test_eval_outputs_match_torch_reference(pair, images):
  model, tm = pair
  (feats, logits, aux) = run_jax(model, images)
  with torch.no_grad():
    t_feats, t_logits, t_aux = tm(torch.from_numpy(images))
  assert logits.shape == (2, 18, 26, NUM_CLASSES) and aux.shape == (2, 5, 7, NUM_CLASSES)
  for f, tf in zip(feats, t_feats):
    assert rel_err(f, tf.permute(0, 2, 3, 1).numpy()) < 1e-5
  err = rel_err(logits, t_logits.permute(0, 2, 3, 1).numpy())
  aux_err = rel_err(aux, t_aux.permute(0, 2, 3, 1).numpy())
  print(f'\nupernet_mambaout_test vs PyTorch reference: logits {err:.2e}, aux {aux_err:.2e}')
  assert err < 1e-5 and aux_err < 1e-5


def test_train_mode_batchnorm_matches_torch(images):
  """Batch statistics in the forward pass, running stats updated with the unbiased variance (the
  1x1 pyramid-pooling branch sees 2 values per channel here: unbiased = 2 x biased)."""
  model = build('upernet_mambaout_test', dropout=0.0)  # same weights (same seed), no dropout
  tm = torch_twin(model).train()
  (_, logits, aux) = run_jax(model, images, train=True)
  with torch.no_grad():
    _, t_logits, t_aux = tm(torch.from_numpy(images))
  assert rel_err(logits, t_logits.permute(0, 2, 3, 1).numpy()) < 1e-4
  assert rel_err(aux, t_aux.permute(0, 2, 3, 1).numpy()) < 1e-4
  tsd = tm.state_dict()
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
    want = tsd[torch_name(path)].numpy()
    np.testing.assert_allclose(np.asarray(var.get_value()), want, rtol=2e-5, atol=2e-6,
                               err_msg=str(path))


def test_padded_canvas_with_valid_hw_equals_each_unpadded_image(pair):
  """valid_hw: every conv sees zeros past the image, pyramid pooling and resizes use its region
  only, so a padded batch gives each image's own logits."""
  model = pair[0]
  model.eval()
  rs = np.random.RandomState(5)
  sizes = [(72, 104), (45, 67)]
  canvas = np.zeros((2, 80, 112, 3), np.float32)
  for b, (h, w) in enumerate(sizes):
    canvas[b, :h, :w] = rs.randn(h, w, 3)
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, x, v: nnx.merge(graphdef, s)(x, return_aux=True, valid_hw=v))
  logits, aux = fwd(state, canvas, np.array(sizes, np.int32))
  for b, (h, w) in enumerate(sizes):
    want, want_aux = fwd(state, canvas[b:b + 1, :h, :w], np.array([[h, w]], np.int32))
    assert want.shape[1:3] == (-(-h // 4), -(-w // 4))
    np.testing.assert_allclose(logits[b, :want.shape[1], :want.shape[2]], want[0], rtol=1e-4,
                               atol=1e-5 * float(np.abs(want).max()))
    np.testing.assert_allclose(aux[b, :want_aux.shape[1], :want_aux.shape[2]], want_aux[0],
                               rtol=1e-4, atol=1e-5 * float(np.abs(want_aux).max()))
  # ... and valid_hw covering the whole input changes nothing.
  plain = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, canvas[:1, :72, :104])
  np.testing.assert_allclose(plain, fwd(state, canvas[:1, :72, :104],
                                        np.array([[72, 104]], np.int32))[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('src,dst', [((5, 7), (18, 26)), ((16, 24), (64, 96)), ((64, 96), (16, 24)),
                                     ((37, 51), (23, 64)), ((9, 13), (9, 13)), ((1, 1), (4, 3))])
def test_resize_matches_torch_interpolate(src, dst):
  x = np.random.RandomState(0).randn(2, *src, 3).astype(np.float32)
  want = up(torch.from_numpy(x).permute(0, 3, 1, 2), dst).permute(0, 2, 3, 1).numpy()
  got = np.asarray(jax.jit(lambda a: upernet.resize_bilinear(a, dst))(x))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_resize_with_per_example_sizes_matches_torch_on_the_valid_region():
  rs = np.random.RandomState(0)
  canvas = rs.randn(2, 20, 30, 3).astype(np.float32)
  in_size = np.array([[20, 30], [13, 17]], np.int32)
  out_size = np.array([[41, 9], [26, 40]], np.int32)
  got = np.asarray(jax.jit(lambda a, i, o: upernet.resize_bilinear(
      a, (48, 40), in_size=i, out_size=o))(canvas, in_size, out_size))
  for b in range(2):
    (hi, wi), (ho, wo) = in_size[b], out_size[b]
    valid = torch.from_numpy(canvas[b:b + 1, :hi, :wi]).permute(0, 3, 1, 2)
    want = up(valid, (int(ho), int(wo))).permute(0, 2, 3, 1).numpy()[0]
    np.testing.assert_allclose(got[b, :ho, :wo], want, rtol=1e-6, atol=1e-6)
    assert not got[b, ho:].any() and not got[b, :, wo:].any()


@pytest.mark.parametrize('size,bins', [((3, 4), 6), ((16, 64), 6), ((9, 13), 3), ((7, 5), 2),
                                       ((4, 4), 1)])
def test_adaptive_avg_pool_matches_torch(size, bins):
  x = np.random.RandomState(0).randn(2, *size, 3).astype(np.float32)
  want = nn.AdaptiveAvgPool2d(bins)(torch.from_numpy(x).permute(0, 3, 1, 2))
  got = upernet.adaptive_avg_pool(jnp.asarray(x), bins)
  np.testing.assert_allclose(np.asarray(got), want.permute(0, 2, 3, 1).numpy(), rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize('backbone', ['mambaout_tiny', 'mamba_test'])
def test_backbone_keys_are_the_classifier_keys_without_head(backbone):
  def keys(**kw):
    m = nnx.eval_shape(lambda: mo.create_model(backbone, **kw))
    return {'.'.join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  cls_keys, dense_keys = keys(), keys(features_only=True)
  assert dense_keys - cls_keys == {f'norm{i}.{p}' for i in range(4) for p in ('scale', 'bias')}
  assert cls_keys - dense_keys == {k for k in cls_keys if k.startswith('head.')}


@pytest.mark.parametrize('name', ['upernet_mambaout_tiny', 'upernet_mambaout_small',
                                  'upernet_mambaout_base', 'upernet_mamba_tiny',
                                  'upernet_mambaout_test'])
def test_registered_variants_build_with_150_classes(name):
  model = nnx.eval_shape(lambda: mo.create_model(name, num_classes=150))
  out = jax.eval_shape(lambda m, x: m(x, return_aux=True), model,
                       jax.ShapeDtypeStruct((1, 128, 160, 3), jnp.float32))
  assert out[0].shape == (1, 32, 40, 150) and out[1].shape == (1, 8, 10, 150)
  widths = {'upernet_mambaout_test': (32, 16)}.get(name, (512, 256))
  assert (model.decode_head.conv_seg.in_features,
          model.auxiliary_head.conv_seg.in_features) == widths


def test_bad_arguments_are_rejected():
  with pytest.raises(ValueError, match='num_classes must be >= 1'):
    nnx.eval_shape(lambda: mo.create_model('upernet_mambaout_test', num_classes=0))
