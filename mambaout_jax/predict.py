"""Classify images with a MambaOut checkpoint, using the official eval preprocessing.

    python -m mambaout_jax.predict --variant=mambaout_femto --checkpoint=/tmp/femto cat.jpg dog.png

Preprocessing (timm / official eval): resize the shorter side to int(image_size / crop_pct) with
PIL bicubic, centre crop image_size, scale to [0, 1], normalise with ImageNet mean/std. Prints the
top-k ImageNet classes with probabilities per image. A file that is missing or not an image gets a
one-line error and the remaining images are still classified (exit status 1 if any failed).
"""
from __future__ import annotations

import functools
import os
import sys

import numpy as np

from mambaout_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: F401  (public here)
from mambaout_jax.data.transforms import normalize, resize_and_center_crop, to_rgb


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, str], ...]:
  """The 1000 ImageNet-1k classes in label order: (synset id, WordNet lemmas)."""
  path = os.path.join(os.path.dirname(__file__), 'imagenet_classes.tsv')
  with open(path) as f:
    return tuple(tuple(line.rstrip('\n').split('\t', 1)) for line in f if line.strip())


def load_image(path: str):
  """Opens an image as 8-bit RGB (grey, 16-bit, palette, CMYK and alpha images are converted)."""
  from PIL import Image, UnidentifiedImageError
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file')
  try:
    with Image.open(path) as im:
      return to_rgb(im).copy()
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise ValueError(f'{path}: not a readable image ({e.__class__.__name__}: {e})') from None


def preprocess(image, image_size: int = 224, crop_pct: float = 1.0) -> np.ndarray:
  """PIL RGB image -> float32 (image_size, image_size, 3), exactly torchvision's eval transform."""
  return normalize(resize_and_center_crop(image, image_size, crop_pct))


def topk(logits: np.ndarray, k: int = 5) -> list[list[tuple[int, float]]]:
  """Per row: the k (class index, probability) pairs with the highest softmax probability."""
  logits = np.asarray(logits, np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  idx = np.argsort(-p, axis=-1)[:, :k]
  return [[(int(i), float(row[i])) for i in ids] for ids, row in zip(idx, p)]


def class_name(index: int, num_classes: int) -> str:
  if num_classes == 1000:
    synset, lemmas = imagenet_classes()[index]
    return f'{lemmas.split(",")[0]} ({synset})'
  return f'class {index}'


def main(argv=None) -> int:
  import argparse
  p = argparse.ArgumentParser(prog='python -m mambaout_jax.predict', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--variant', required=True)
  p.add_argument('--checkpoint', required=True, help='params checkpoint dir (convert or export)')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--crop_pct', type=float, default=1.0)
  p.add_argument('--topk', type=int, default=5)
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('images', nargs='+')
  args = p.parse_args(argv)

  import jax
  from mambaout_jax.params import load_pretrained
  try:
    model = load_pretrained(args.variant, args.checkpoint)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  forward = jax.jit(lambda x: model(x))

  failed = 0
  good: list[tuple[str, np.ndarray]] = []
  for path in args.images:
    try:
      good.append((path, preprocess(load_image(path), args.image_size, args.crop_pct)))
    except (ValueError, FileNotFoundError) as e:
      print(f'error: {e}', file=sys.stderr)
      failed += 1
  for start in range(0, len(good), args.batch_size):
    chunk = good[start:start + args.batch_size]
    logits = np.asarray(forward(np.stack([x for _, x in chunk])))
    for (path, _), preds in zip(chunk, topk(logits, args.topk)):
      print(path)
      for i, prob in preds:
        print(f'  {prob:7.4f}  {class_name(i, model.num_classes)}')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
