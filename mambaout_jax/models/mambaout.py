"""MambaOut (Yu & Wang, "MambaOut: Do We Really Need Mamba for Vision?", CVPR 2025) in Flax NNX.

The module tree and attribute names follow timm's `mambaout.py`, so a PyTorch state-dict key maps to a
parameter path mechanically (`stages.2.blocks.5.fc1.weight` -> `stages/2/blocks/5/fc1/kernel`, see
`mambaout_jax.convert`). The official repo's key layout (`downsample_layers.*`, `stages.i.j.*`,
`norm.*`, `head.fc1/norm/fc2`) is translated to timm's on conversion. Layout is NHWC throughout.

Variants: the paper's femto/kobe/tiny/small/base, timm's `*_rw` experiments (no stem mid-norm,
norm-first downsample, layer scale, norm-MLP head, SiLU and conv_ratio > 1 for some), and
`mambaout_test`, a tiny model for tests and CPU demos.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mambaout_jax.models.layers import (DepthwiseConv2d, LayerScale, conv3x3_s2, gelu, get_act,
                                        layer_norm, linear)
from mambaout_jax.models.registry import register_model


def mask_outside(x, valid_hw, stride: int):
  """Zeros `x` (B, h, w, C) outside the region that images of valid size `valid_hw` (B, 2) cover
  at `stride` (ceil(valid / stride), what stride-2 convs with padding 1 produce). `valid_hw=None`
  returns `x`. Applied before every spatial op, it makes a padded canvas compute, on each image's
  region, exactly what the unpadded image computes (convolutions see zeros past its border)."""
  if valid_hw is None:
    return x
  v = (jnp.asarray(valid_hw, jnp.int32) + stride - 1) // stride
  rows = jnp.arange(x.shape[1])[None, :] < v[:, 0, None]
  cols = jnp.arange(x.shape[2])[None, :] < v[:, 1, None]
  return jnp.where((rows[:, :, None] & cols[:, None, :])[..., None], x, jnp.zeros((), x.dtype))


class Stem(nnx.Module):
  """conv3x3/2 -> [LN] -> act -> conv3x3/2 -> LN: stride 4 (InternImage's stem)."""

  def __init__(self, in_chs, out_chs, *, mid_norm=True, act=gelu, dtype=None,
               param_dtype=jnp.float32, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = conv3x3_s2(in_chs, out_chs // 2, **kw)
    self.norm1 = layer_norm(out_chs // 2, **kw) if mid_norm else None
    self.act = act
    self.conv2 = conv3x3_s2(out_chs // 2, out_chs, **kw)
    self.norm2 = layer_norm(out_chs, **kw)

  def __call__(self, x, valid_hw=None):
    x = self.conv1(mask_outside(x, valid_hw, 1))
    if self.norm1 is not None:
      x = self.norm1(x)
    x = self.act(x)
    return self.norm2(self.conv2(mask_outside(x, valid_hw, 2)))


class Downsample(nnx.Module):
  """conv3x3/2 -> LN (official MambaOut)."""

  def __init__(self, in_chs, out_chs, *, dtype=None, param_dtype=jnp.float32, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv = conv3x3_s2(in_chs, out_chs, **kw)
    self.norm = layer_norm(out_chs, **kw)

  def __call__(self, x, valid_hw=None, stride: int = 1):
    return self.norm(self.conv(mask_outside(x, valid_hw, stride)))


class DownsampleNormFirst(nnx.Module):
  """LN -> conv3x3/2 (timm's `*_rw` variants)."""

  def __init__(self, in_chs, out_chs, *, dtype=None, param_dtype=jnp.float32, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = layer_norm(in_chs, **kw)
    self.conv = conv3x3_s2(in_chs, out_chs, **kw)

  def __call__(self, x, valid_hw=None, stride: int = 1):
    return self.conv(mask_outside(self.norm(x), valid_hw, stride))


def drop_path(rate: float, rngs: nnx.Rngs) -> Optional[nnx.Dropout]:
  """Per-sample stochastic depth (timm's DropPath) = dropout whose mask is broadcast over H, W, C."""
  return nnx.Dropout(rate, broadcast_dims=(1, 2, 3), rngs=rngs) if rate > 0 else None


class GatedCNNBlock(nnx.Module):
  """Gated CNN block (Figure 1(a) of the paper without the SSM).

  x + DropPath(LS(fc2(act(g) * [i, dwconv(c)]))) where (g, i, c) = split(fc1(LN(x))); the
  depthwise conv runs on `int(conv_ratio * dim)` channels only (partial-channel conv).
  """

  def __init__(self, dim, *, expansion_ratio=8 / 3, kernel_size=7, conv_ratio=1.0,
               ls_init_value=None, act=gelu, drop_path_rate=0.0, dwconv_impl='auto',
               dtype=None, param_dtype=jnp.float32, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    hidden = int(expansion_ratio * dim)
    conv_channels = int(conv_ratio * dim)
    if conv_channels > hidden:
      raise ValueError(f'conv_ratio {conv_ratio} gives {conv_channels} conv channels, more than '
                       f'the {hidden} hidden channels; lower conv_ratio or raise expansion_ratio')
    self.split_indices = (hidden, hidden - conv_channels, conv_channels)
    self.norm = layer_norm(dim, **kw)
    self.fc1 = linear(dim, hidden * 2, **kw)
    self.act = act
    self.conv = DepthwiseConv2d(conv_channels, kernel_size, impl=dwconv_impl, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
    self.fc2 = linear(hidden, dim, **kw)
    self.ls = LayerScale(dim, ls_init_value, param_dtype=param_dtype) if ls_init_value else None
    self.drop_path = drop_path(drop_path_rate, rngs)

  def __call__(self, x, valid_hw=None, stride: int = 1):
    shortcut = x
    x = self.fc1(self.norm(x))
    hidden, n_id, _ = self.split_indices
    g, i, c = x[..., :hidden], x[..., hidden:hidden + n_id], x[..., hidden + n_id:]
    c = self.conv(mask_outside(c, valid_hw, stride))
    x = self.fc2(self.act(g) * jnp.concatenate([i, c], axis=-1))
    if self.ls is not None:
      x = self.ls(x)
    if self.drop_path is not None:
      x = self.drop_path(x)
    return x + shortcut


class MambaOutStage(nnx.Module):

  def __init__(self, dim, dim_out, *, depth, downsample='', drop_path_rates=(), block_cls=None,
               block_kwargs=None, dtype=None, param_dtype=jnp.float32, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if downsample == 'conv':
      self.downsample = Downsample(dim, dim_out, **kw)
    elif downsample == 'conv_nf':
      self.downsample = DownsampleNormFirst(dim, dim_out, **kw)
    elif downsample == '':
      if dim != dim_out:
        raise ValueError(f'a stage without downsampling keeps its width, got {dim} -> {dim_out}')
      self.downsample = None
    else:
      raise ValueError(f"unknown downsample {downsample!r}; choose 'conv', 'conv_nf' or ''")
    block_cls = block_cls or GatedCNNBlock
    self.blocks = nnx.List([
        block_cls(dim_out, drop_path_rate=drop_path_rates[j], **(block_kwargs or {}), **kw)
        for j in range(depth)])

  def __call__(self, x, valid_hw=None, stride: int = 1):
    """`stride`: of the stage's output; with `valid_hw` the spatial ops see only valid pixels
    (blocks that override the Gated CNN block's call, such as Mamba blocks, run unmasked)."""
    if self.downsample is not None:
      x = (self.downsample(x) if valid_hw is None else
           self.downsample(x, valid_hw, stride // 2))
    for block in self.blocks:
      if valid_hw is not None and type(block).__call__ is GatedCNNBlock.__call__:
        x = block(x, valid_hw, stride)
      else:
        x = block(x)
    return x


class PreLogits(nnx.Module):
  """fc -> act [-> LN] between pooling and the classifier."""

  def __init__(self, din, dhidden, *, norm=True, dtype=None, param_dtype=jnp.float32, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc = linear(din, dhidden, **kw)
    self.norm = layer_norm(dhidden, **kw) if norm else None

  def __call__(self, x):
    x = gelu(self.fc(x))  # both timm heads use GELU here, whatever the blocks use
    return self.norm(x) if self.norm is not None else x


class MlpHead(nnx.Module):
  """Average pool -> LN -> fc -> GELU [-> LN] -> dropout -> fc.

  `mlp_norm=True` is the official MambaOut head (timm's `MlpHead`); `mlp_norm=False` is timm's
  `ClNormMlpClassifierHead` used by the `*_rw` variants. `num_classes=0` returns pre-logits.
  """

  def __init__(self, dim, num_classes, *, mlp_ratio=4, mlp_norm=True, drop_rate=0.0,
               dtype=None, param_dtype=jnp.float32, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    hidden = int(mlp_ratio * dim)
    self.norm = layer_norm(dim, **kw)
    self.pre_logits = PreLogits(dim, hidden, norm=mlp_norm, **kw)
    self.head_dropout = nnx.Dropout(drop_rate, rngs=rngs) if drop_rate > 0 else None
    self.fc = linear(hidden, num_classes, **kw) if num_classes > 0 else None

  def __call__(self, x, pre_logits: bool = False):
    x = self.pre_logits(self.norm(x.mean(axis=(1, 2))))
    if self.head_dropout is not None:
      x = self.head_dropout(x)
    if pre_logits or self.fc is None:
      return x
    return self.fc(x)


# Parameters a `features_only` backbone adds to the classification ones: its stage-output norms.
# A classification checkpoint has none of them; initialising a backbone from one leaves them new.
DENSE_OUTPUT_NORMS = ('norm0', 'norm1', 'norm2', 'norm3')


class MambaOut(nnx.Module):
  """MambaOut: a 4-stage hierarchy of Gated CNN blocks. `model(images_nhwc) -> logits` (float32).

  `features_only=True` makes it a backbone for dense tasks (the authors' segmentation/detection
  code): no classifier and no final norm; `model(images)` returns the stage outputs, NHWC at
  strides 4, 8, 16, 32, each through its own LayerNorm (`norm0`..`norm3`, eps 1e-6). Every other
  parameter keeps its classification name, so a classification checkpoint's non-head keys load 1:1;
  the output norms are new and start at their default init (scale 1, bias 0).
  """

  def __init__(self, *, in_chans=3, num_classes=1000, depths=(3, 3, 9, 3),
               dims=(96, 192, 384, 576), act='gelu', conv_ratio=1.0, expansion_ratio=8 / 3,
               kernel_size=7, stem_mid_norm=True, ls_init_value=None, downsample='conv',
               head_fn='default', drop_path_rate=0.0, head_dropout=0.0, dwconv_impl='auto',
               block_cls=None, block_kwargs=None, features_only=False, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if len(depths) != len(dims):
      raise ValueError(f'depths {tuple(depths)} and dims {tuple(dims)} differ in length')
    if head_fn not in ('default', 'norm_mlp'):
      raise ValueError(f"unknown head_fn {head_fn!r}; choose 'default' or 'norm_mlp'")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    act_fn = get_act(act)
    self.num_classes = num_classes
    self.dims = tuple(dims)
    self.stem = Stem(in_chans, dims[0], mid_norm=stem_mid_norm, act=act_fn, **kw)
    # Official linear stochastic-depth rule: rates rise from 0 to drop_path_rate over all blocks.
    rates = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
    bounds = np.cumsum((0,) + tuple(depths))
    block_kwargs = dict(block_kwargs or {})
    if block_cls is None:
      block_kwargs.update(expansion_ratio=expansion_ratio, kernel_size=kernel_size,
                          conv_ratio=conv_ratio, ls_init_value=ls_init_value, act=act_fn,
                          dwconv_impl=dwconv_impl)
    self.stages = nnx.List([
        MambaOutStage(dims[i - 1] if i else dims[0], dims[i], depth=depths[i],
                      downsample=downsample if i else '',
                      drop_path_rates=rates[bounds[i]:bounds[i + 1]], block_cls=block_cls,
                      block_kwargs=block_kwargs, **kw)
        for i in range(len(depths))])
    self.features_only = features_only
    if features_only:
      if len(dims) != len(DENSE_OUTPUT_NORMS):
        raise ValueError(f'features_only needs {len(DENSE_OUTPUT_NORMS)} stages, got {len(dims)}')
      self.head = None
      for name, dim in zip(DENSE_OUTPUT_NORMS, dims):
        setattr(self, name, layer_norm(dim, **kw))
    else:
      self.head = MlpHead(dims[-1], num_classes, mlp_norm=(head_fn == 'default'),
                          drop_rate=head_dropout, **kw)

  def forward_features(self, x, valid_hw=None) -> list[Any]:
    """The four stage outputs, NHWC at strides 4, 8, 16, 32 (for dense-prediction heads).

    `valid_hw` (B, 2): each image's valid (h, w) at the top-left of a padded canvas; every
    convolution then sees zeros past it, as the unpadded image would (exact for Gated CNN
    blocks; Mamba blocks' scans still run over the padding). Outputs beyond it are undefined.
    """
    x = self.stem(x) if valid_hw is None else self.stem(x, valid_hw)
    feats = []
    for i, stage in enumerate(self.stages):
      x = stage(x) if valid_hw is None else stage(x, valid_hw, 4 * 2 ** i)
      feats.append(x)
    return feats

  def __call__(self, x, pre_logits: bool = False, valid_hw=None):
    if self.features_only:
      return [getattr(self, name)(f)
              for name, f in zip(DENSE_OUTPUT_NORMS, self.forward_features(x, valid_hw))]
    if valid_hw is not None:
      raise ValueError('valid_hw is for features_only backbones (dense prediction)')
    x = self.head(self.forward_features(x)[-1], pre_logits=pre_logits)
    return x.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Variants. VARIANTS holds the architecture of each; `drop_path_rate` is the paper's training value
# (used by the configs), models are built with 0 unless overridden.

VARIANTS: dict[str, dict[str, Any]] = {
    'mambaout_femto': dict(depths=(3, 3, 9, 3), dims=(48, 96, 192, 288)),
    'mambaout_kobe': dict(depths=(3, 3, 15, 3), dims=(48, 96, 192, 288)),
    'mambaout_tiny': dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 576)),
    'mambaout_small': dict(depths=(3, 4, 27, 3), dims=(96, 192, 384, 576)),
    'mambaout_base': dict(depths=(3, 4, 27, 3), dims=(128, 256, 512, 768)),
}
_RW = dict(stem_mid_norm=False, downsample='conv_nf', ls_init_value=1e-6, head_fn='norm_mlp')
VARIANTS.update({
    'mambaout_small_rw': dict(depths=(3, 4, 27, 3), dims=(96, 192, 384, 576), **_RW),
    'mambaout_base_short_rw': dict(depths=(3, 3, 25, 3), dims=(128, 256, 512, 768),
                                   expansion_ratio=3.0, conv_ratio=1.25, **_RW),
    'mambaout_base_tall_rw': dict(depths=(3, 4, 30, 3), dims=(128, 256, 512, 768),
                                  expansion_ratio=2.5, conv_ratio=1.25, **_RW),
    'mambaout_base_wide_rw': dict(depths=(3, 4, 27, 3), dims=(128, 256, 512, 768),
                                  expansion_ratio=3.0, conv_ratio=1.5, act='silu', **_RW),
    'mambaout_base_plus_rw': dict(depths=(3, 4, 30, 3), dims=(128, 256, 512, 768),
                                  expansion_ratio=3.0, conv_ratio=1.5, act='silu', **_RW),
    # timm's `test_mambaout`: a few thousand parameters' worth of every code path.
    'mambaout_test': dict(depths=(1, 1, 3, 1), dims=(16, 32, 48, 64), expansion_ratio=3.0,
                          stem_mid_norm=False, downsample='conv_nf', ls_init_value=1e-4,
                          act='silu', head_fn='norm_mlp'),
})

# The drop-path rate each variant was trained with (paper / timm recipes).
TRAIN_DROP_PATH = {
    'mambaout_femto': 0.025, 'mambaout_kobe': 0.025, 'mambaout_tiny': 0.2,
    'mambaout_small': 0.4, 'mambaout_base': 0.6,
}

# Name of the corresponding timm model (for parity tests and conversion docs).
TIMM_NAMES = {name: name for name in VARIANTS}
TIMM_NAMES['mambaout_test'] = 'test_mambaout'


def _make_variant(name: str) -> Callable[..., MambaOut]:
  def build(*, rngs: nnx.Rngs, **overrides) -> MambaOut:
    return MambaOut(**{**VARIANTS[name], **overrides}, rngs=rngs)
  build.__name__ = name
  build.__doc__ = f'{name}: {VARIANTS[name]}'
  return build


for _name in VARIANTS:
  globals()[_name] = register_model(_make_variant(_name))
