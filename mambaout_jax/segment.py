"""Segment images with a UperNet checkpoint, using the ADE20K eval pipeline (mmsegmentation's).

    python -m mambaout_jax.segment --variant=upernet_mambaout_tiny --checkpoint=DIR \\
        --out=OUTDIR [--mode=whole|slide] [--scale=2048,512] [--ms_flip] IMAGE...

Per image: keep-ratio rescale to `--scale` (long side <= 2048, short side <= 512, bilinear),
ImageNet normalisation, whole-image or sliding-window (crop 512, stride 341) inference, logits
resized back to the input size, argmax. Writes OUTDIR/STEM.png, the class index of every pixel
(uint8, the model's label space: 0..149 for ADE20K, whose 'other' label 0 was dropped), the same
size as the input, and OUTDIR/STEM_overlay.png, the image blended with a colour per class. A
file that is missing or not an image gets a one-line error and the rest are still segmented (exit
status 1 if any failed). Each distinct image size compiles once.

The checkpoint is a params checkpoint (the trainer's export) holding the BatchNorm statistics
beside the parameters (`.../bn/mean`, `.../bn/var`).
"""
from __future__ import annotations

import functools
import os
import sys

import numpy as np

DEFAULT_SCALE = (2048, 512)


def palette(num_classes: int) -> np.ndarray:
  """(num_classes, 3) uint8 colours, fixed for a given number of classes."""
  return np.random.default_rng(0).integers(0, 256, (num_classes, 3), dtype=np.uint8)


def preprocess(image: np.ndarray, scale=DEFAULT_SCALE) -> np.ndarray:
  """uint8 RGB (H, W, 3) -> normalised float32 at the eval size (the eval data pipeline's steps)."""
  from mambaout_jax.data.seg_transforms import rescale_size, resize_pair
  from mambaout_jax.data.transforms import normalize
  image, _ = resize_pair(image, None, rescale_size(image.shape[1], image.shape[0], scale))
  return normalize(image)


def _parse_scale(text: str) -> tuple[int, int]:
  try:
    w, h = (int(v) for v in text.split(','))
    if w < 1 or h < 1:
      raise ValueError
  except ValueError:
    raise ValueError(f'bad --scale {text!r}; give LONG,SHORT bounds, e.g. 2048,512') from None
  return w, h


def main(argv=None) -> int:
  import argparse
  p = argparse.ArgumentParser(prog='python -m mambaout_jax.segment', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--variant', required=True)
  p.add_argument('--checkpoint', required=True, help='params checkpoint dir (trainer export)')
  p.add_argument('--out', required=True, help='output directory (created)')
  p.add_argument('--mode', default='whole', choices=('whole', 'slide'))
  p.add_argument('--scale', default='2048,512', help='keep-ratio eval size bounds LONG,SHORT')
  p.add_argument('--crop', type=int, default=512, help='sliding-window size (--mode=slide)')
  p.add_argument('--stride', type=int, default=341, help='sliding-window stride (--mode=slide)')
  p.add_argument('--ms_flip', action='store_true',
                 help='multi-scale (0.5..1.75) + flip test, averaging probabilities')
  p.add_argument('images', nargs='+')
  args = p.parse_args(argv)

  import jax
  from flax import nnx
  from PIL import Image
  from mambaout_jax.params import load_pretrained
  from mambaout_jax.predict import load_image
  from mambaout_jax.tasks import seg_inference
  try:
    scale = _parse_scale(args.scale)
    model = load_pretrained(args.variant, args.checkpoint)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  if model.num_classes > 256:
    print(f'error: {model.num_classes} classes do not fit an 8-bit label PNG', file=sys.stderr)
    return 1
  colours = palette(model.num_classes)
  aug = dict(scales=seg_inference.MS_RATIOS, flip=True) if args.ms_flip else {}

  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit, static_argnames='out_hw')
  def segment(state, x, out_hw):
    """(h, w, 3) eval-size image -> (H, W) int32 labels at the original size `out_hw`."""
    return seg_inference.predict_labels(
        nnx.merge(graphdef, state), x[None], mode=args.mode, crop=args.crop, stride=args.stride,
        out_sizes=np.array([out_hw], np.int32), out_shape=out_hw, **aug)[0]

  os.makedirs(args.out, exist_ok=True)
  failed = 0
  for path in args.images:
    try:
      image = np.asarray(load_image(path))
    except (ValueError, FileNotFoundError) as e:
      print(f'error: {e}', file=sys.stderr)
      failed += 1
      continue
    h, w = image.shape[:2]
    x = preprocess(image, scale)
    labels = np.asarray(segment(state, x, (h, w)))
    stem = os.path.splitext(os.path.basename(path))[0]
    Image.fromarray(labels.astype(np.uint8), 'L').save(os.path.join(args.out, f'{stem}.png'))
    overlay = (0.5 * image + 0.5 * colours[labels]).astype(np.uint8)
    Image.fromarray(overlay, 'RGB').save(os.path.join(args.out, f'{stem}_overlay.png'))
    counts = np.bincount(labels.ravel(), minlength=model.num_classes)
    top = ', '.join(f'{c}: {100 * counts[c] / labels.size:.1f}%'
                    for c in np.argsort(-counts)[:3] if counts[c])
    print(f'{path} -> {os.path.join(args.out, stem)}.png ({w}x{h}; classes {top})')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
