"""RandAugment with timm's op set and magnitude semantics, on PIL images.

`rand-m9-mstd0.5-inc1` (the MambaOut / DeiT recipe): each image gets 2 ops drawn uniformly with
replacement from the 15 "increasing severity" ops; each op runs with probability 0.5 at magnitude
N(9, 0.5) clipped to [0, 10]. Signed ops negate their argument with probability 0.5. Geometric ops
fill with the ImageNet mean colour and pick bilinear or bicubic at random, as in timm. All
randomness comes from the `np.random.Generator` passed in, so augmentations are reproducible.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from mambaout_jax.data.transforms import random_interpolation

LEVEL_DENOM = 10.0

INCREASING_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
    'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
    'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel')
ORIGINAL_OPS = (
    'AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd',
    'Color', 'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel',
    'TranslateYRel')


# ----------------------------------------------------------------------------------------------
# Ops: PIL image + argument(s) -> PIL image. `fill` and `resample` only matter for geometric ops.


def _affine(img, matrix, fill, resample):
  return img.transform(img.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)


def shear_x(img, factor, fill, resample):
  return _affine(img, (1, factor, 0, 0, 1, 0), fill, resample)


def shear_y(img, factor, fill, resample):
  return _affine(img, (1, 0, 0, factor, 1, 0), fill, resample)


def translate_x_rel(img, pct, fill, resample):
  return _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), fill, resample)


def translate_y_rel(img, pct, fill, resample):
  return _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), fill, resample)


def rotate(img, degrees, fill, resample):
  return img.rotate(degrees, resample=resample, fillcolor=fill)


def solarize_add(img, add, thresh=128, **_):
  lut = [min(255, i + add) if i < thresh else i for i in range(256)]
  return img.point(lut * len(img.getbands()))


def posterize(img, bits, **_):
  if bits >= 8:
    return img
  if bits <= 0:  # No bit kept: black. (timm calls ImageOps.posterize(img, 0); Pillow rejects it.)
    return img.point([0] * 256 * len(img.getbands()))
  return ImageOps.posterize(img, bits)


def _enhance(enhancer) -> Callable:
  return lambda img, factor, **_: enhancer(img).enhance(factor)


OPS: dict[str, Callable] = {
    'AutoContrast': lambda img, **_: ImageOps.autocontrast(img),
    'Equalize': lambda img, **_: ImageOps.equalize(img),
    'Invert': lambda img, **_: ImageOps.invert(img),
    'Rotate': rotate,
    'Posterize': posterize,
    'PosterizeIncreasing': posterize,
    'Solarize': lambda img, thresh, **_: ImageOps.solarize(img, thresh),
    'SolarizeIncreasing': lambda img, thresh, **_: ImageOps.solarize(img, thresh),
    'SolarizeAdd': solarize_add,
    'Color': _enhance(ImageEnhance.Color),
    'ColorIncreasing': _enhance(ImageEnhance.Color),
    'Contrast': _enhance(ImageEnhance.Contrast),
    'ContrastIncreasing': _enhance(ImageEnhance.Contrast),
    'Brightness': _enhance(ImageEnhance.Brightness),
    'BrightnessIncreasing': _enhance(ImageEnhance.Brightness),
    'Sharpness': _enhance(ImageEnhance.Sharpness),
    'SharpnessIncreasing': _enhance(ImageEnhance.Sharpness),
    'ShearX': shear_x,
    'ShearY': shear_y,
    'TranslateXRel': translate_x_rel,
    'TranslateYRel': translate_y_rel,
}


# ----------------------------------------------------------------------------------------------
# Magnitude (0..10) -> op arguments, timm's mapping. `negate` is a coin flip for signed ops.


def op_args(name: str, magnitude: float, negate: bool, translate_pct: float = 0.45) -> tuple:
  level = magnitude / LEVEL_DENOM
  sign = -1.0 if negate else 1.0
  if name in ('AutoContrast', 'Equalize', 'Invert'):
    return ()
  if name == 'Rotate':
    return (sign * level * 30.0,)
  if name in ('ShearX', 'ShearY'):
    return (sign * level * 0.3,)
  if name in ('TranslateXRel', 'TranslateYRel'):
    return (sign * level * translate_pct,)
  if name == 'Posterize':
    return (int(level * 4),)
  if name == 'PosterizeIncreasing':
    return (4 - int(level * 4),)
  if name == 'Solarize':
    return (min(256, int(level * 256)),)
  if name == 'SolarizeIncreasing':
    return (256 - min(256, int(level * 256)),)
  if name == 'SolarizeAdd':
    return (min(128, int(level * 110)),)
  if name.endswith('Increasing'):  # Color/Contrast/Brightness/Sharpness: 1 +- 0.9 * level.
    return (max(0.1, 1.0 + sign * level * 0.9),)
  if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return (level * 1.8 + 0.1,)
  raise ValueError(f'unknown RandAugment op {name!r}; valid ops: {", ".join(OPS)}')


def apply_op(img, name: str, magnitude: float, *, negate: bool = False, fill=(128, 128, 128),
             resample=Image.BICUBIC, translate_pct: float = 0.45):
  """Applies op `name` at a fixed `magnitude` (0..10): the deterministic core of RandAugment."""
  return OPS[name](img, *op_args(name, magnitude, negate, translate_pct), fill=fill,
                   resample=resample)


# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """timm's RandAugment: `num_layers` ops chosen with replacement, each applied with `prob`."""
  ops: tuple[str, ...] = INCREASING_OPS
  num_layers: int = 2
  magnitude: float = 9.0
  magnitude_std: float = 0.0
  magnitude_max: float = LEVEL_DENOM
  prob: float = 0.5
  fill: tuple[int, int, int] = (124, 116, 104)  # round(255 * ImageNet mean)
  interpolation: int | None = None  # None: random bilinear/bicubic per op, as timm's default.
  translate_pct: float = 0.45

  def __call__(self, img, rng: np.random.Generator):
    for index in rng.integers(0, len(self.ops), self.num_layers):
      if self.prob < 1.0 and rng.random() > self.prob:
        continue
      magnitude = self.magnitude
      if self.magnitude_std == float('inf'):
        magnitude = rng.uniform(0, magnitude)
      elif self.magnitude_std > 0:
        magnitude = rng.normal(magnitude, self.magnitude_std)
      magnitude = max(0.0, min(magnitude, self.magnitude_max))
      negate = rng.random() > 0.5
      resample = self.interpolation
      if resample is None:
        resample = random_interpolation(rng)
      img = apply_op(img, self.ops[index], magnitude, negate=negate, fill=self.fill,
                     resample=resample, translate_pct=self.translate_pct)
    return img


def parse_randaugment(spec: str, *, fill=(124, 116, 104), interpolation=None) -> RandAugment | None:
  """Parses a timm RandAugment string such as 'rand-m9-mstd0.5-inc1' ('' or None: off)."""
  if not spec:
    return None
  parts = spec.split('-')
  if parts[0] != 'rand':
    raise ValueError(
        f'RandAugment spec {spec!r} must start with "rand-", e.g. "rand-m9-mstd0.5-inc1"')
  kwargs: dict = {}
  increasing = False
  for part in parts[1:]:
    match = re.fullmatch(r'([a-z]+)([\d.]+)', part)
    if match is None:
      raise ValueError(f'cannot parse {part!r} in RandAugment spec {spec!r}; sections look like '
                       'm9, n2, mstd0.5, mmax10, inc1, p0.5')
    key, value = match.groups()
    if key == 'm':
      kwargs['magnitude'] = float(value)
    elif key == 'n':
      kwargs['num_layers'] = int(value)
    elif key == 'p':
      kwargs['prob'] = float(value)
    elif key == 'mstd':
      kwargs['magnitude_std'] = float('inf') if float(value) > 100 else float(value)
    elif key == 'mmax':
      kwargs['magnitude_max'] = float(value)
    elif key == 'inc':
      increasing = bool(int(value))
    else:
      raise ValueError(f'unknown section {part!r} in RandAugment spec {spec!r}; known: m, n, p, '
                       'mstd, mmax, inc')
  ops = INCREASING_OPS if increasing else ORIGINAL_OPS
  return RandAugment(ops=ops, fill=tuple(fill), interpolation=interpolation, **kwargs)
