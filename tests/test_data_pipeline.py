"""Grain pipelines end to end: demo dataset, resume, host shards, exact-once eval, bad images."""
import io
import json
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest

from mambaout_jax import data
from mambaout_jax.data import sources
from mambaout_jax.data import transforms as T

MEAN = np.asarray(T.IMAGENET_MEAN, np.float32)
STD = np.asarray(T.IMAGENET_STD, np.float32)


def make_config(name, data_dir='', *, image_size=16, batch_size=8, eval_batch_size=8, seed=0,
                randaugment='rand-m9-mstd0.5-inc1', reprob=0.25, hflip=0.5, num_workers=0):
  return ml_collections.ConfigDict(dict(
      seed=seed, image_size=image_size, batch_size=batch_size, eval_batch_size=eval_batch_size,
      dataset=dict(name=name, data_dir=data_dir, train_split='train', eval_split='validation',
                   num_classes=0),
      aug=dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation='random', hflip=hflip,
               randaugment=randaugment, reprob=reprob, remode='pixel', mixup=0.8, cutmix=1.0,
               mixup_prob=1.0, mixup_switch_prob=0.5, label_smoothing=0.1, crop_pct=1.0),
      input=dict(num_workers=num_workers, prefetch=2)))


def write_image(path, img, fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  img.save(path, format=fmt)


def one_image_per_class_folder(root, num_train, num_eval):
  """ImageFolder where example i of a split is the only image of class i: labels name examples."""
  rng = np.random.default_rng(0)
  for split, n in (('train', num_train), ('validation', num_eval)):
    for i in range(n):
      pixels = rng.integers(0, 256, (20 + i % 7, 24, 3), dtype=np.uint8)
      write_image(f'{root}/{split}/c{i:03d}/img.jpg', Image.fromarray(pixels))
  return f'folder:{root}'


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return one_image_per_class_folder(str(tmp_path_factory.mktemp('folder')), 36, 13)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_digits_demo_dataset_batches(digits_dir):
  config = make_config('mambaout_digits', digits_dir, image_size=16, batch_size=32, reprob=0.0)
  info = data.get_dataset_info(config)  # Prepares the demo dataset on first use.
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (10, 1437, 360)
  batch = next(data.create_train_iterator(config, process_index=0, process_count=1))
  assert batch['image'].shape == (32, 16, 16, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32
  assert set(batch['label']) <= set(range(10)) and len(set(batch['label'])) > 3
  # Normalised with ImageNet statistics: every value within [(0 - mean) / std, (1 - mean) / std].
  assert (batch['image'] >= -MEAN / STD - 1e-5).all()
  assert (batch['image'] <= (1 - MEAN) / STD + 1e-5).all()
  np.testing.assert_allclose(batch['image'].min((0, 1, 2)), -MEAN / STD, atol=1e-5)  # Black ground.


def test_digits_labels_match_images(digits_dir):
  """A linear classifier on eval-transformed pixels must reach high accuracy: labels are aligned."""
  from sklearn.linear_model import LogisticRegression
  config = make_config('mambaout_digits', digits_dir, image_size=8, eval_batch_size=500)

  def features(split):
    config.dataset.eval_split = split
    batches = list(data.create_eval_iterator(config, process_index=0, process_count=1))
    mask = np.concatenate([b['mask'] for b in batches])
    x = np.concatenate([b['image'] for b in batches])[mask].reshape(mask.sum(), -1)
    return x, np.concatenate([b['label'] for b in batches])[mask]

  (x_train, y_train), (x_val, y_val) = features('train'), features('validation')
  assert len(y_train) == 1437 and len(y_val) == 360
  accuracy = LogisticRegression(max_iter=300).fit(x_train, y_train).score(x_val, y_val)
  assert accuracy > 0.9, accuracy


def assert_same_batches(want, got):
  assert len(want) == len(got)
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a['label'], b['label'])
    np.testing.assert_array_equal(a['image'], b['image'])


def test_start_step_gives_exactly_the_later_batches_of_an_uninterrupted_stream(folder):
  config = make_config(folder, batch_size=8)
  uninterrupted = take(data.create_train_iterator(config), 7)  # 36 examples: crosses 1 epoch.
  for k in (1, 4, 5):
    resumed = data.create_train_iterator(config, start_step=k)
    assert_same_batches(uninterrupted[k:], take(resumed, 7 - k))
  # Another seed gives other batches.
  other = next(data.create_train_iterator(make_config(folder, batch_size=8, seed=1)))
  assert not np.array_equal(uninterrupted[0]['label'], other['label'])


@pytest.mark.parametrize('start_step', [0, 3])
def test_host_batches_concatenate_to_the_one_process_global_batch(folder, start_step):
  """The batch of a step does not depend on the process count: a 2->1 or 1->2 resume is exact."""
  config = make_config(folder, batch_size=12)
  one = take(data.create_train_iterator(config, start_step=start_step), 4)
  for process_count in (2, 3):
    hosts = [take(data.create_train_iterator(config, process_index=p, process_count=process_count,
                                             start_step=start_step), 4)
             for p in range(process_count)]
    concatenated = [{key: np.concatenate([host[t][key] for host in hosts])
                     for key in ('image', 'label')} for t in range(4)]
    assert_same_batches(one, concatenated)


def test_train_host_shards_are_disjoint_and_cover_each_epoch(folder):
  config = make_config(folder, batch_size=12, randaugment='', reprob=0.0)
  per_host = [take(data.create_train_iterator(config, process_index=p, process_count=2), 6)
              for p in range(2)]
  for epoch in range(2):  # 36 examples = 3 global batches of 12 = 3 host batches of 6 per host.
    labels = [np.concatenate([b['label'] for b in host[3 * epoch:3 * (epoch + 1)]])
              for host in per_host]
    assert all(len(host_labels) == 18 for host_labels in labels)
    assert not set(labels[0]) & set(labels[1])
    assert sorted(np.concatenate(labels)) == list(range(36))
  epoch0 = np.concatenate([b['label'] for b in per_host[0][:3]])
  epoch1 = np.concatenate([b['label'] for b in per_host[0][3:]])
  assert not np.array_equal(epoch0, epoch1)  # Reshuffled every epoch.


def test_augmentation_depends_on_seed_epoch_index_not_on_sharding(folder):
  config = make_config(folder, batch_size=12)

  def images_by_label(process_count):
    out = {}
    for p in range(process_count):
      iterator = data.create_train_iterator(config, process_index=p, process_count=process_count)
      for batch in take(iterator, 2 // process_count):
        out.update(zip(batch['label'].tolist(), batch['image']))
    return out

  one_host, two_hosts = images_by_label(1), images_by_label(2)
  common = set(one_host) & set(two_hosts)
  assert len(common) >= 6
  for label in common:
    np.testing.assert_array_equal(one_host[label], two_hosts[label])


@pytest.mark.parametrize('process_count,eval_batch_size', [(1, 4), (2, 4), (3, 6), (2, 16)])
def test_eval_visits_every_example_exactly_once(folder, process_count, eval_batch_size):
  config = make_config(folder, eval_batch_size=eval_batch_size)
  local_batch = eval_batch_size // process_count
  seen, num_batches = [], set()
  for p in range(process_count):
    batches = list(data.create_eval_iterator(config, process_index=p, process_count=process_count))
    num_batches.add(len(batches))
    for batch in batches:
      assert batch['image'].shape == (local_batch, 16, 16, 3)
      assert batch['mask'].dtype == bool
      seen.extend(batch['label'][batch['mask']].tolist())
      assert (batch['image'][~batch['mask']] == 0).all()
  assert len(num_batches) == 1  # Every host runs the same number of steps.
  assert sorted(seen) == list(range(13))  # 13 examples: each exactly once, eval/num_examples == 13.


def test_eval_images_match_eval_transform(folder):
  config = make_config(folder, eval_batch_size=13)
  batch = next(iter(data.create_eval_iterator(config, process_index=0, process_count=1)))
  source = sources.open_source(folder, 'validation')
  for row in range(13):
    index = batch['label'][row]
    np.testing.assert_array_equal(batch['image'][row],
                                  T.EvalTransform(size=16)(source[index]['image']))


def test_worker_processes_give_the_same_stream(folder):
  config = make_config(folder, batch_size=8)
  in_process = take(data.create_train_iterator(config), 3)
  config.input.num_workers = 2
  iterator = data.create_train_iterator(config)
  resumed = data.create_train_iterator(config, start_step=2)
  try:
    assert_same_batches(in_process, take(iterator, 3))
    assert_same_batches(in_process[2:], take(resumed, 1))
  finally:
    iterator.close()
    resumed.close()


def test_undecodable_training_image_is_replaced_in_place_not_skipped(tmp_path):
  """Example 5 corrupt: its rows hold example 6 (the next index) augmented with example 5's own
  generator; every other row of every batch is what a clean dataset gives, so nothing shifts."""
  clean = one_image_per_class_folder(str(tmp_path / 'clean'), 12, 2)
  broken = one_image_per_class_folder(str(tmp_path / 'broken'), 12, 2)
  (tmp_path / 'broken/train/c005/img.jpg').write_bytes(b'not an image')
  config = make_config(clean, batch_size=4)
  want = take(data.create_train_iterator(config), 9)  # 3 epochs
  config.dataset.name = broken
  for num_workers in (0, 2):
    config.input.num_workers = num_workers
    iterator = data.create_train_iterator(config)
    try:
      got = take(iterator, 9)
    finally:
      iterator.close()
    transform = T.TrainTransform.from_config(config)
    source = sources.open_source(broken, 'train')
    replaced = 0
    for t, (w, g) in enumerate(zip(want, got)):
      for row in range(4):
        if w['label'][row] != 5:
          assert g['label'][row] == w['label'][row]
          np.testing.assert_array_equal(g['image'][row], w['image'][row])
          continue
        replaced += 1
        epoch = (4 * t + row) // 12
        assert g['label'][row] == 6
        np.testing.assert_array_equal(g['image'][row], transform(
            source[6]['image'], np.random.default_rng((config.seed, epoch, 5))))
    assert replaced == 3  # Once per epoch.


def test_training_split_of_non_images_gets_a_clear_error(tmp_path):
  for i in range(4):
    path = tmp_path / 'train' / f'c{i}' / 'a.jpg'
    path.parent.mkdir(parents=True)
    path.write_bytes(b'')
  with pytest.raises(ValueError, match='consecutive training examples .* cannot be decoded'):
    next(data.create_train_iterator(make_config(f'folder:{tmp_path}', batch_size=2)))


def _jpeg_bytes(img, **kwargs):
  buffer = io.BytesIO()
  img.save(buffer, format='JPEG', **kwargs)
  return buffer.getvalue()


def test_grey_cmyk_alpha_and_corrupt_images_never_crash(tmp_path):
  rng = np.random.default_rng(0)
  rgb = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
  good_jpeg = _jpeg_bytes(rgb)
  files = {
      'c0_rgb/a.jpg': good_jpeg,
      'c1_grey/a.jpg': _jpeg_bytes(rgb.convert('L')),
      'c2_cmyk/a.jpg': _jpeg_bytes(rgb.convert('CMYK')),
      'c3_rgba/a.png': None,
      'c4_palette/a.png': None,
      'c5_corrupt/a.jpg': b'this is not an image',
      'c6_truncated/a.jpg': good_jpeg[:len(good_jpeg) // 3],
  }
  for split in ('train', 'validation'):
    for name, payload in files.items():
      path = tmp_path / split / name
      path.parent.mkdir(parents=True, exist_ok=True)
      if name.startswith('c3'):
        rgb.convert('RGBA').save(path)
      elif name.startswith('c4'):
        rgb.convert('P').save(path)
      else:
        path.write_bytes(payload)
  config = make_config(f'folder:{tmp_path}', batch_size=7, eval_batch_size=6)
  train = data.create_train_iterator(config, process_index=0, process_count=1)
  labels = np.concatenate([b['label'] for b in take(train, 4)])  # 4 epochs of the 7 files.
  # c5, c6 do not decode: both are replaced by the next decodable index (cyclically), c0.
  assert sorted(labels) == sorted([0] * 12 + [1, 2, 3, 4] * 4)
  for process_count in (1, 2, 3):
    rows = [{k: np.concatenate([b[k] for b in batches]) for k in ('label', 'mask', 'undecodable')}
            for batches in (list(data.create_eval_iterator(config, process_index=p,
                                                           process_count=process_count))
                            for p in range(process_count))]
    mask, undecodable, label = (np.concatenate([r[k] for r in rows])
                                for k in ('mask', 'undecodable', 'label'))
    assert sorted(label[mask]) == [0, 1, 2, 3, 4]
    assert undecodable.dtype == bool and undecodable.sum() == 2 and not (mask & undecodable).any()
    assert mask.sum() + undecodable.sum() == 7  # eval/num_examples + eval/num_undecodable.


def test_undecodable_validation_images_are_counted_and_logged_not_crashing(tmp_path, caplog):
  """The reported crash: a JPEG cut short in the validation split raised 'image file is truncated'
  at the first eval. Now such rows are flagged `undecodable` (mask False) and their file logged."""
  root = one_image_per_class_folder(str(tmp_path), 9, 9)[len('folder:'):]
  bad = {2: 'truncated', 5: 'empty', 7: 'text'}
  for index, kind in bad.items():
    path = f'{root}/validation/c{index:03d}/img.jpg'
    payload = open(path, 'rb').read()
    payload = {'truncated': payload[:int(len(payload) * 0.8)], 'empty': b'',
               'text': b'<html>not found</html>'}[kind]
    open(path, 'wb').write(payload)
  config = make_config(f'folder:{root}', eval_batch_size=4)
  with caplog.at_level('WARNING'):
    batches = list(data.create_eval_iterator(config))
  rows = {k: np.concatenate([b[k] for b in batches]) for k in ('label', 'mask', 'undecodable')}
  assert sorted(rows['label'][rows['mask']]) == [0, 1, 3, 4, 6, 8]
  assert sorted(np.flatnonzero(rows['undecodable'])) == [2, 5, 7]  # 1 host: row i is example i.
  assert rows['mask'].sum() + rows['undecodable'].sum() == 9
  assert len(rows['mask']) == 12 and not rows['undecodable'][9:].any()  # Padding is not counted.
  for index in bad:
    assert any(f'c{index:03d}/img.jpg' in r.getMessage() for r in caplog.records)


def test_missing_dataset_names_the_preparation_command(tmp_path):
  config = make_config('imagenet2012', str(tmp_path))
  with pytest.raises(data.DatasetNotFoundError, match='python -m mambaout_jax.data.prepare '
                     '--dataset=imagenet2012 --manual_dir='):
    data.create_train_iterator(config, process_index=0, process_count=1)
  with pytest.raises(ValueError, match='not divisible by the process count'):
    data.create_train_iterator(make_config('folder:/nonexistent', batch_size=7), process_index=0,
                               process_count=2)
