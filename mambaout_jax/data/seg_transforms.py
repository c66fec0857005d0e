"""Per-example segmentation transforms (numpy/OpenCV): mmsegmentation's ADE20K recipe.

Training (mmseg's `RandomResize` -> `RandomCrop` -> `RandomFlip` -> `PhotoMetricDistortion`, then
its data preprocessor's normalise + pad):
  1. rescale keeping the aspect ratio to `scale` x r, r ~ U[0.5, 2.0): the image bilinear, the
     label nearest (OpenCV, as mmcv's default backend);
  2. a random `crop_size` crop, redrawn up to 10 times until no class covers `cat_max_ratio` or
     more of its non-ignored pixels (and at least two classes are present); after 10 failures the
     11th draw is used;
  3. horizontal flip with probability 0.5;
  4. photometric distortion on uint8: brightness +U(-32, 32), contrast x U(0.5, 1.5) placed first
     or last at random, saturation x U(0.5, 1.5) and hue + randint(-18, 18) (NumPy's half-open
     randint, so -18..17, as mmseg) on OpenCV's 8-bit HSV (H in 0..179); each with p 0.5, every
     step rounding down to uint8 after clipping to [0, 255];
  5. ImageNet normalisation, then padding to `crop_size` (bottom/right) with 0 for the image and
     255 (ignored) for the label.
Eval: the image rescaled keeping the aspect ratio to `scale` (bilinear), the label kept at its
original size (the metric is computed there), both padded onto fixed canvases (see
`SegEvalTransform`).

Labels: single-channel PNGs of class indices. With `reduce_zero_label` (ADE20K), 0 ('other')
becomes 255 (ignored) and k becomes k - 1, as mmseg's `LoadAnnotations(reduce_zero_label=True)`.
Randomness comes from the `np.random.Generator` passed in (seeded from (seed, epoch, index)).
"""
from __future__ import annotations

import dataclasses
import io

import cv2
import numpy as np
from PIL import Image

from mambaout_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, to_rgb

IGNORE_INDEX = 255
LABEL_MODES = ('L', 'P')  # 8-bit single-channel PNGs (grey or palette indices).
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class SegExampleError(ValueError):
  """An image/label pair that cannot be used: undecodable, wrong label format, sizes differ."""


# ----------------------------------------------------------------------------------------------
# Decoding


def decode_pair(image_bytes: bytes, label_bytes: bytes, name: str = '',
                reduce_zero_label: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Encoded image + label PNG -> (uint8 RGB (H, W, 3), uint8 labels (H, W)).

  Raises `SegExampleError` naming `name` when either file is corrupt, the label is not an 8-bit
  single-channel map, or the two sizes differ.
  """
  try:
    image = np.asarray(to_rgb(Image.open(io.BytesIO(image_bytes))))
  except _PIL_ERRORS as e:
    raise SegExampleError(f'{name}: cannot decode the image: {e}') from e
  try:
    label_img = Image.open(io.BytesIO(label_bytes))
    if label_img.mode not in LABEL_MODES:
      raise SegExampleError(f'{name}: the label map has PIL mode {label_img.mode}; expected an '
                            '8-bit single-channel PNG of class indices (mode L or P)')
    label = np.asarray(label_img)
  except _PIL_ERRORS as e:
    raise SegExampleError(f'{name}: cannot decode the label map: {e}') from e
  if label.shape != image.shape[:2]:
    raise SegExampleError(
        f'{name}: the label map is {label.shape[1]}x{label.shape[0]} (WxH) but its image is '
        f'{image.shape[1]}x{image.shape[0]}; they must have the same size')
  if reduce_zero_label:
    label = reduce_zero(label)
  return image, label


def reduce_zero(label: np.ndarray) -> np.ndarray:
  """mmseg's reduce_zero_label on uint8: 0 -> 255 (ignored), k -> k - 1, 255 stays 255."""
  out = label.astype(np.uint8) - np.uint8(1)  # 0 wraps to 255; 255 becomes 254 ...
  out[label == IGNORE_INDEX] = IGNORE_INDEX   # ... and is put back.
  return out


# ----------------------------------------------------------------------------------------------
# Geometry


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
  """mmcv's keep-ratio `rescale_size`: the largest size with long side <= max(scale) and short
  side <= min(scale); returns (new_width, new_height), each rounded half up."""
  factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
  return max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5))


def random_scale(rng: np.random.Generator, scale: tuple[int, int],
                 ratio_range: tuple[float, float]) -> tuple[int, int]:
  """mmseg's `RandomResize` with a ratio range: `scale` times r ~ U[low, high), truncated."""
  ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
  return int(scale[0] * ratio), int(scale[1] * ratio)


def resize_pair(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]):
  """Resizes to size = (width, height): the image bilinear, the label nearest (OpenCV)."""
  if image.shape[1::-1] != tuple(size):
    image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    if label is not None:
      label = cv2.resize(label, size, interpolation=cv2.INTER_NEAREST)
  return image, label


def random_crop_box(rng: np.random.Generator, label: np.ndarray, crop_size: tuple[int, int],
                    cat_max_ratio: float = 1.0,
                    ignore_index: int = IGNORE_INDEX) -> tuple[int, int]:
  """(top, left) of a `crop_size` = (h, w) crop, as mmseg's `RandomCrop`.

  With cat_max_ratio < 1 a crop is accepted when it holds at least two non-ignored classes and the
  most frequent one covers less than `cat_max_ratio` of its non-ignored pixels; it is redrawn up
  to 10 times, and the last draw is used when none passes. Crops of an image smaller than
  `crop_size` are the whole extent on that side (padded later).
  """
  height, width = label.shape[:2]

  def draw():
    return (int(rng.integers(0, max(height - crop_size[0], 0) + 1)),
            int(rng.integers(0, max(width - crop_size[1], 0) + 1)))

  top, left = draw()
  if cat_max_ratio < 1.0:
    for _ in range(10):
      crop = label[top:top + crop_size[0], left:left + crop_size[1]]
      counts = np.bincount(crop.ravel(), minlength=ignore_index + 1)
      counts[ignore_index] = 0
      counts = counts[counts > 0]
      if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
        break
      top, left = draw()
  return top, left


def pad_to(x: np.ndarray, size: tuple[int, int], value) -> np.ndarray:
  """Pads `x` (H, W[, C]) at the bottom/right to size = (h, w) with `value`."""
  if x.shape[:2] == tuple(size):
    return x
  out = np.full(tuple(size) + x.shape[2:], value, x.dtype)
  out[:x.shape[0], :x.shape[1]] = x
  return out


# ----------------------------------------------------------------------------------------------
# Photometric distortion (uint8 RGB in, uint8 RGB out)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """x * alpha + beta in float32, clipped to [0, 255], truncated to uint8 (mmseg's `convert`)."""
  y = x.astype(np.float32) * np.float32(alpha) + np.float32(beta)
  return np.clip(y, 0, 255).astype(np.uint8)


def adjust_brightness(image: np.ndarray, delta: float) -> np.ndarray:
  return _convert(image, beta=delta)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
  return _convert(image, alpha=factor)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
  """Scales S of OpenCV's 8-bit HSV (S in 0..255) and converts back."""
  hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
  hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=factor)
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def adjust_hue(image: np.ndarray, delta: int) -> np.ndarray:
  """Shifts H of OpenCV's 8-bit HSV (H in 0..179, 2 degrees a step) by `delta`, modulo 180."""
  hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
  hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int64) + delta) % 180
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


@dataclasses.dataclass(frozen=True)
class PhotoMetricDistortion:
  """mmseg's `PhotoMetricDistortion` on uint8 RGB: each step with probability 0.5."""
  brightness_delta: int = 32
  contrast_range: tuple[float, float] = (0.5, 1.5)
  saturation_range: tuple[float, float] = (0.5, 1.5)
  hue_delta: int = 18

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.integers(2):
      image = adjust_brightness(image, rng.uniform(-self.brightness_delta, self.brightness_delta))
    contrast_first = bool(rng.integers(2))
    if contrast_first and rng.integers(2):
      image = adjust_contrast(image, rng.uniform(*self.contrast_range))
    if rng.integers(2):
      image = adjust_saturation(image, rng.uniform(*self.saturation_range))
    if rng.integers(2):
      image = adjust_hue(image, int(rng.integers(-self.hue_delta, self.hue_delta)))
    if not contrast_first and rng.integers(2):
      image = adjust_contrast(image, rng.uniform(*self.contrast_range))
    return image


# ----------------------------------------------------------------------------------------------
# The two transforms


def _round_up(hw, multiple: int = 32) -> tuple[int, int]:
  return tuple(int(-(-int(v) // multiple) * multiple) for v in hw)


def _pair(value, what: str) -> tuple[int, int]:
  if isinstance(value, int):
    return value, value
  value = tuple(int(v) for v in value)
  if len(value) != 2:
    raise ValueError(f'{what} must be an int or a pair of ints, got {value}')
  return value


@dataclasses.dataclass(frozen=True)
class SegTrainTransform:
  """(image bytes, label bytes, rng) -> (float32 (h, w, 3), int32 (h, w)), h, w = crop_size."""
  crop_size: tuple[int, int] = (512, 512)          # (h, w)
  scale: tuple[int, int] = (2048, 512)             # mmseg's (w, h); keep-ratio bounds
  ratio_range: tuple[float, float] = (0.5, 2.0)
  cat_max_ratio: float = 0.75
  hflip: float = 0.5
  photometric: PhotoMetricDistortion | None = PhotoMetricDistortion()
  reduce_zero_label: bool = True
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  @classmethod
  def from_config(cls, config) -> 'SegTrainTransform':
    aug, inp = config.get('aug', {}), config.get('input', {})
    return cls(
        crop_size=_pair(aug.get('crop_size', config.image_size), 'aug.crop_size'),
        scale=_pair(aug.get('scale', (2048, 512)), 'aug.scale'),
        ratio_range=tuple(aug.get('ratio_range', (0.5, 2.0))),
        cat_max_ratio=aug.get('cat_max_ratio', 0.75), hflip=aug.get('hflip', 0.5),
        photometric=PhotoMetricDistortion() if aug.get('photometric', True) else None,
        reduce_zero_label=config.dataset.get('reduce_zero_label', True),
        mean=tuple(inp.get('mean', IMAGENET_MEAN)), std=tuple(inp.get('std', IMAGENET_STD)))

  def __call__(self, image_bytes: bytes, label_bytes: bytes, rng: np.random.Generator,
               name: str = '') -> tuple[np.ndarray, np.ndarray]:
    image, label = decode_pair(image_bytes, label_bytes, name, self.reduce_zero_label)
    target = random_scale(rng, self.scale, self.ratio_range)
    image, label = resize_pair(image, label, rescale_size(image.shape[1], image.shape[0], target))
    top, left = random_crop_box(rng, label, self.crop_size, self.cat_max_ratio)
    image = image[top:top + self.crop_size[0], left:left + self.crop_size[1]]
    label = label[top:top + self.crop_size[0], left:left + self.crop_size[1]]
    if self.hflip > 0 and rng.random() < self.hflip:
      image, label = image[:, ::-1], label[:, ::-1]
    image = np.ascontiguousarray(image)
    if self.photometric is not None:
      image = self.photometric(image, rng)
    x = pad_to(normalize(image, self.mean, self.std), self.crop_size, 0.0)
    return x, pad_to(label.astype(np.int32), self.crop_size, IGNORE_INDEX)


@dataclasses.dataclass(frozen=True)
class SegEvalTransform:
  """(image bytes, label bytes) -> one eval example on fixed canvases (the eval batch format).

  'image' float32 (Hc, Wc, 3): rescaled keeping the ratio to `scale`, normalised, at the top-left
  of the `canvas` with 0 elsewhere; 'image_hw' int32 (2,): its valid (h, w).
  'label' int32 (Hl, Wl): the ORIGINAL label map (reduce_zero_label applied) at the top-left of
  `label_canvas`, 255 elsewhere; 'label_hw' int32 (2,): the original (h, w).
  An image or label larger than its canvas is an error naming the file and the key to raise.
  """
  scale: tuple[int, int] = (2048, 512)
  canvas: tuple[int, int] = (2048, 2048)
  label_canvas: tuple[int, int] = (2048, 2048)
  reduce_zero_label: bool = True
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  @classmethod
  def from_config(cls, config, sizes=None) -> 'SegEvalTransform':
    """Canvases: `input.eval_canvas` / `input.eval_label_canvas` when set; else fitted to the
    split's (h, w) `sizes` when known (rounded up to multiples of 32), else (S, S) with S =
    max(eval_scale) rounded up to 32, which holds a rescaled image of any aspect ratio."""
    aug, inp = config.get('aug', {}), config.get('input', {})
    scale = _pair(aug.get('eval_scale', aug.get('scale', (2048, 512))), 'aug.eval_scale')
    if sizes:
      rescaled = np.array([rescale_size(w, h, scale)[::-1] for h, w in sizes])
      fit_canvas, fit_label = _round_up(rescaled.max(0)), _round_up(np.max(sizes, 0))
    else:
      fit_canvas = fit_label = _round_up((max(scale), max(scale)))
    canvas = _pair(inp.get('eval_canvas', None) or fit_canvas, 'input.eval_canvas')
    label_canvas = _pair(inp.get('eval_label_canvas', None) or fit_label,
                         'input.eval_label_canvas')
    return cls(scale=scale, canvas=canvas, label_canvas=label_canvas,
               reduce_zero_label=config.dataset.get('reduce_zero_label', True),
               mean=tuple(inp.get('mean', IMAGENET_MEAN)), std=tuple(inp.get('std', IMAGENET_STD)))

  def __call__(self, image_bytes: bytes, label_bytes: bytes, name: str = '') -> dict:
    image, label = decode_pair(image_bytes, label_bytes, name, self.reduce_zero_label)
    image, _ = resize_pair(image, None, rescale_size(image.shape[1], image.shape[0], self.scale))
    for what, x, canvas, key in (('rescaled image', image, self.canvas, 'input.eval_canvas'),
                                 ('label map', label, self.label_canvas,
                                  'input.eval_label_canvas')):
      if x.shape[0] > canvas[0] or x.shape[1] > canvas[1]:
        raise ValueError(f'{name}: the {what} is {x.shape[0]}x{x.shape[1]} (HxW), larger than '
                         f'the eval canvas {canvas[0]}x{canvas[1]}; set --config.{key} to at '
                         f'least ({x.shape[0]}, {x.shape[1]})')
    return {'image': pad_to(normalize(image, self.mean, self.std), self.canvas, 0.0),
            'label': pad_to(label.astype(np.int32), self.label_canvas, IGNORE_INDEX),
            'image_hw': np.asarray(image.shape[:2], np.int32),
            'label_hw': np.asarray(label.shape, np.int32)}

  def padding(self) -> dict:
    """A padding row: zeros, all-255 labels, hw = the full canvases (never 0, safe to divide)."""
    return {'image': np.zeros(self.canvas + (3,), np.float32),
            'label': np.full(self.label_canvas, IGNORE_INDEX, np.int32),
            'image_hw': np.asarray(self.canvas, np.int32),
            'label_hw': np.asarray(self.label_canvas, np.int32)}
