"""Transforms vs timm/torchvision on fixed inputs, RandAugment ops, random erasing, Mixup/CutMix."""
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import timm.data
from timm.data import auto_augment as timm_aa
from timm.data import mixup as timm_mixup
import torch
from torchvision.transforms import functional as TF

from mambaout_jax.data import mixup_cutmix
from mambaout_jax.data import randaugment as RA
from mambaout_jax.data import transforms as T


def photo(width, height, seed=0):
  """A smooth, photo-like RGB image (gradients + blobs + a little noise), not just noise."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width] / max(width, height)
  channels = []
  for c in range(3):
    f = rng.uniform(2, 6, size=2)
    base = 0.5 + 0.3 * np.sin(f[0] * np.pi * x + c) * np.cos(f[1] * np.pi * y)
    channels.append(base + 0.05 * rng.standard_normal((height, width)))
  return Image.fromarray((np.clip(np.stack(channels, -1), 0, 1) * 255).astype(np.uint8))


def encode(img, fmt='PNG', **kwargs):
  buffer = io.BytesIO()
  img.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def timm_to_hwc(tensor):
  return tensor.numpy().transpose(1, 2, 0)


@pytest.mark.parametrize('width,height', [(97, 61), (50, 83), (64, 64)])
@pytest.mark.parametrize('crop_pct', [1.0, 0.875])
def test_eval_transform_matches_timm(width, height, crop_pct):
  img = photo(width, height)
  ours = T.EvalTransform(size=40, crop_pct=crop_pct)(encode(img))
  reference = timm.data.create_transform(input_size=40, is_training=False, interpolation='bicubic',
                                         crop_pct=crop_pct)(img)
  np.testing.assert_allclose(ours, timm_to_hwc(reference), atol=1e-5)


def test_normalize_matches_torchvision():
  img = photo(30, 20)
  reference = TF.normalize(TF.to_tensor(img), T.IMAGENET_MEAN, T.IMAGENET_STD)
  np.testing.assert_allclose(T.normalize(img), timm_to_hwc(reference), atol=1e-6)


@pytest.mark.parametrize('resample', [Image.BILINEAR, Image.BICUBIC])
def test_resized_crop_matches_torchvision(resample):
  img = photo(90, 70)
  box = (7, 12, 41, 55)  # top, left, height, width
  ours = T.resized_crop(T.open_image(encode(img)), box, 32, resample, draft=False)
  interpolation = {Image.BILINEAR: TF.InterpolationMode.BILINEAR,
                   Image.BICUBIC: TF.InterpolationMode.BICUBIC}[resample]
  reference = TF.resized_crop(img, *box, [32, 32], interpolation)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))


def test_jpeg_draft_decodes_large_crops_at_reduced_size_close_to_full_decode():
  data = encode(photo(1000, 750, seed=3), 'JPEG', quality=95)
  box = (50, 100, 600, 800)
  drafted = T.open_image(data)
  fast = np.asarray(T.resized_crop(drafted, box, 224, Image.BICUBIC, draft=True), np.float32)
  assert drafted.size == (500, 375)  # Decoded at 1/2 scale: the 800x600 crop still has >= 224 px.
  full = np.asarray(T.resized_crop(T.open_image(data), box, 224, Image.BICUBIC, draft=False),
                    np.float32)
  assert np.abs(fast - full).mean() < 2.0  # Out of 255.
  small_crop = T.open_image(data)
  T.resized_crop(small_crop, (0, 0, 300, 300), 224, Image.BICUBIC, draft=True)
  assert small_crop.size == (1000, 750)  # Too small a crop to decode at reduced size.


def test_random_resized_crop_params_follow_torchvision():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = T.random_resized_crop_params(rng, 120, 80, scale=(0.08, 1.0),
                                                   ratio=(3 / 4, 4 / 3))
    assert 0 <= top <= 80 - h and 0 <= left <= 120 - w
    assert 0.08 * 9600 * 0.9 <= h * w <= 9600
  # No legal crop in 10 attempts: a centre crop at the closest legal ratio, as torchvision.
  assert T.random_resized_crop_params(rng, 400, 40, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)) == (
      0, (400 - 53) // 2, 40, 53)
  assert T.random_resized_crop_params(rng, 40, 400, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3)) == (
      (400 - 53) // 2, 0, 53, 40)


def test_random_resized_crop_distribution_matches_torchvision():
  from torchvision.transforms import RandomResizedCrop
  torch.manual_seed(0)
  rng, img = np.random.default_rng(0), photo(160, 120)
  ours = np.array([T.random_resized_crop_params(rng, 160, 120) for _ in range(3000)], np.float64)
  theirs = np.array([RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
                     for _ in range(3000)], np.float64)
  for params in (ours, theirs):
    params[:, 0] = params[:, 2] * params[:, 3] / (160 * 120)  # area fraction
    params[:, 1] = np.log(params[:, 3] / params[:, 2])  # log aspect ratio
  for column in (0, 1):
    np.testing.assert_allclose(np.percentile(ours[:, column], [10, 50, 90]),
                               np.percentile(theirs[:, column], [10, 50, 90]), atol=0.03)


def test_train_transform_is_deterministic_given_the_generator():
  transform = T.TrainTransform(size=32, randaugment=RA.parse_randaugment('rand-m9-mstd0.5-inc1'))
  data = encode(photo(80, 60), 'JPEG')
  first = transform(data, np.random.default_rng((0, 1, 2)))
  again = transform(data, np.random.default_rng((0, 1, 2)))
  other = transform(data, np.random.default_rng((0, 2, 2)))
  assert first.shape == (32, 32, 3) and first.dtype == np.float32 and np.isfinite(first).all()
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)


# ----------------------------------------------------------------------------------------------
# RandAugment


@pytest.mark.parametrize('name', sorted(RA.OPS))
@pytest.mark.parametrize('magnitude', [3.0, 9.0, 10.0])
@pytest.mark.parametrize('negate', [False, True])
def test_randaugment_op_matches_timm(name, magnitude, negate, monkeypatch):
  img = photo(48, 40)
  monkeypatch.setattr(timm_aa, '_randomly_negate', lambda v: -v if negate else v)
  hparams = dict(translate_const=100, img_mean=(124, 116, 104))
  level_fn = timm_aa.LEVEL_TO_ARG[name]
  args = level_fn(magnitude, hparams) if level_fn is not None else ()
  if name.startswith('Posterize') and args[0] <= 0:  # Pillow rejects 0 bits; timm would crash.
    pytest.skip('timm passes 0 bits to ImageOps.posterize')
  reference = timm_aa.NAME_TO_OP[name](img, *args, fillcolor=(124, 116, 104),
                                       resample=Image.BICUBIC)
  ours = RA.apply_op(img, name, magnitude, negate=negate, fill=(124, 116, 104),
                     resample=Image.BICUBIC)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))


def test_posterize_at_full_magnitude_is_black():
  ours = RA.apply_op(photo(8, 8), 'PosterizeIncreasing', 10.0)
  assert np.asarray(ours).max() == 0


def test_randaugment_spec_parses_like_timm():
  ours = RA.parse_randaugment('rand-m9-mstd0.5-inc1')
  reference = timm_aa.rand_augment_transform('rand-m9-mstd0.5-inc1', {'img_mean': (124, 116, 104)})
  assert list(ours.ops) == [op.name for op in reference.ops]
  assert ours.num_layers == reference.num_layers == 2
  assert {ours.magnitude} == {op.magnitude for op in reference.ops} == {9}
  assert {ours.prob} == {op.prob for op in reference.ops} == {0.5}
  assert {ours.magnitude_std} == {op.magnitude_std for op in reference.ops} == {0.5}
  assert RA.parse_randaugment('') is None
  with pytest.raises(ValueError, match='rand-'):
    RA.parse_randaugment('augmix-m5')


def test_randaugment_applies_about_one_op_per_image_on_average():
  """2 layers at p=0.5: 25% of images untouched (timm's semantics), the rest changed."""
  augment = RA.parse_randaugment('rand-m9-mstd0.5-inc1')
  img = photo(24, 24)
  untouched = sum(
      np.array_equal(np.asarray(augment(img, np.random.default_rng(i))), np.asarray(img))
      for i in range(400))
  assert 60 <= untouched <= 150, untouched  # ~100 expected; some ops can be no-ops on an image.


# ----------------------------------------------------------------------------------------------
# Random erasing


def test_random_erasing_replaces_one_rectangle_with_normal_noise():
  rng = np.random.default_rng(0)
  areas = []
  for _ in range(100):
    x = np.full((40, 40, 3), 7.0, np.float32)
    T.random_erasing(x, rng, probability=1.0, mode='pixel')
    erased = (x != 7.0).any(-1)
    rows, cols = np.nonzero(erased)
    assert erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1].mean() > 0.99  # A box.
    areas.append(erased.mean())
  assert 0.015 < min(areas) and max(areas) < 0.36
  noise = x[x != 7.0]
  assert abs(noise.mean()) < 0.3 and 0.7 < noise.std() < 1.3
  x = np.zeros((40, 40, 3), np.float32)
  T.random_erasing(x, rng, probability=0.0)
  assert (x == 0).all()


# ----------------------------------------------------------------------------------------------
# Mixup / CutMix


MIX = jax.jit(mixup_cutmix, static_argnames=('num_classes', 'mixup_alpha', 'cutmix_alpha',
                                             'switch_prob', 'prob', 'label_smoothing'))


def _batch(seed=0, b=8, size=16, num_classes=10):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((b, size, size, 3)).astype(np.float32)
  labels = rng.permutation(num_classes)[:b].astype(np.int32)  # Distinct, so lam is identifiable.
  return jnp.asarray(images), jnp.asarray(labels)


def _lam_from_targets(targets, labels, num_classes, smoothing):
  off = smoothing / num_classes
  return float((targets[0, labels[0]] - off) / (1 - smoothing))


def _timm_targets(labels, num_classes, lam, smoothing):
  return timm_mixup.mixup_target(torch.as_tensor(np.array(labels), dtype=torch.long), num_classes,
                                 lam=lam, smoothing=smoothing).numpy()


def test_no_mixing_gives_label_smoothed_one_hot():
  images, labels = _batch()
  out, targets = mixup_cutmix(jax.random.key(0), images, labels, num_classes=10, mixup_alpha=0.0,
                              cutmix_alpha=0.0, switch_prob=0.5, prob=1.0, label_smoothing=0.1)
  np.testing.assert_array_equal(out, images)
  np.testing.assert_allclose(targets, _timm_targets(labels, 10, 1.0, 0.1), atol=1e-6)


@pytest.mark.parametrize('seed', range(3))
def test_mixup_matches_timm_for_the_drawn_lam(seed):
  images, labels = _batch(seed)
  out, targets = MIX(jax.random.key(seed), images, labels, num_classes=10, mixup_alpha=0.8,
                     cutmix_alpha=0.0, switch_prob=0.5, prob=1.0, label_smoothing=0.1)
  lam = _lam_from_targets(targets, labels, 10, 0.1)
  assert 0.0 <= lam <= 1.0
  np.testing.assert_allclose(targets, _timm_targets(labels, 10, lam, 0.1), atol=1e-5)
  reference = torch.as_tensor(np.array(images)).permute(0, 3, 1, 2)
  reference = reference * lam + reference.flip(0) * (1 - lam)  # timm's _mix_batch, mixup branch.
  np.testing.assert_allclose(out, reference.permute(0, 2, 3, 1).numpy(), atol=1e-4)


def _many(num_draws, **kwargs):
  """`num_draws` independent mixup_cutmix calls on one batch (one key each), and that batch."""
  images, labels = _batch()
  fn = jax.jit(jax.vmap(functools.partial(mixup_cutmix, num_classes=10, **kwargs),
                        in_axes=(0, None, None)))
  out, targets = fn(jax.random.split(jax.random.key(0), num_draws), images, labels)
  return np.asarray(out), np.asarray(targets), np.asarray(images), np.asarray(labels)


def _classify(out, images):
  """Per draw: 'cutmix' (every pixel from the image or the reversed batch, some from the latter),
  'mixup' (pixels strictly between the two) or 'unchanged'."""
  flipped = images[::-1]
  from_self = (out == images).all(-1)  # (draws, B, H, W)
  from_flipped = (out == flipped).all(-1) & ~from_self
  kinds = np.where(from_self.all((1, 2, 3)), 'unchanged',
                   np.where((from_self | from_flipped).all((1, 2, 3)), 'cutmix', 'mixup'))
  return kinds, from_flipped


def test_cutmix_pastes_one_box_from_the_reversed_batch_with_area_corrected_lam():
  out, targets, images, labels = _many(200, mixup_alpha=0.0, cutmix_alpha=1.0, switch_prob=0.5,
                                       prob=1.0, label_smoothing=0.1)
  kinds, from_flipped = _classify(out, images)
  # lam ~ U(0, 1): the box is empty only when int(16 * sqrt(1 - lam)) < 2, i.e. 1 - lam < 1/64.
  assert (kinds == 'cutmix').sum() >= 190 and (kinds != 'mixup').all(), kinds
  areas = []
  for draw in np.flatnonzero(kinds == 'cutmix'):
    box = from_flipped[draw, 0]
    rows, cols = np.nonzero(box)
    assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # One rectangle,
    assert (from_flipped[draw] == box).all()  # the same in every image of the batch.
    lam = _lam_from_targets(targets[draw], labels, 10, 0.1)
    np.testing.assert_allclose(lam, 1.0 - box.mean(), atol=1e-5)  # timm's correct_lam.
    np.testing.assert_allclose(targets[draw], _timm_targets(labels, 10, lam, 0.1), atol=1e-5)
    areas.append(box.mean())
  # Box area 1 - lam before clipping (mean 1/2); clipping to the image and int() shrink it.
  assert 0.25 < np.mean(areas) < 0.5, np.mean(areas)
  corners = {tuple(np.argwhere(from_flipped[d, 0]).min(0)) for d in np.flatnonzero(kinds == 'cutmix')}
  assert len(corners) > 50  # The box moves.


def _lam_from_images(out, images):
  """Least-squares lam of out = lam * x + (1 - lam) * x[::-1], per draw and image."""
  x, flipped = images, images[::-1]
  diff = (x - flipped).reshape(len(x), -1)
  return ((out - flipped).reshape(*out.shape[:2], -1) * diff).sum(-1) / (diff * diff).sum(-1)


def test_mixup_lam_recovered_from_the_images_follows_beta_alpha_alpha():
  from scipy import stats
  out, targets, images, labels = _many(4000, mixup_alpha=0.8, cutmix_alpha=0.0, switch_prob=0.5,
                                       prob=1.0, label_smoothing=0.0)
  lam_rows = _lam_from_images(out, images)
  lam = lam_rows[:, 0]
  np.testing.assert_allclose(lam_rows, np.repeat(lam[:, None], len(images), 1), atol=1e-5)
  # The targets say the same lam as the pixels.
  np.testing.assert_allclose(targets[:, 0, labels[0]], lam, atol=1e-5)
  assert stats.kstest(lam, 'beta', args=(0.8, 0.8)).pvalue > 0.01
  # The test has the power to see a wrong alpha (e.g. the CutMix alpha 1.0, or 0.5).
  assert stats.kstest(lam, 'beta', args=(1.0, 1.0)).pvalue < 1e-3
  assert stats.kstest(lam, 'beta', args=(0.5, 0.5)).pvalue < 1e-3
  np.testing.assert_allclose([lam.mean(), lam.var()], [0.5, 1 / (4 * (2 * 0.8 + 1))], atol=0.01)


def test_switch_prob_and_prob_choose_the_branch():
  images, labels = _batch()
  switch_prob = np.repeat(np.float32([0.5, 0.2]), [400, 200])  # Traced: one compilation.
  fn = jax.jit(jax.vmap(lambda key, p: mixup_cutmix(
      key, images, labels, num_classes=10, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=p,
      prob=1.0, label_smoothing=0.0)[0]))
  out = np.asarray(fn(jax.random.split(jax.random.key(0), len(switch_prob)), switch_prob))
  kinds, _ = _classify(out, np.asarray(images))
  # Unchanged: a CutMix with an empty box (about 1.6% of CutMix draws) or a mixup with lam == 1.
  assert (kinds == 'unchanged').sum() <= 12
  half, fifth = kinds[:400], kinds[400:]
  assert 160 <= (half == 'cutmix').sum() <= 240 and 160 <= (half == 'mixup').sum() <= 240
  assert 20 <= (fifth == 'cutmix').sum() <= 60 and (fifth == 'mixup').sum() >= 140
  images, labels = _batch()
  out, targets = mixup_cutmix(jax.random.key(0), images, labels, num_classes=10, mixup_alpha=0.8,
                              cutmix_alpha=1.0, switch_prob=0.5, prob=0.0, label_smoothing=0.1)
  np.testing.assert_array_equal(out, images)
  np.testing.assert_allclose(targets, _timm_targets(labels, 10, 1.0, 0.1), atol=1e-6)


def test_eval_geometry_and_statistics_are_defined_once_in_the_data_layer():
  """`predict` uses the data layer's definitions; the data layer does not import the CLI."""
  import subprocess
  import sys
  from mambaout_jax import predict
  assert predict.resize_and_center_crop is T.resize_and_center_crop
  assert predict.IMAGENET_MEAN is T.IMAGENET_MEAN and predict.IMAGENET_STD is T.IMAGENET_STD
  assert RA.random_interpolation is T.random_interpolation
  assert not hasattr(RA, 'RANDOM_INTERPOLATION')
  code = ('import sys, mambaout_jax.data, mambaout_jax.data.prepare; '
          'assert "mambaout_jax.predict" not in sys.modules, "data imports predict"')
  subprocess.run([sys.executable, '-c', code], check=True)
