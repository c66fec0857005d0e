"""`digit_scenes`: the embedded segmentation demo set, scenes made of scikit-learn's real digit scans.

Each scene is an RGB canvas with a dark, smooth, noisy, coloured background and 1 to 3 handwritten
digits (scikit-learn's 8x8 scans of the UCI "optdigits" set, which ship inside the package: no
download) scaled to 20..32 px and pasted in a bright random colour at random positions that do not
overlap. Labels (one per pixel, 11 classes):

  0..9  the digit's region: its stroke (scan intensity after scaling > 20%) grown by size // 8 px
        (a max filter), so a region is several cells wide at the decode head's stride 4
  10    background

Why regions and not strokes: a stroke core is 2..4 px wide, narrower than one cell of the stride-4
logits, and a model trained on strokes learns where digits are long before which digit they are.

The digit scans are split as in `mambaout_digits` (every fifth scan is validation), so validation
scenes show handwriting never seen in training. Scenes are a pure function of (split, index): the
source is random access, needs no preparation and is identical on every host. Training scenes are
64x64; validation scenes have random sizes (48..80 px a side) so evaluation exercises images of
different sizes. Records are PNG-encoded like the ADE20K source's: {'image': RGB PNG bytes,
'label': single-channel PNG bytes, 'name': str}.
"""
from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageFilter

NAME = 'digit_scenes'
NUM_CLASSES = 11
BACKGROUND = 10
CLASS_NAMES = tuple(str(d) for d in range(10)) + ('background',)
SPLIT_SIZES = {'train': 4096, 'validation': 256}
TRAIN_SIZE = 64
VALIDATION_SIZES = (48, 80)      # inclusive range of each side of a validation scene
DIGIT_SIZES = (20, 32)
MAX_DIGITS = 3
STROKE = 0.2                     # scan intensity (0..1) above which a pixel is stroke
PLACEMENT_TRIES = 20             # random positions tried per digit before it is left out
_SEED = 20_250_525               # the dataset's own seed: scenes do not depend on config.seed


@functools.lru_cache(maxsize=None)
def _scans(split: str) -> tuple[np.ndarray, np.ndarray]:
  from mambaout_jax.data import digits
  images, labels = digits.load_digits_uint8()
  is_val = np.arange(len(images)) % digits.VALIDATION_EVERY == 0
  keep = is_val if split == 'validation' else ~is_val
  return images[keep], labels[keep]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """Dark smooth colour blobs plus pixel noise, float32 (h, w, 3) in [0, ~110]."""
  base = rng.uniform(0, 80, size=3)
  coarse = rng.normal(0, 15, size=(4, 4, 3)) + base
  blobs = np.stack([np.asarray(Image.fromarray(coarse[..., c].astype(np.float32), mode='F')
                               .resize((w, h), Image.BICUBIC)) for c in range(3)], axis=-1)
  return np.clip(blobs + rng.normal(0, 8, size=(h, w, 3)), 0, 255).astype(np.float32)


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
  """`mask` dilated by `pixels` (a (2p+1)^2 max filter)."""
  grown = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * pixels + 1))
  return np.asarray(grown) > 0


def make_scene(split: str, index: int) -> tuple[np.ndarray, np.ndarray]:
  """Scene `index` of `split`: (uint8 image (h, w, 3), uint8 label (h, w))."""
  if split not in SPLIT_SIZES:
    raise ValueError(f'unknown split {split!r} of {NAME!r}; choose one of {sorted(SPLIT_SIZES)}')
  rng = np.random.default_rng((_SEED, list(SPLIT_SIZES).index(split), int(index)))
  scans, digit_labels = _scans(split)
  if split == 'train':
    h = w = TRAIN_SIZE
  else:
    h, w = (int(v) for v in rng.integers(VALIDATION_SIZES[0], VALIDATION_SIZES[1] + 1, size=2))
  image = _background(rng, h, w)
  label = np.full((h, w), BACKGROUND, np.uint8)
  taken = np.zeros((h, w), bool)
  for _ in range(rng.integers(1, MAX_DIGITS + 1)):
    for _ in range(PLACEMENT_TRIES):   # the first digit always fits (the canvas is empty)
      size = int(rng.integers(DIGIT_SIZES[0], DIGIT_SIZES[1] + 1))
      y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
      if not taken[y:y + size, x:x + size].any():
        break
    else:
      continue
    k = rng.integers(len(scans))
    alpha = np.asarray(Image.fromarray(scans[k].astype(np.float32) / 255.0, mode='F')
                       .resize((size, size), Image.BICUBIC)).clip(0, 1)
    colour = rng.uniform(150, 255, size=3)
    region = (slice(y, y + size), slice(x, x + size))
    a = alpha[..., None]
    image[region] = image[region] * (1 - a) + colour * a
    taken[region] = True
    label[region][_grow(alpha > STROKE, size // 8)] = digit_labels[k]
  return np.round(image).astype(np.uint8), label


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG', compress_level=1)
  return buffer.getvalue()


class DigitScenes:
  """Random-access source of split `split`: PNG-encoded {'image', 'label', 'name'} records."""

  def __init__(self, split: str):
    if split not in SPLIT_SIZES:
      raise ValueError(f'unknown split {split!r} of {NAME!r}; choose one of '
                       f'{sorted(SPLIT_SIZES)}')
    self.split = split

  def __len__(self) -> int:
    return SPLIT_SIZES[self.split]

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'{NAME} {self.split}: index {index} out of range [0, {len(self)})')
    image, label = make_scene(self.split, index)
    return {'image': _png(image), 'label': _png(label), 'name': f'{self.split}_{index:05d}'}
