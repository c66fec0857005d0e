"""Segmentation inference with mmsegmentation's semantics, jittable with fixed shapes.

    probs = predict_probs(model, images, mode='slide', image_sizes=sizes, out_sizes=label_sizes,
                          out_shape=(H_LABEL, W_LABEL))
    labels = predict_labels(model, images, ...)           # argmax of the above, int32

Modes (mmseg's `test_cfg`): `whole` runs the model on the whole image; `slide` runs it on
`crop`-sized windows every `stride` pixels (mmseg's `slide_inference`: windows shifted back inside
the image at the bottom/right border, logits of each window resized to the window and summed,
divided by the number of windows covering each pixel). Either way the logits are resized to the
input size, then to the original label size (bilinear, align_corners=False), before the softmax.
`scales`/`flip`: mmseg's multi-scale + flip test (`aug_test`): the softmax probabilities at every
scale ratio (and of the horizontally flipped image, flipped back) are averaged.

Padded batches. Images of different sizes are batched on one canvas (B, H, W, 3), each in its
top-left corner, with `image_sizes` (B, 2) their valid (h, w); `out_sizes` (B, 2) is each image's
original label size and `out_shape` the static canvas of the output, where example b occupies
[:out_sizes[b, 0], :out_sizes[b, 1]] (the rest is zero). Exactness against mmseg (which runs one
unpadded image at a time): `whole` passes `valid_hw=image_sizes` to models that take it (UperNet),
which then compute on each image's region what the unpadded image gives (exact for MambaOut
backbones; Mamba-block backbones' scans still pass over the padding; a model without `valid_hw`
sees the padding). `slide` reads only valid pixels as long as each image is at least `crop` in
both sides (ADE20K resized to (2048, 512) keep-ratio: always, unless an image's aspect ratio
exceeds 4); a smaller image's window also covers padding, where mmseg's window shrinks to the
image. Multi-scale rescales the given (1.0-scale) images on device, where mmseg rescales the
original file (cv2) for each ratio.
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mambaout_jax.models.upernet import resize_bilinear

MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmseg's ADE20K multi-scale test ratios


def _grids(size, crop: int, stride: int):
  """Number of windows along one side (mmseg: max(size - crop + stride - 1, 0) // stride + 1)."""
  if isinstance(size, int):
    return max(size - crop + stride - 1, 0) // stride + 1
  return jnp.maximum(size - crop + stride - 1, 0) // stride + 1


def _logits_at_input_size(graphdef, state, x):
  """mmseg's encode_decode: the model's logits resized to the input (B, h, w, K), float32."""
  return resize_bilinear(nnx.merge(graphdef, state)(x).astype(jnp.float32), x.shape[1:3])


def takes_valid_hw(model) -> bool:
  """Whether `model(x, valid_hw=...)` restricts itself to each image's region of a padded canvas."""
  return 'valid_hw' in inspect.signature(type(model).__call__).parameters


def whole_logits(model, images, image_sizes=None):
  """(B, H, W, K) logits of the whole canvas, resized to it.

  With `image_sizes` and a model that takes `valid_hw` (UperNet), each image's logits are what
  its unpadded run gives (mmseg's encode_decode on the image alone): the model sees only the
  image region, and its logits (ceil(size / s) at `model.output_stride` s) are resized to
  `image_sizes`.
  """
  if image_sizes is None or not takes_valid_hw(model):
    graphdef, state = nnx.split(model)
    return _logits_at_input_size(graphdef, state, images)
  image_sizes = jnp.asarray(image_sizes, jnp.int32)
  logits = model(images, valid_hw=image_sizes).astype(jnp.float32)
  stride = model.output_stride
  return resize_bilinear(logits, images.shape[1:3], in_size=(image_sizes + stride - 1) // stride,
                         out_size=image_sizes)


def slide_logits(model, images, *, crop: int = 512, stride: int = 341, image_sizes=None):
  """mmseg's slide_inference on a (padded) canvas: (B, H, W, K) logits, count-normalised.

  Windows are `min(crop, H) x min(crop, W)`; per image, window (i, j) starts at
  (i * stride, j * stride), is shifted back to end inside the image's valid size, and exists when
  i < max(h - crop + stride - 1, 0) // stride + 1 (same for j, w). The windows run one batch of B
  crops at a time under `lax.scan` (one model trace); a window that no image of the batch has is
  skipped (`lax.cond`), so a large canvas costs only the windows its images need.
  """
  batch, height, width, _ = images.shape
  ch, cw = min(crop, height), min(crop, width)
  if image_sizes is None:
    image_sizes = jnp.broadcast_to(jnp.array([height, width], jnp.int32), (batch, 2))
  image_sizes = jnp.asarray(image_sizes, jnp.int32)
  h_img, w_img = image_sizes[:, 0], image_sizes[:, 1]
  n_h, n_w = _grids(height, ch, stride), _grids(width, cw, stride)
  h_grids, w_grids = _grids(h_img, ch, stride), _grids(w_img, cw, stride)
  graphdef, state = nnx.split(model)
  num_classes = jax.eval_shape(
      lambda s, x: _logits_at_input_size(graphdef, s, x), state,
      jax.ShapeDtypeStruct((batch, ch, cw, images.shape[-1]), images.dtype)).shape[-1]

  def window(carry, ij):
    preds, count = carry
    i, j = ij[0], ij[1]
    y2 = jnp.minimum(i * stride + ch, h_img)
    x2 = jnp.minimum(j * stride + cw, w_img)
    y1, x1 = jnp.maximum(y2 - ch, 0), jnp.maximum(x2 - cw, 0)
    exists = (i < h_grids) & (j < w_grids)
    valid = exists.astype(jnp.float32)[:, None, None, None]

    def run(carry):
      preds, count = carry
      crops = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(
          im, (y, x, 0), (ch, cw, im.shape[-1])))(images, y1, x1)
      logits = _logits_at_input_size(graphdef, state, crops) * valid

      def add(acc, upd, y, x):
        cur = jax.lax.dynamic_slice(acc, (y, x, 0), upd.shape)
        return jax.lax.dynamic_update_slice(acc, cur + upd, (y, x, 0))

      return (jax.vmap(add)(preds, logits, y1, x1),
              jax.vmap(add)(count, jnp.broadcast_to(valid, (batch, ch, cw, 1)), y1, x1))

    # A canvas fits the largest image; windows no image of this batch has are skipped.
    return jax.lax.cond(exists.any(), run, lambda c: c, (preds, count)), None

  ij = jnp.stack(jnp.meshgrid(jnp.arange(n_h), jnp.arange(n_w), indexing='ij'), -1).reshape(-1, 2)
  init = (jnp.zeros((batch, height, width, num_classes), jnp.float32),
          jnp.zeros((batch, height, width, 1), jnp.float32))
  (preds, count), _ = jax.lax.scan(window, init, ij)
  return preds / jnp.maximum(count, 1.0)  # count is >= 1 on every valid pixel


def flip_valid(x, widths):
  """Mirrors each example's valid columns [0, widths[b]) of NHWC `x`; padding stays in place."""
  cols = jnp.arange(x.shape[2])

  def one(a, w):
    return jnp.take(a, jnp.where(cols < w, w - 1 - cols, cols), axis=1)

  return jax.vmap(one)(x, widths)


def predict_probs(model, images, *, mode: str = 'whole', crop: int = 512, stride: int = 341,
                  image_sizes=None, out_sizes=None, out_shape: Optional[Sequence[int]] = None,
                  scales: Sequence[float] = (1.0,), flip: bool = False):
  """Per-pixel class probabilities at the original label size, mmseg's test semantics.

  Args:
    model: a segmentation model in eval mode (`model.eval()`), `model(x)` -> logits at any
      stride (UperNet: 1/4), NHWC.
    images: (B, H, W, 3) normalised images at the eval size (keep-ratio resize to (2048, 512)),
      each in the top-left corner of the canvas when their sizes differ.
    mode: 'whole' or 'slide'. crop, stride: the sliding window (mmseg ADE20K: 512, 341).
    image_sizes: (B, 2) int valid (h, w) of each image on the canvas; None: the whole canvas.
    out_sizes: (B, 2) int size of each original label map, the logits are resized to it;
      None: `image_sizes` (no resize back).
    out_shape: static (H_out, W_out) output canvas, at least every out_size; None: (H, W).
    scales: image-size ratios averaged over (`MS_RATIOS` for mmseg's multi-scale test);
      flip: also average the horizontally flipped image's prediction.
  Returns:
    (B, H_out, W_out, K) float32: softmax probabilities, averaged over scales and flips; zero
    outside each example's out_size. Static arguments: mode, crop, stride, out_shape, scales,
    flip; `image_sizes`/`out_sizes` may be traced (per-example sizes inside `jit`).
  """
  if mode not in ('whole', 'slide'):
    raise ValueError(f"unknown inference mode {mode!r}; choose 'whole' or 'slide'")
  if not scales or any(s <= 0 for s in scales):
    raise ValueError(f'scales must be positive ratios, got {tuple(scales)}')
  batch, height, width, _ = images.shape
  if image_sizes is None:
    image_sizes = jnp.broadcast_to(jnp.array([height, width], jnp.int32), (batch, 2))
  image_sizes = jnp.asarray(image_sizes, jnp.int32)
  out_sizes = image_sizes if out_sizes is None else jnp.asarray(out_sizes, jnp.int32)
  out_shape = tuple(out_shape or (height, width))
  total = None
  for ratio in scales:
    if ratio == 1.0:
      x, sizes = images, image_sizes
    else:  # mmseg: int(size * ratio + 0.5)
      canvas = (int(height * ratio + 0.5), int(width * ratio + 0.5))
      sizes = jnp.floor(image_sizes.astype(jnp.float32) * ratio + 0.5).astype(jnp.int32)
      x = resize_bilinear(images, canvas, in_size=image_sizes, out_size=sizes)
    for flipped in ((False, True) if flip else (False,)):
      xi = flip_valid(x, sizes[:, 1]) if flipped else x
      if mode == 'whole':
        logits = whole_logits(model, xi, sizes)
      else:
        logits = slide_logits(model, xi, crop=crop, stride=stride, image_sizes=sizes)
      logits = resize_bilinear(logits, out_shape, in_size=sizes, out_size=out_sizes)
      if flipped:
        logits = flip_valid(logits, out_sizes[:, 1])
      probs = jax.nn.softmax(logits, axis=-1)
      total = probs if total is None else total + probs
  total = total / (len(scales) * (2 if flip else 1))
  rows = jnp.arange(out_shape[0])[None, :, None] < out_sizes[:, 0, None, None]
  cols = jnp.arange(out_shape[1])[None, None, :] < out_sizes[:, 1, None, None]
  return jnp.where((rows & cols)[..., None], total, 0.0)


def predict_labels(model, images, **kwargs):
  """(B, H_out, W_out) int32 argmax of `predict_probs` (same arguments); -1 outside out_sizes."""
  probs = predict_probs(model, images, **kwargs)
  return jnp.where(probs.sum(-1) > 0, jnp.argmax(probs, axis=-1), -1).astype(jnp.int32)


def predict(model, batch: dict, config):
  """The eval step's prediction: `predict_labels` on an eval batch of the segmentation pipeline.

  batch: 'image' (B, Hc, Wc, 3) canvas, 'image_hw' (B, 2) valid sizes, 'label' (B, Hl, Wl) (its
  canvas shape is the output's), 'label_hw' (B, 2) original sizes. config.seg: `inference`
  ('whole' | 'slide'), `slide_crop`, `slide_stride`, `eval_scales`, `eval_flip`.
  Returns (B, Hl, Wl) int32 labels, -1 beyond each label_hw.
  """
  seg = config.seg
  return predict_labels(model, batch['image'], mode=seg.inference, crop=seg.slide_crop,
                        stride=seg.slide_stride, image_sizes=batch['image_hw'],
                        out_sizes=batch['label_hw'], out_shape=batch['label'].shape[1:3],
                        scales=tuple(seg.eval_scales), flip=bool(seg.eval_flip))
