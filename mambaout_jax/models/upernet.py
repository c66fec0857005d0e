"""UperNet (Xiao et al., ECCV 2018) over any 4-stage backbone, as mmsegmentation's `UPerHead` +
`FCNHead` auxiliary head: the segmentation model of the MambaOut paper's Table 3 (ADE20K).

    model = mo.create_model('upernet_mambaout_tiny', num_classes=150)
    logits = model(images_nhwc)                      # (B, H/4, W/4, num_classes), float32
    logits, aux = model(images, return_aux=True)     # + FCN head logits at H/16 (training loss)

Decode head (`decode_head`, 512 channels): a pyramid pooling module on the stride-32 features
(adaptive average pool to 1, 2, 3, 6 bins -> 1x1 conv-BN-ReLU -> bilinear up), concatenated with
its input -> 3x3 conv-BN-ReLU (`bottleneck`); 1x1 conv-BN-ReLU laterals on strides 4/8/16;
top-down addition of the upsampled coarser level; 3x3 conv-BN-ReLU `fpn_convs` on strides 4/8/16;
every level upsampled to stride 4, concatenated -> 3x3 conv-BN-ReLU (`fpn_bottleneck`);
channel dropout 0.1 (`nn.Dropout2d`); 1x1 classifier `conv_seg` (normal init, std 0.01; the narrow
`upernet_mambaout_test` head: LeCun normal, see UPERNET_VARIANTS).
Auxiliary head (`auxiliary_head`, on the stride-16 features): 3x3 conv-BN-ReLU to 256 channels,
channel dropout 0.1, 1x1 classifier. Convolutions before a BatchNorm have no bias and mmcv's
ConvModule init (Kaiming normal, fan_out, ReLU gain). Every bilinear resize is PyTorch's
`F.interpolate(mode='bilinear', align_corners=False)` (`resize_bilinear`), every pool
`nn.AdaptiveAvgPool2d` (`adaptive_avg_pool`). Parameter names follow mmsegmentation's
(`decode_head.psp_modules.0`, `lateral_convs.1`, `fpn_bottleneck`, `conv_seg`, ...), the backbone's
its classification names (`backbone.stages.2.blocks.5.fc1`, ...) plus the output norms `norm0..3`.

BatchNorm follows PyTorch's (SyncBN's) semantics: momentum 0.1, eps 1e-5, batch statistics in
training and running statistics updated with the unbiased variance; under `jit` on a sharded global
batch the statistics are global-batch ones, which is what SyncBN computes on GPUs.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mambaout_jax.models.mambaout import mask_outside
from mambaout_jax.models.registry import create_model, register_model

BN_MOMENTUM = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch
BN_EPS = 1e-5
# mmcv ConvModule: kaiming_init(conv, mode='fan_out', nonlinearity='relu', distribution='normal').
conv_module_init = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')
CONV_SEG_STD = 0.01  # mmseg's BaseDecodeHead: normal_init(conv_seg, mean=0, std=0.01)


# ----------------------------------------------------------------------------------------------
# PyTorch-equivalent resizing and pooling (NHWC).

def bilinear_taps(n_out: int, out_size, in_size):
  """Indices and weights of PyTorch's bilinear (align_corners=False) resize along one axis.

  Output positions 0..n_out-1 read from input positions below `in_size`; `out_size`/`in_size` may be
  traced scalars (positions at or past `out_size` get meaningless taps; callers mask them).
  Returns (i0, i1, lam): int32, int32, float32 arrays of length n_out;
  out = (1 - lam) * x[i0] + lam * x[i1].
  """
  in_size_f = jnp.asarray(in_size, jnp.float32)
  scale = in_size_f / jnp.asarray(out_size, jnp.float32)
  dst = jnp.arange(n_out, dtype=jnp.float32)
  src = jnp.maximum((dst + 0.5) * scale - 0.5, 0.0)
  i0 = jnp.minimum(jnp.floor(src).astype(jnp.int32), jnp.asarray(in_size, jnp.int32) - 1)
  i1 = jnp.minimum(i0 + 1, jnp.asarray(in_size, jnp.int32) - 1)
  lam = src - i0.astype(jnp.float32)
  return i0, i1, lam


def _resize_axis(x, axis: int, n_out: int, out_size, in_size):
  i0, i1, lam = bilinear_taps(n_out, out_size, in_size)
  shape = [1] * x.ndim
  shape[axis] = n_out
  lam = lam.reshape(shape).astype(x.dtype)
  return (jnp.take(x, i0, axis=axis) * (1 - lam) + jnp.take(x, i1, axis=axis) * lam)


def resize_bilinear(x, size: Sequence[int], *, in_size=None, out_size=None):
  """`F.interpolate(x, size, mode='bilinear', align_corners=False)` for NHWC `x` (no antialias).

  x: (B, H, W, C) or (H, W, C); size: the static output (h, w). Per-example dynamic geometry (for
  padded batches inside `jit`): `in_size` = valid (h, w) of the input (its top-left corner is read,
  the rest ignored), `out_size` = (h, w) the valid input is resized to, written into the top-left
  corner of the static `size` canvas; positions outside it are zero. For a batch, pass (B, 2)
  arrays. Without them the whole input is resized to the whole output.
  """
  if in_size is None and out_size is None:
    h_axis = x.ndim - 3
    x = _resize_axis(x, h_axis, size[0], size[0], x.shape[h_axis])
    return _resize_axis(x, h_axis + 1, size[1], size[1], x.shape[h_axis + 1])
  if x.ndim == 4:
    batch = x.shape[0]
    in_size = x.shape[1:3] if in_size is None else in_size
    out_size = size if out_size is None else out_size
    in_size = jnp.broadcast_to(jnp.asarray(in_size), (batch, 2))
    out_size = jnp.broadcast_to(jnp.asarray(out_size), (batch, 2))
    return jax.vmap(lambda a, i, o: resize_bilinear(a, size, in_size=i, out_size=o))(
        x, in_size, out_size)
  in_size = x.shape[:2] if in_size is None else in_size
  out_size = size if out_size is None else out_size
  x = _resize_axis(x, 0, size[0], out_size[0], in_size[0])
  x = _resize_axis(x, 1, size[1], out_size[1], in_size[1])
  valid = ((jnp.arange(size[0])[:, None] < out_size[0]) &
           (jnp.arange(size[1])[None, :] < out_size[1]))
  return jnp.where(valid[..., None], x, 0).astype(x.dtype)


def adaptive_pool_bins(in_size: int, out_size: int) -> list[tuple[int, int]]:
  """`nn.AdaptiveAvgPool` bins along one axis: bin i averages input positions
  floor(i * in / out) .. ceil((i + 1) * in / out) - 1 (bins overlap when in is not a multiple)."""
  return [((i * in_size) // out_size, -((-(i + 1) * in_size) // out_size))
          for i in range(out_size)]


def _dynamic_pool_weights(n: int, size, bins: int):
  """(bins, n) adaptive-pooling weights over the first `size` (traced) of n positions."""
  i = jnp.arange(bins)[:, None]
  k = jnp.arange(n)[None, :]
  start, end = (i * size) // bins, ((i + 1) * size + bins - 1) // bins
  return ((k >= start) & (k < end)).astype(jnp.float32) / (end - start).astype(jnp.float32)


def adaptive_avg_pool(x, output_size: int, valid_hw=None):
  """`nn.AdaptiveAvgPool2d(output_size)` for NHWC `x` (B, H, W, C) -> (B, s, s, C).

  `valid_hw` (B, 2): pool each example's top-left valid region only (padded canvases).
  """
  x32 = x.astype(jnp.float32)
  if valid_hw is not None:
    valid_hw = jnp.asarray(valid_hw, jnp.int32)
    wh = jax.vmap(lambda v: _dynamic_pool_weights(x.shape[1], v, output_size))(valid_hw[:, 0])
    ww = jax.vmap(lambda v: _dynamic_pool_weights(x.shape[2], v, output_size))(valid_hw[:, 1])
    y = jnp.einsum('boh,bhwc->bowc', wh, x32, precision='highest')
    return jnp.einsum('bpw,bowc->bopc', ww, y, precision='highest').astype(x.dtype)
  rows = jnp.stack([x32[:, a:b].mean(axis=1)
                   for a, b in adaptive_pool_bins(x.shape[1], output_size)], axis=1)
  y = jnp.stack([rows[:, :, a:b].mean(axis=2)
                 for a, b in adaptive_pool_bins(x.shape[2], output_size)], axis=2)
  return y.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# Building blocks.

class BatchNorm(nnx.Module):
  """`nn.BatchNorm2d` / `nn.SyncBatchNorm` over the last axis of NHWC inputs.

  Parameters `scale`, `bias` and batch statistics `mean`, `var` (nnx.BatchStat) carry flax's names,
  but the running variance is updated with the unbiased batch variance as in PyTorch (flax's
  BatchNorm uses the biased one: a 16/15 difference for the 1x1 pyramid-pooling branch at batch 16).
  Statistics are computed in float32 whatever the compute dtype. `model.eval()` switches to the
  running statistics (`use_running_average`).
  """

  def __init__(self, num_features: int, *, momentum: float = BN_MOMENTUM, epsilon: float = BN_EPS,
               use_running_average: bool = False, dtype=None, param_dtype=jnp.float32):
    self.momentum = momentum
    self.epsilon = epsilon
    self.use_running_average = use_running_average
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      x32 = x.astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      mean = x32.mean(axes)
      var = jnp.square(x32 - mean).mean(axes)
      n = math.prod(x.shape[:-1])
      m = self.momentum
      self.mean[...] = (1 - m) * self.mean[...] + m * mean
      self.var[...] = (1 - m) * self.var[...] + m * var * (n / max(n - 1, 1))
    mul = jax.lax.rsqrt(var + self.epsilon) * self.scale[...].astype(jnp.float32)
    add = self.bias[...].astype(jnp.float32) - mean * mul
    return (x.astype(jnp.float32) * mul + add).astype(dtype)


class ConvModule(nnx.Module):
  """mmcv's ConvModule with BN and ReLU: conv (no bias, 'same' padding k//2) -> BN -> ReLU."""

  def __init__(self, din: int, dout: int, kernel_size: int, *, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    p = kernel_size // 2
    self.conv = nnx.Conv(din, dout, kernel_size=(kernel_size, kernel_size),
                         padding=((p, p), (p, p)), use_bias=False, kernel_init=conv_module_init,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.bn = BatchNorm(dout, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def _cls_seg(channels, num_classes, *, cls_init_std, dtype, param_dtype, rngs):
  """The 1x1 classifier: normal(std=cls_init_std), or LeCun normal (std 1/sqrt(channels)) when
  cls_init_std is None."""
  init = (nnx.initializers.lecun_normal() if cls_init_std is None
          else nnx.initializers.normal(stddev=cls_init_std))
  return nnx.Conv(channels, num_classes, kernel_size=(1, 1), kernel_init=init,
                  bias_init=nnx.initializers.zeros_init(), dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)


def _dropout2d(rate, rngs):
  """`nn.Dropout2d`: whole channels dropped per example (mask broadcast over H and W)."""
  return nnx.Dropout(rate, broadcast_dims=(1, 2), rngs=rngs) if rate > 0 else None


class UPerHead(nnx.Module):
  """mmsegmentation's UPerHead: PPM on the last level + FPN over all levels -> logits at level 0."""

  def __init__(self, in_channels: Sequence[int], channels: int, num_classes: int, *,
               pool_scales=(1, 2, 3, 6), dropout: float = 0.1,
               cls_init_std: Optional[float] = CONV_SEG_STD, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pool_scales = tuple(pool_scales)
    top = in_channels[-1]
    self.psp_modules = nnx.List([ConvModule(top, channels, 1, **kw) for _ in self.pool_scales])
    self.bottleneck = ConvModule(top + len(self.pool_scales) * channels, channels, 3, **kw)
    self.lateral_convs = nnx.List([ConvModule(c, channels, 1, **kw) for c in in_channels[:-1]])
    self.fpn_convs = nnx.List([ConvModule(channels, channels, 3, **kw) for _ in in_channels[:-1]])
    self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, **kw)
    self.dropout = _dropout2d(dropout, rngs)
    self.conv_seg = _cls_seg(channels, num_classes, cls_init_std=cls_init_std, **kw)

  def psp_forward(self, x, valid=None):
    size = x.shape[1:3]
    outs = [x] + [resize_bilinear(conv(adaptive_avg_pool(x, s, valid)), size, out_size=valid)
                  for s, conv in zip(self.pool_scales, self.psp_modules)]
    return self.bottleneck(mask_outside(jnp.concatenate(outs, axis=-1), valid, 1))

  def __call__(self, feats, valid=None):
    """`valid`: per level, (B, 2) valid sizes of padded-canvas features (None: all valid)."""
    valid = valid or [None] * len(feats)
    laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
    laterals.append(self.psp_forward(feats[-1], valid[-1]))
    for i in range(len(laterals) - 1, 0, -1):  # top-down: each level gets the coarser one added
      laterals[i - 1] = laterals[i - 1] + resize_bilinear(
          laterals[i], laterals[i - 1].shape[1:3], in_size=valid[i], out_size=valid[i - 1])
    outs = [conv(mask_outside(lat, v, 1))
            for conv, lat, v in zip(self.fpn_convs, laterals, valid)] + [laterals[-1]]
    size = outs[0].shape[1:3]
    outs = [outs[0]] + [resize_bilinear(o, size, in_size=v, out_size=valid[0])
                        for o, v in zip(outs[1:], valid[1:])]
    x = self.fpn_bottleneck(mask_outside(jnp.concatenate(outs, axis=-1), valid[0], 1))
    if self.dropout is not None:
      x = self.dropout(x)
    return self.conv_seg(x)


class FCNHead(nnx.Module):
  """mmsegmentation's FCNHead with num_convs=1, concat_input=False (UperNet's auxiliary head)."""

  def __init__(self, in_channels: int, channels: int, num_classes: int, *, dropout: float = 0.1,
               cls_init_std: Optional[float] = CONV_SEG_STD, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.convs = nnx.List([ConvModule(in_channels, channels, 3, **kw)])
    self.dropout = _dropout2d(dropout, rngs)
    self.conv_seg = _cls_seg(channels, num_classes, cls_init_std=cls_init_std, **kw)

  def __call__(self, x, valid=None):
    for conv in self.convs:
      x = conv(mask_outside(x, valid, 1))
    if self.dropout is not None:
      x = self.dropout(x)
    return self.conv_seg(x)


class UperNet(nnx.Module):
  """Backbone (four NHWC stage outputs) + UPerHead + FCN auxiliary head on stage `aux_index`.

  `model(x)` -> decode-head logits at 1/4 of the input, float32 (what inference uses; the
  auxiliary head is not run). `model(x, return_aux=True)` -> (logits, aux_logits at 1/16), what the
  training loss uses (aux loss weight 0.4 in the paper's recipe). Both heads' logits are at feature
  resolution; the task upsamples them to the label size (`resize_bilinear`).
  """

  def __init__(self, backbone: nnx.Module, in_channels: Sequence[int], *, num_classes: int = 150,
               channels: int = 512, aux_channels: Optional[int] = 256, aux_index: int = 2,
               pool_scales=(1, 2, 3, 6), dropout: float = 0.1,
               cls_init_std: Optional[float] = CONV_SEG_STD, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if len(in_channels) != 4:
      raise ValueError(f'UperNet needs a 4-stage backbone, got widths {tuple(in_channels)}')
    if num_classes < 1:
      raise ValueError(f'num_classes must be >= 1 for segmentation, got {num_classes}')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_classes = num_classes
    self.output_stride = 4  # of the decode head's logits
    self.aux_index = aux_index
    self.backbone = backbone
    self.decode_head = UPerHead(in_channels, channels, num_classes, pool_scales=pool_scales,
                                dropout=dropout, cls_init_std=cls_init_std, **kw)
    self.auxiliary_head = (FCNHead(in_channels[aux_index], aux_channels, num_classes,
                                   dropout=dropout, cls_init_std=cls_init_std, **kw)
                           if aux_channels else None)

  def forward_features(self, x) -> list[Any]:
    """The backbone's stage outputs (after its output norms), NHWC at strides 4, 8, 16, 32."""
    return self.backbone(x)

  def __call__(self, x, return_aux: bool = False, valid_hw=None):
    """`valid_hw` (B, 2): each image's valid (h, w) at the top-left of a padded canvas `x`; the
    result on its region (ceil(valid / 4) at 1/4) is then what the unpadded image gives (exact
    for MambaOut backbones; a Mamba-block backbone's scans still pass over the padding)."""
    if valid_hw is None:
      feats, valid = self.backbone(x), None
    else:
      feats = self.backbone(x, valid_hw=valid_hw)
      valid_hw = jnp.asarray(valid_hw, jnp.int32)
      valid = [(valid_hw + s - 1) // s for s in (4, 8, 16, 32)]
    logits = self.decode_head(feats, valid).astype(jnp.float32)
    if not return_aux:
      return logits
    if self.auxiliary_head is None:
      raise ValueError('this UperNet was built without an auxiliary head (aux_channels=0); '
                       'call it with return_aux=False')
    aux_valid = None if valid is None else valid[self.aux_index]
    return logits, self.auxiliary_head(feats[self.aux_index], aux_valid).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Variants: backbone name + head widths (mmsegmentation's UperNet: 512 / aux 256).

UPERNET_VARIANTS: dict[str, dict[str, Any]] = {
    'upernet_mambaout_tiny': dict(backbone='mambaout_tiny'),
    'upernet_mambaout_small': dict(backbone='mambaout_small'),
    'upernet_mambaout_base': dict(backbone='mambaout_base'),
    'upernet_mamba_tiny': dict(backbone='mamba_tiny'),
    'upernet_mamba_small': dict(backbone='mamba_small'),
    # The narrow test head's classifiers start at LeCun scale: with mmseg's std 0.01 on 32 channels
    # the logits start ~4x smaller than the 512-channel head's, and on the digit-scenes demo the
    # head then predicted background everywhere for hundreds of steps (LeCun: learning from the
    # first hundred).
    'upernet_mambaout_test': dict(backbone='mambaout_test', channels=32, aux_channels=16,
                                  cls_init_std=None),
}
# The backbone drop-path rate of the paper's ADE20K runs (official repo issue #251).
SEG_DROP_PATH = {'upernet_mambaout_tiny': 0.3, 'upernet_mambaout_small': 0.3,
                 'upernet_mambaout_base': 0.6, 'upernet_mamba_tiny': 0.3,
                 'upernet_mamba_small': 0.3}
_HEAD_ARGS = ('channels', 'aux_channels', 'aux_index', 'pool_scales', 'dropout',
              'cls_init_std')


def _make_upernet_variant(name: str) -> Callable[..., UperNet]:
  def build(*, rngs: nnx.Rngs, num_classes: int = 150, dtype=None, param_dtype=jnp.float32,
            **overrides) -> UperNet:
    cfg = {**UPERNET_VARIANTS[name], **overrides}
    backbone_name = cfg.pop('backbone')
    head = {k: cfg.pop(k) for k in _HEAD_ARGS if k in cfg}
    # Everything else (drop_path_rate, scan_order, dwconv_impl, ...) configures the backbone.
    backbone = create_model(backbone_name, rngs=rngs, features_only=True, dtype=dtype,
                            param_dtype=param_dtype, **cfg)
    return UperNet(backbone, backbone.dims, num_classes=num_classes, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs, **head)
  build.__name__ = name
  build.__doc__ = f'{name}: UperNet + FCN auxiliary head on {UPERNET_VARIANTS[name]}'
  build.forwards_to = UPERNET_VARIANTS[name]['backbone']  # keywords the head does not take
  return build


for _name in UPERNET_VARIANTS:
  globals()[_name] = register_model(_make_upernet_variant(_name))
