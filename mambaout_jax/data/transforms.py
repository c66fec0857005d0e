"""Per-example image transforms (numpy/PIL), the timm/DeiT recipe.

Training: RandomResizedCrop (random bilinear/bicubic) -> horizontal flip -> RandAugment ->
normalise -> random erasing. Eval: resize the shorter side to int(size / crop_pct) (bicubic) ->
centre crop -> normalise; the same geometry and statistics serve `mambaout_jax.predict`. Images
arrive as encoded bytes; large JPEGs are decoded at a reduced size (PIL `draft`, a DCT-domain
downscale) when the crop still has at least `size` pixels each way. Any image PIL reads becomes
8-bit RGB (grey, 16-bit, CMYK, palette, alpha); bytes that do not decode (corrupt, truncated, not an
image, over PIL's decompression-bomb limit) raise `ImageDecodeError`. Randomness comes from the
`np.random.Generator` passed in, so it can be derived from (seed, epoch, index) and repeats exactly.
"""
from __future__ import annotations

import dataclasses
import io
import math
from typing import TYPE_CHECKING, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
  from mambaout_jax.data.randaugment import RandAugment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC, 'nearest': Image.NEAREST,
                  'lanczos': Image.LANCZOS, 'box': Image.BOX, 'hamming': Image.HAMMING}
RANDOM_INTERPOLATION = (Image.BILINEAR, Image.BICUBIC)  # timm's 'random' (crop and RandAugment)

_PIL_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageDecodeError(ValueError):
  """The bytes are not a decodable image (corrupt, truncated, unknown format)."""


def open_image(data: bytes) -> Image.Image:
  """Opens encoded image bytes lazily (header only); raises `ImageDecodeError` when corrupt."""
  if not data:
    raise ImageDecodeError('empty file (0 bytes)')
  try:
    return Image.open(io.BytesIO(data))
  except UnidentifiedImageError as e:
    raise ImageDecodeError(f'not an image format PIL reads (starts with {bytes(data[:8])!r})') from e
  except _PIL_DECODE_ERRORS as e:
    raise ImageDecodeError(str(e)) from e


def _decoded(fn, *args):
  try:
    return fn(*args)
  except _PIL_DECODE_ERRORS as e:
    raise ImageDecodeError(str(e)) from e


def random_interpolation(rng: np.random.Generator):
  return RANDOM_INTERPOLATION[rng.integers(0, len(RANDOM_INTERPOLATION))]


_SIXTEEN_BIT_GREY = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')


def to_rgb(img: Image.Image) -> Image.Image:
  """Decodes and converts grey, 16-bit, CMYK, palette and alpha images to 8-bit RGB.

  PIL clips 16-bit grey to 0..255 when converting (nearly all white); it is scaled by 1/256 here,
  as PIL itself reduces 16-bit RGB PNGs. Float images have no defined range: ImageDecodeError.
  """
  if img.mode in _SIXTEEN_BIT_GREY:
    grey = np.clip(np.asarray(img, np.int64) >> 8, 0, 255).astype(np.uint8)
    return Image.fromarray(grey, 'L').convert('RGB')
  if img.mode == 'F':
    raise ImageDecodeError('32-bit float images are not supported; convert them to 8/16-bit')
  if img.mode == 'P' and 'transparency' in img.info:
    img = img.convert('RGBA')
  if img.mode == 'RGB':
    img.load()  # Decode now, so a truncated file fails here rather than in a later resize.
    return img
  return img.convert('RGB')


def decode_rgb(data: bytes) -> Image.Image:
  """Encoded bytes -> fully decoded 8-bit RGB image; `ImageDecodeError` when they do not decode."""
  return _decoded(to_rgb, open_image(data))


def resize_and_center_crop(image: Image.Image, image_size: int = 224, crop_pct: float = 1.0,
                           resample=Image.BICUBIC) -> Image.Image:
  """torchvision's eval geometry: shorter side to int(image_size / crop_pct), centre crop."""
  scale_size = math.floor(image_size / crop_pct)
  w, h = image.size
  if w <= h:  # torchvision Resize(int): the longer side is truncated
    new_w, new_h = scale_size, int(scale_size * h / w)
  else:
    new_w, new_h = int(scale_size * w / h), scale_size
  image = image.resize((new_w, new_h), resample)
  top = int(round((new_h - image_size) / 2.0))
  left = int(round((new_w - image_size) / 2.0))
  return image.crop((left, top, left + image_size, top + image_size))


def normalize(img: Image.Image | np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
  """uint8 HWC -> float32 (x / 255 - mean) / std: torchvision's ToTensor + Normalize, to ~1e-7."""
  scale = 1.0 / (255.0 * np.asarray(std, np.float64))
  bias = -np.asarray(mean, np.float64) / np.asarray(std, np.float64)
  x = np.asarray(img, dtype=np.float32)  # A fresh array: PIL images are copied.
  if not x.flags.writeable:
    x = x.copy()
  x *= scale.astype(np.float32)
  x += bias.astype(np.float32)
  return x


# ----------------------------------------------------------------------------------------------
# RandomResizedCrop


def random_resized_crop_params(
    rng: np.random.Generator, width: int, height: int, scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """(top, left, crop_h, crop_w) as torchvision/timm: 10 tries, then a centre crop, legal ratio."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = rng.uniform(*scale) * area
    aspect_ratio = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect_ratio)))
    h = int(round(math.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(img: Image.Image, box: tuple[int, int, int, int], size: int, resample,
                 draft: bool = True) -> Image.Image:
  """Crops `box` = (top, left, h, w) (full-resolution coordinates) and resizes it to size x size.

  With `draft`, a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps at least `size`
  crop pixels each way; otherwise this is torchvision's crop-then-resize.
  """
  top, left, h, w = box
  full_w, full_h = img.size
  if draft and img.format == 'JPEG' and min(w, h) >= 2 * size:
    img.draft('RGB', (math.ceil(full_w * size / w), math.ceil(full_h * size / h)))
    if img.size != (full_w, full_h):
      sx, sy = img.size[0] / full_w, img.size[1] / full_h
      return to_rgb(img).resize((size, size), resample,
                                box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
  img = to_rgb(img)
  return img.crop((left, top, left + w, top + h)).resize((size, size), resample)


# ----------------------------------------------------------------------------------------------
# Random erasing (timm, applied after normalisation)


def random_erasing(x: np.ndarray, rng: np.random.Generator, probability: float = 0.25,
                   mode: str = 'pixel', min_area: float = 0.02, max_area: float = 1 / 3,
                   min_aspect: float = 0.3) -> np.ndarray:
  """Erases one random rectangle of the normalised HWC image `x` (in place) with probability p."""
  if probability <= 0 or rng.random() > probability:
    return x
  height, width, channels = x.shape
  log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
  for _ in range(10):
    target_area = rng.uniform(min_area, max_area) * height * width
    aspect_ratio = math.exp(rng.uniform(*log_aspect))
    h = int(round(math.sqrt(target_area * aspect_ratio)))
    w = int(round(math.sqrt(target_area / aspect_ratio)))
    if w < width and h < height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      if mode == 'pixel':
        fill = rng.standard_normal((h, w, channels), dtype=np.float32)
      elif mode == 'rand':
        fill = rng.standard_normal((1, 1, channels), dtype=np.float32)
      elif mode == 'const':
        fill = 0.0
      else:
        raise ValueError(f'unknown random erasing mode {mode!r}; use pixel, rand or const')
      x[top:top + h, left:left + w] = fill
      break
  return x


# ----------------------------------------------------------------------------------------------
# The two transforms


def _interpolation(name: str):
  if name == 'random':
    return None
  if name not in INTERPOLATIONS:
    raise ValueError(
        f'unknown interpolation {name!r}; use random or one of {", ".join(INTERPOLATIONS)}')
  return INTERPOLATIONS[name]


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """encoded bytes + rng -> float32 (size, size, 3): timm's `create_transform(is_training=True)`."""
  size: int = 224
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  interpolation: str = 'random'
  hflip: float = 0.5
  randaugment: Optional[RandAugment] = None
  reprob: float = 0.25
  remode: str = 'pixel'
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  jpeg_draft: bool = True

  @classmethod
  def from_config(cls, config) -> 'TrainTransform':
    from mambaout_jax.data.randaugment import parse_randaugment  # It imports this module.
    aug = config.get('aug', {})
    interpolation = aug.get('interpolation', 'random')
    ra_spec = aug.get('randaugment', 'rand-m9-mstd0.5-inc1')
    mean = tuple(config.get('input', {}).get('mean', IMAGENET_MEAN))
    randaugment = parse_randaugment(
        ra_spec, fill=tuple(int(round(255 * m)) for m in mean),
        interpolation=_interpolation(interpolation))
    return cls(
        size=config.image_size, scale=tuple(aug.get('scale', (0.08, 1.0))),
        ratio=tuple(aug.get('ratio', (3 / 4, 4 / 3))), interpolation=interpolation,
        hflip=aug.get('hflip', 0.5), randaugment=randaugment, reprob=aug.get('reprob', 0.25),
        remode=aug.get('remode', 'pixel'), mean=mean,
        std=tuple(config.get('input', {}).get('std', IMAGENET_STD)),
        jpeg_draft=config.get('input', {}).get('jpeg_draft', True))

  def __call__(self, data: bytes, rng: np.random.Generator) -> np.ndarray:
    img = open_image(data)
    box = random_resized_crop_params(rng, *img.size, scale=self.scale, ratio=self.ratio)
    resample = _interpolation(self.interpolation)
    if resample is None:
      resample = random_interpolation(rng)
    img = _decoded(resized_crop, img, box, self.size, resample, self.jpeg_draft)
    if self.hflip > 0 and rng.random() < self.hflip:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if self.randaugment is not None:
      img = self.randaugment(img, rng)
    x = normalize(img, self.mean, self.std)
    return random_erasing(x, rng, self.reprob, self.remode)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """encoded bytes -> float32 (size, size, 3): shorter side to int(size / crop_pct), centre crop."""
  size: int = 224
  crop_pct: float = 1.0
  interpolation: str = 'bicubic'
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD

  @classmethod
  def from_config(cls, config) -> 'EvalTransform':
    aug, inp = config.get('aug', {}), config.get('input', {})
    return cls(size=config.image_size, crop_pct=aug.get('crop_pct', 1.0),
               interpolation=aug.get('eval_interpolation', 'bicubic'),
               mean=tuple(inp.get('mean', IMAGENET_MEAN)), std=tuple(inp.get('std', IMAGENET_STD)))

  def __call__(self, data: bytes) -> np.ndarray:
    img = resize_and_center_crop(decode_rgb(data), self.size, self.crop_pct,
                                 INTERPOLATIONS[self.interpolation])
    return normalize(img, self.mean, self.std)
