"""Segmentation data: mmseg-semantics augmentations against hand-computed values and per-pixel
float64/integer references, and the Grain pipelines on a `segfolder:` tree (resume from a step,
disjoint host shards, exact-once eval over images of different sizes, damaged pairs)."""
import io

import ml_collections
import numpy as np
from PIL import Image
import pytest

from mambaout_jax.data import seg_pipeline
from mambaout_jax.data import seg_sources
from mambaout_jax.data import seg_transforms as T
from mambaout_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def encode(array, fmt='PNG'):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def denormalize(x):
  return x * (255 * np.asarray(IMAGENET_STD)) + 255 * np.asarray(IMAGENET_MEAN)


def seg_config(name, data_dir='', **aug):
  return ml_collections.ConfigDict(dict(
      seed=0, image_size=32, batch_size=4, eval_batch_size=4,
      dataset=dict(name=name, data_dir=data_dir, train_split='train', eval_split='validation',
                   reduce_zero_label=True, num_classes=0),
      aug=dict(dict(scale=(64, 32), ratio_range=(0.5, 2.0), cat_max_ratio=0.75, hflip=0.5,
                    photometric=True), **aug),
      input=dict(num_workers=0)))


# ----------------------------------------------------------------------------------------------
# Labels, geometry


def test_reduce_zero_label():
  label = np.array([[0, 1, 2], [150, 254, 255]], np.uint8)
  np.testing.assert_array_equal(T.reduce_zero(label), [[255, 0, 1], [149, 253, 255]])


@pytest.mark.parametrize('size, scale, expected', [
    ((683, 512), (2048, 512), (683, 512)),     # ADE's common landscape size: short side fits.
    ((512, 683), (2048, 512), (512, 683)),     # Portrait: the short side is the width.
    ((3000, 500), (2048, 512), (2048, 341)),   # Long side bound: 500 * 2048 / 3000 = 341.3.
    ((256, 256), (2048, 512), (512, 512)),     # Upscaled until the short side is 512.
    ((50, 30), (64, 32), (53, 32)),            # 50 * 32 / 30 = 53.33.
])
def test_rescale_size_is_mmcv_keep_ratio(size, scale, expected):
  assert T.rescale_size(*size, scale) == expected


def test_random_scale_is_ratio_times_scale_truncated():
  rng, replay = np.random.default_rng(3), np.random.default_rng(3)
  ratio = replay.random() * 1.5 + 0.5
  assert T.random_scale(rng, (2048, 512), (0.5, 2.0)) == (int(2048 * ratio), int(512 * ratio))


def _blocks(height=40, width=60, block=10):
  """Label PNG values 1..24 in 10x10 blocks and an image coloured by the reduced label."""
  rows, cols = np.mgrid[:height, :width]
  label = (rows // block * (width // block) + cols // block + 1).astype(np.uint8)
  palette = np.stack([np.arange(256) * 37 % 256, np.arange(256) * 91 % 256,
                      np.arange(256) * 151 % 256], -1).astype(np.uint8)
  return palette[label - 1], label, palette


def test_train_labels_move_with_the_image_under_resize_crop_and_flip():
  image, label, palette = _blocks()
  transform = T.SegTrainTransform(crop_size=(32, 32), scale=(60, 40), photometric=None,
                                  reduce_zero_label=True)
  flipped_views = 0
  for seed in range(16):
    x, y = transform(encode(image), encode(label), np.random.default_rng(seed))
    assert x.shape == (32, 32, 3) and x.dtype == np.float32
    assert y.shape == (32, 32) and y.dtype == np.int32
    # Interior pixels (a 5x5 neighbourhood of one class): the colour is that class's colour.
    padded = np.pad(y, 2, constant_values=-1)
    same = np.ones_like(y, bool)
    for dy in range(5):
      for dx in range(5):
        same &= padded[dy:dy + 32, dx:dx + 32] == y
    interior = same & (y != 255)
    assert interior.sum() > 30
    colours = denormalize(x)[interior]
    np.testing.assert_allclose(colours, palette[y[interior]], atol=2)
    # Blocks are numbered left to right: within a row of blocks, a flip reverses the order.
    row = y[interior.any(1).argmax()]
    row = row[row != 255]
    flipped_views += int(row[0] > row[-1])
  assert 0 < flipped_views < 16


def test_train_pads_image_with_zero_and_label_with_255():
  image, label, palette = _blocks()
  transform = T.SegTrainTransform(crop_size=(32, 32), scale=(16, 8), ratio_range=(1.0, 1.0),
                                  photometric=None, hflip=0.0)
  x, y = transform(encode(image), encode(label), np.random.default_rng(0))
  # 60x40 -> factor min(16 / 60, 8 / 40) = 0.2 -> 12x8 (WxH), at the top-left of 32x32.
  assert (y[:8, :12] != 255).all() and (y[8:] == 255).all() and (y[:, 12:] == 255).all()
  assert (x[8:] == 0).all() and (x[:, 12:] == 0).all()
  np.testing.assert_allclose(denormalize(x[:8, :12]), palette[y[:8, :12]], atol=40)


def test_random_crop_honours_cat_max_ratio_ignoring_255():
  # A 4x5 map and a 4x4 crop: two boxes. Box left=0 holds class 1 (10 px) and class 2 (6 px):
  # 10/16 < 0.75 passes. Box left=1 holds class 1 (10 px), class 2 (2 px) and 255 (4 px): 10/12
  # fails once 255 is ignored (10/16 would pass if 255 were counted as a class).
  label = np.array([[2, 1, 1, 1, 255],
                    [2, 1, 1, 1, 255],
                    [2, 1, 1, 2, 255],
                    [2, 1, 1, 2, 255]], np.uint8)
  lefts = {T.random_crop_box(np.random.default_rng(s), label, (4, 4), 0.75)[1] for s in range(40)}
  assert lefts == {0}
  lefts = {T.random_crop_box(np.random.default_rng(s), label, (4, 4), 1.0)[1] for s in range(40)}
  assert lefts == {0, 1}
  # No crop can pass (one class): the 11th draw is used, without looping forever.
  assert T.random_crop_box(np.random.default_rng(0), np.ones((8, 8), np.uint8), (4, 4), 0.75)


# ----------------------------------------------------------------------------------------------
# Photometric distortion: uint8 semantics against per-pixel references


def _test_image():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
  image[0, :6] = [[0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0], [0, 255, 0],
                  [3, 2, 250]]  # Black, white, grey (S = 0), primaries.
  return image


def _floor_reference(value, parameter):
  """floor(clip(value)) in float64, and where that is certain to be float32's answer too: the
  parameter is exact in float32, or the value is not within 1e-4 of an integer."""
  ref = np.floor(np.clip(value, 0, 255))
  unambiguous = (np.abs(value - np.round(value)) > 1e-4) | (np.float32(parameter) == parameter)
  return ref, unambiguous


@pytest.mark.parametrize('delta', [-31.3, -4.6, 17.25, 31.9])
def test_brightness_is_clipped_uint8_add(delta):
  image = _test_image()
  ours = T.adjust_brightness(image, delta)
  ref, ok = _floor_reference(image.astype(np.float64) + delta, delta)
  assert ours.dtype == np.uint8 and ok.mean() > 0.99
  np.testing.assert_array_equal(ours[ok], ref[ok])


@pytest.mark.parametrize('factor', [0.5, 0.83, 1.37, 1.5])
def test_contrast_is_clipped_uint8_scale(factor):
  image = _test_image()
  ours = T.adjust_contrast(image, factor)
  ref, ok = _floor_reference(image.astype(np.float64) * factor, factor)
  assert ours.dtype == np.uint8 and ok.mean() > 0.9
  np.testing.assert_array_equal(ours[ok], ref[ok])


def _rgb_to_hsv8(rgb):
  """OpenCV's 8-bit RGB -> HSV as documented (H = hue / 2 in 0..179, S and V in 0..255), with its
  fixed-point rounding (12-bit reciprocal tables), in integer arithmetic."""
  x = rgb.astype(np.int64)
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  v = x.max(-1)
  d = v - x.min(-1)
  sdiv = np.where(v > 0, np.floor(255 * 4096 / np.maximum(v, 1) + 0.5), 0).astype(np.int64)
  s = (d * sdiv + 2048) >> 12
  num = np.where(v == r, g - b, np.where(v == g, b - r + 2 * d, r - g + 4 * d))
  hdiv = np.where(d > 0, np.floor(180 * 4096 / (6.0 * np.maximum(d, 1)) + 0.5), 0)
  h = (num * hdiv.astype(np.int64) + 2048) >> 12
  return np.where(h < 0, h + 180, h), s, v


def _hsv8_to_rgb(h, s, v):
  """HSV (8-bit ranges) -> RGB in float64 (the textbook sector formula), rounded."""
  hh = h * 2 / 60.0
  sector = np.floor(hh).astype(int) % 6
  f = hh - np.floor(hh)
  s, v = s / 255.0, v / 255.0
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
  out = np.zeros(h.shape + (3,))
  for k, rgb in enumerate(table):
    out[sector == k] = np.stack(rgb, -1)[sector == k]
  return np.floor(out * 255 + 0.5)


@pytest.mark.parametrize('delta', [-18, -5, 9, 17])
def test_hue_shift_on_opencv_0_180_scale(delta):
  image = _test_image()
  h, s, v = _rgb_to_hsv8(image)
  ref = _hsv8_to_rgb((h + delta) % 180, s, v)
  ours = T.adjust_hue(image, delta)
  assert ours.dtype == np.uint8
  assert np.abs(ours - ref).max() <= 1  # HSV -> RGB: OpenCV's float32 vs float64 rounding.
  assert np.abs(ours.astype(int) - image).max() > 20


@pytest.mark.parametrize('factor', [0.5, 0.71, 1.3, 1.5])
def test_saturation_scale_is_clipped_uint8_on_hsv(factor):
  image = _test_image()
  h, s, v = _rgb_to_hsv8(image)
  ref = _hsv8_to_rgb(h, np.floor(np.clip(s * factor, 0, 255)), v)
  ours = T.adjust_saturation(image, factor)
  assert ours.dtype == np.uint8 and np.abs(ours - ref).max() <= 1


def test_photometric_distortion_applies_each_step_about_half_the_time():
  image = np.full((4, 4, 3), 100, np.uint8)
  image[0, 0] = [200, 50, 50]
  distort = T.PhotoMetricDistortion()
  changed = [not np.array_equal(distort(image, np.random.default_rng(s)), image)
             for s in range(200)]
  # Untouched only when all four steps are skipped: probability 1/16.
  assert 0.85 < np.mean(changed) < 0.99


# ----------------------------------------------------------------------------------------------
# Eval transform


def test_eval_keeps_the_original_label_on_a_fixed_canvas():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
  label = rng.integers(0, 151, (30, 50), dtype=np.uint8)
  transform = T.SegEvalTransform(scale=(64, 32), canvas=(64, 64), label_canvas=(40, 64))
  out = transform(encode(image), encode(label), 'x.png')
  np.testing.assert_array_equal(out['image_hw'], [32, 53])   # rescale_size: 53x32 (WxH).
  np.testing.assert_array_equal(out['label_hw'], [30, 50])
  assert out['image'].shape == (64, 64, 3) and out['label'].shape == (40, 64)
  assert (out['image'][32:] == 0).all() and (out['image'][:, 53:] == 0).all()
  np.testing.assert_array_equal(out['label'][:30, :50], T.reduce_zero(label))
  assert (out['label'][30:] == 255).all() and (out['label'][:, 50:] == 255).all()
  with pytest.raises(ValueError, match=r'x.png: .*set --config.input.eval_canvas to at least'):
    T.SegEvalTransform(scale=(64, 32), canvas=(32, 32))(encode(image), encode(label), 'x.png')


def test_damaged_pairs_raise_an_error_naming_the_file():
  image = np.zeros((8, 10, 3), np.uint8)
  good = encode(np.zeros((8, 10), np.uint8))
  with pytest.raises(T.SegExampleError, match='a.jpg: cannot decode the image'):
    T.decode_pair(b'not an image', good, 'a.jpg')
  with pytest.raises(T.SegExampleError, match=r'b.jpg: the label map is 9x8 .* image is 10x8'):
    T.decode_pair(encode(image), encode(np.zeros((8, 9), np.uint8)), 'b.jpg')
  with pytest.raises(T.SegExampleError, match='c.jpg: the label map has PIL mode RGB'):
    T.decode_pair(encode(image), encode(image), 'c.jpg')


# ----------------------------------------------------------------------------------------------
# Pipelines on a segfolder tree


TRAIN_SIZES = [(20, 30), (24, 24), (30, 18), (16, 40), (22, 28), (26, 20), (18, 36), (28, 30)]
VAL_SIZES = [(20, 30), (33, 17), (12, 50), (40, 40), (25, 31)]  # (h, w)


def make_seg_folder(root, corrupt_val=False, corrupt_train=False):
  """ADE layout; example i's label is the constant i + 1 (i after reduce_zero_label)."""
  for folder, sizes in (('training', TRAIN_SIZES), ('validation', VAL_SIZES)):
    (root / 'images' / folder).mkdir(parents=True)
    (root / 'annotations' / folder).mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
      image = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
      label = np.full((h, w), i + 1, np.uint8)
      (root / 'images' / folder / f'ADE_{i:04d}.jpg').write_bytes(encode(image, 'JPEG'))
      (root / 'annotations' / folder / f'ADE_{i:04d}.png').write_bytes(encode(label))
    (root / 'images' / folder / 'ADE_9999.jpg').write_bytes(encode(image, 'JPEG'))  # No label.
  if corrupt_val:
    (root / 'images/validation/ADE_0001.jpg').write_bytes(b'corrupt')
    (root / 'annotations/validation/ADE_0003.png').write_bytes(encode(np.ones((5, 5), np.uint8)))
  if corrupt_train:
    (root / 'images/training/ADE_0002.jpg').write_bytes(b'corrupt')
  return f'segfolder:{root}'


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return make_seg_folder(tmp_path_factory.mktemp('ade'))


def test_segfolder_info_and_class_names(folder):
  config = seg_config(folder)
  info = seg_sources.get_seg_dataset_info(config)
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (150, 8, 5)
  names = seg_sources.class_names(config)
  assert len(names) == 150 and names[0] == 'wall' and names[149] == 'flag'


def _ids(label_batch):
  return [int(np.max(np.where(y == 255, -1, y))) for y in label_batch]


def test_train_stream_is_a_function_of_the_step(folder):
  config = seg_config(folder)
  it = seg_pipeline.create_train_iterator(config, process_index=0, process_count=1)
  batches = [next(it) for _ in range(4)]
  assert batches[0]['image'].shape == (4, 32, 32, 3) and batches[0]['label'].dtype == np.int32
  assert sorted(_ids(batches[0]['label']) + _ids(batches[1]['label'])) == list(range(8))
  resumed = seg_pipeline.create_train_iterator(config, process_index=0, process_count=1,
                                               start_step=2)
  for expected in batches[2:]:
    got = next(resumed)
    np.testing.assert_array_equal(got['image'], expected['image'])
    np.testing.assert_array_equal(got['label'], expected['label'])


def test_train_host_batches_concatenate_to_the_one_process_batch(folder):
  config = seg_config(folder)
  single = seg_pipeline.create_train_iterator(config, process_index=0, process_count=1)
  hosts = [seg_pipeline.create_train_iterator(config, process_index=p, process_count=2)
           for p in range(2)]
  for _ in range(3):
    expected, parts = next(single), [next(it) for it in hosts]
    assert parts[0]['image'].shape == (2, 32, 32, 3)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([b[key] for b in parts]), expected[key])


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_counts_every_image_once_on_any_number_of_hosts(tmp_path, process_count):
  config = seg_config(make_seg_folder(tmp_path, corrupt_val=True), eval_scale=(96, 24))
  # Canvases fitted to the split: rescaled to (96, 24) (keep ratio) the tallest image is 47 px
  # (33x17 -> 47x24), the widest 96 px (12x50 -> 23x96); the largest label map 40x50 (the 5x5
  # one is damaged); each side rounded up to 32. Without the sizes: (96, 96) holds any ratio.
  source = seg_sources.open_seg_source(config.dataset.name, 'validation')
  transform = T.SegEvalTransform.from_config(config, source.sizes())
  assert transform.canvas == (64, 96) and transform.label_canvas == (64, 64)
  assert T.SegEvalTransform.from_config(config).canvas == (96, 96)
  ids, batch_counts, undecodable = [], [], 0
  for p in range(process_count):
    passes = seg_pipeline.create_eval_iterator(config, process_index=p,
                                               process_count=process_count)
    batches = list(passes)
    batch_counts.append(len(batches))
    assert len(passes) == len(batches)
    for batch in batches:
      assert batch['image'].shape == (4 // process_count, 64, 96, 3)
      assert batch['label'].shape == (4 // process_count, 64, 64)
      for k in np.flatnonzero(batch['mask']):
        i = _ids(batch['label'][k:k + 1])[0]
        h, w = VAL_SIZES[i]
        ids.append(i)
        np.testing.assert_array_equal(batch['label_hw'][k], [h, w])
        np.testing.assert_array_equal(batch['image_hw'][k], T.rescale_size(w, h, (96, 24))[::-1])
        assert (batch['label'][k, :h, :w] == i).all() and (batch['label'][k, h:] == 255).all()
      for k in np.flatnonzero(~batch['mask']):
        assert (batch['label'][k] == 255).all()
      undecodable += int(batch['undecodable'].sum())
  # Images 1 (corrupt) and 3 (label size differs) are masked out; the rest counted once.
  assert sorted(ids) == [0, 2, 4] and undecodable == 2
  assert len(set(batch_counts)) == 1


def test_damaged_training_pairs_are_replaced_not_fatal(tmp_path):
  config = seg_config(make_seg_folder(tmp_path, corrupt_train=True))
  it = seg_pipeline.create_train_iterator(config, process_index=0, process_count=1)
  ids = sum((_ids(next(it)['label']) for _ in range(4)), [])
  assert 2 not in ids and len(ids) == 16


def test_missing_folder_says_what_layout_is_expected(tmp_path):
  with pytest.raises(seg_sources.DatasetNotFoundError, match='images/training/'):
    seg_sources.get_seg_dataset_info(seg_config(f'segfolder:{tmp_path}'))


def test_digit_scenes_demo_goes_through_the_pipelines():
  pytest.importorskip('mambaout_jax.data.digit_scenes')  # The segmentation demo set's module.
  config = seg_config('digit_scenes', eval_scale=(64, 64), scale=(64, 64))
  config.dataset.update(num_classes=11, reduce_zero_label=False)
  info = seg_pipeline.get_dataset_info(config)
  assert info.num_classes == 11 and info.num_eval_examples > 0
  batch = next(seg_pipeline.create_train_iterator(config, process_index=0, process_count=1))
  assert batch['image'].shape == (4, 32, 32, 3) and set(np.unique(batch['label'])) <= set(
      range(11)) | {255}
  # Validation scenes of different sizes: canvases fitted from the label headers.
  batch = next(iter(seg_pipeline.create_eval_iterator(config, process_index=0, process_count=1)))
  assert batch['mask'].all() and batch['image'].shape[1:3] == (64, 64)
  assert (batch['label_hw'] <= batch['label'].shape[1:]).all()
  assert batch['label'].shape[1] % 32 == 0 and batch['label'].shape[1] >= 64
