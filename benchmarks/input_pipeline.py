r"""Training-transform throughput per CPU core: ours (PIL/numpy) vs timm's on the same JPEGs.

Both sides decode the same ImageNet-sized JPEG bytes (default 500x375, quality 90) and run the
MambaOut/DeiT recipe at 224: RandomResizedCrop (random bilinear/bicubic), hflip, RandAugment
rand-m9-mstd0.5-inc1, normalise, random erasing 0.25 (pixel). timm is
`create_transform(is_training=True, auto_augment='rand-m9-mstd0.5-inc1', ...)` on
`Image.open(...).convert('RGB')`, as timm's dataset loader does. One process, one thread each
(torch.set_num_threads(1)), so the numbers are images/s per core.

  python benchmarks/input_pipeline.py [--num_images=64] [--repeats=5] [--json]
      [--roofline=ROOFLINE.jsonl ...] [--rate=MODEL@KIND=IMG_PER_S_PER_CHIP ...]

The transforms are timed in rounds (each round runs every transform over all images, the order
rotating from round to round) and reported as the median over rounds with the spread (IQR/median).

Feeding a TPU host: given the roofline ceiling of images/s per chip for a model (the
`images_per_second_per_chip_ceiling` that `python -m mambaout_jax.aot --json` prints; pass its
output lines with --roofline, or give the rate with --rate), it prints how many of these cores a
host needs to decode + augment that many images for all its chips, against the host's vCPUs
(`HOSTS`). A core here is one vCPU of the machine running this script; the roofline rate is an
upper bound on the step rate, so this is the most a host can be asked for.

With --pipeline_workers=0,2 it also measures the whole Grain training pipeline
(`create_train_iterator` on an image folder of the same JPEGs, batches of 32) with that many
worker processes: images/s for the machine, not per core.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mambaout_jax.data import randaugment  # noqa: E402
from mambaout_jax.data import transforms  # noqa: E402


def photo_jpeg(seed: int, width: int, height: int, quality: int = 90) -> bytes:
  """A photo-like JPEG: smooth colour fields, edges and texture (compresses like a photo)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
  image = np.zeros((height, width, 3), np.float32)
  for _ in range(6):
    cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 0.75), rng.uniform(0.05, 0.4)
    blob = ((x - cx) ** 2 + (y - cy) ** 2) < r ** 2
    image[blob] = rng.uniform(0, 1, 3)
  for c in range(3):
    f = rng.uniform(2, 10, 2)
    image[..., c] += 0.25 * np.sin(f[0] * np.pi * x) * np.cos(f[1] * np.pi * y)
  image += 0.04 * rng.standard_normal(image.shape)
  buffer = io.BytesIO()
  Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(
      buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


# TPU VM hosts (Google Cloud TPU docs, "TPU v4" and "TPU v5e" pages: machine types): chips per host
# and vCPUs per host, keyed by device_kind as libtpu names it. Multi-host v5e slices (v5e-16 and
# larger) are built from 4-chip ct5lp-hightpu-4t hosts; a v4 host (240 vCPUs) drives 4 chips.
HOSTS = {'TPU v5 lite': (4, 112), 'TPU v5e': (4, 112), 'TPU v4': (4, 240)}


def interleaved_rates(fns: dict, jpegs, repeats: int) -> dict:
  """Images/s per transform: median and spread over rounds, rotating the order every round."""
  names = list(fns)
  for name in names:
    fns[name](jpegs[0], 0)  # Warm-up.
  times = {name: [] for name in names}
  for r in range(repeats):
    for name in names[r % len(names):] + names[:r % len(names)]:
      start = time.perf_counter()
      for i, data in enumerate(jpegs):
        fns[name](data, r * len(jpegs) + i)
      times[name].append(time.perf_counter() - start)
  out = {}
  for name, t in times.items():
    q25, med, q75 = np.percentile(t, [25, 50, 75])
    out[f'{name}_img_per_s_per_core'] = len(jpegs) / med
    out[f'{name}_spread'] = (q75 - q25) / med
  return out


def read_rates(roofline_files, rate_flags) -> list[dict]:
  """[{model, device_kind, topology, img_per_s_per_chip}] from aot --json lines or --rate flags."""
  rates = []
  for path in roofline_files:
    with open(path) as f:
      for line in f:
        line = line.strip()
        if line.startswith('{'):
          r = json.loads(line)
          rates.append({'model': r['model'], 'device_kind': r['device_kind'],
                        'topology': r['topology'],
                        'img_per_s_per_chip': r['images_per_second_per_chip_ceiling']})
  for flag in rate_flags:
    try:
      model_kind, rate = flag.split('=')
      model, kind = model_kind.split('@')
      rates.append({'model': model, 'device_kind': kind, 'topology': kind,
                    'img_per_s_per_chip': float(rate)})
    except ValueError:
      raise SystemExit(f"--rate={flag!r}: expected MODEL@KIND=IMAGES_PER_S_PER_CHIP, e.g. "
                       "'mambaout_tiny@TPU v4=1800'")
  for r in rates:
    if r['device_kind'] not in HOSTS:
      raise SystemExit(f"no host size known for {r['device_kind']!r}; known: {sorted(HOSTS)}")
  return rates


def cores_to_feed(rates: list[dict], img_per_s_per_core: float) -> list[dict]:
  out = []
  for r in rates:
    chips, vcpus = HOSTS[r['device_kind']]
    host_rate = chips * r['img_per_s_per_chip']
    cores = host_rate / img_per_s_per_core
    out.append({**r, 'chips_per_host': chips, 'host_vcpus': vcpus,
                'img_per_s_per_host': host_rate, 'cores_needed': cores,
                'fraction_of_host_vcpus': cores / vcpus})
  return out


def pipeline_images_per_second(jpegs, size: int, num_workers: int, batch: int = 32,
                               num_batches: int = 8) -> float:
  import tempfile
  import ml_collections
  from mambaout_jax import data
  root = tempfile.mkdtemp()
  for i, jpeg in enumerate(jpegs):
    os.makedirs(f'{root}/train/class{i % 10}', exist_ok=True)
    with open(f'{root}/train/class{i % 10}/{i}.jpg', 'wb') as f:
      f.write(jpeg)
  config = ml_collections.ConfigDict(dict(
      seed=0, image_size=size, batch_size=batch,
      dataset=dict(name=f'folder:{root}', train_split='train'),
      aug=dict(randaugment='rand-m9-mstd0.5-inc1', reprob=0.25),
      input=dict(num_workers=num_workers, prefetch=2)))
  iterator = data.create_train_iterator(config, process_index=0, process_count=1)
  try:
    next(iterator)  # Start-up (worker processes) excluded.
    start = time.perf_counter()
    for _ in range(num_batches):
      next(iterator)
    return batch * num_batches / (time.perf_counter() - start)
  finally:
    iterator.close()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--width', type=int, default=500)
  parser.add_argument('--height', type=int, default=375)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--pipeline_workers', default='',
                      help='comma-separated worker counts for the whole-pipeline measurement')
  parser.add_argument('--roofline', action='append', default=[],
                      help='file of `python -m mambaout_jax.aot --json` output lines')
  parser.add_argument('--rate', action='append', default=[],
                      help='MODEL@KIND=IMG_PER_S_PER_CHIP, e.g. "mambaout_tiny@TPU v4=1800"')
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()
  rates = read_rates(args.roofline, args.rate)

  import random
  import torch
  import timm.data
  torch.set_num_threads(1)
  jpegs = [photo_jpeg(i, args.width, args.height) for i in range(args.num_images)]
  spec = 'rand-m9-mstd0.5-inc1'

  ours_fn = transforms.TrainTransform(
      size=args.size, randaugment=randaugment.parse_randaugment(spec))
  ours_no_draft_fn = transforms.TrainTransform(
      size=args.size, randaugment=randaugment.parse_randaugment(spec), jpeg_draft=False)
  timm_fn = timm.data.create_transform(
      input_size=args.size, is_training=True, auto_augment=spec, interpolation='random',
      re_prob=0.25, re_mode='pixel', re_count=1)

  def ours(data, i):
    return ours_fn(data, np.random.default_rng((0, 0, i)))

  def ours_no_draft(data, i):
    return ours_no_draft_fn(data, np.random.default_rng((0, 0, i)))

  def timm_transform(data, i):
    random.seed(i)
    torch.manual_seed(i)
    return timm_fn(Image.open(io.BytesIO(data)).convert('RGB'))

  import PIL
  results = {
      'image': f'{args.width}x{args.height} JPEG q90', 'num_images': args.num_images,
      'rounds': args.repeats, 'cpu': next((line.split(':', 1)[1].strip()
                                            for line in open('/proc/cpuinfo')
                                            if line.startswith('model name')), '?'),
      'pillow': PIL.__version__, 'timm': timm.__version__, 'torch_threads': torch.get_num_threads(),
      'load_average': os.getloadavg(),
      **interleaved_rates({'ours': ours, 'ours_no_draft': ours_no_draft, 'timm': timm_transform},
                          jpegs, args.repeats),
  }
  timm_speed = results['timm_img_per_s_per_core']
  results['speedup_vs_timm'] = results['ours_img_per_s_per_core'] / timm_speed
  results['speedup_vs_timm_no_draft'] = results['ours_no_draft_img_per_s_per_core'] / timm_speed
  for workers in filter(None, args.pipeline_workers.split(',')):
    results[f'pipeline_img_per_s_workers_{workers}'] = pipeline_images_per_second(
        jpegs, args.size, int(workers))
  feed = cores_to_feed(rates, results['ours_img_per_s_per_core'])
  results['cores_to_feed'] = feed
  if args.json:
    print(json.dumps(results))
  else:
    for key, value in results.items():
      if key != 'cores_to_feed':
        print(f'{key:36s} {value:.2f}' if isinstance(value, float) else f'{key:36s} {value}')
    if feed:
      print('| model | host (chips, vCPUs) | roofline img/s per chip | img/s per host | '
            'cores needed (ours) | of host vCPUs |')
      for r in feed:
        print(f"| {r['model']} | {r['topology']} ({r['chips_per_host']}, {r['host_vcpus']}) | "
              f"{r['img_per_s_per_chip']:.0f} | {r['img_per_s_per_host']:.0f} | "
              f"{r['cores_needed']:.1f} | {r['fraction_of_host_vcpus']:.0%} |")


if __name__ == '__main__':
  main()
