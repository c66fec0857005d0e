"""Preparing TFDS datasets: ImageNet from a tiny fake manual dir (the real TFDS imagenet2012
builder and tar layout), and converting an existing TFRecord preparation to ArrayRecord."""
import io
import os
import subprocess
import sys
import tarfile

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from mambaout_jax import data
from mambaout_jax.data import prepare
from mambaout_jax.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNSETS = ('n01440764', 'n01443537', 'n01484850')  # The first three ImageNet classes.
IMAGES_PER_SYNSET = 2
NUM_VAL = 5


def _jpeg(seed, mode='RGB', size=(60, 45)):
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).convert(mode).save(buffer, format='JPEG')
  return buffer.getvalue()


def _add(tar, name, payload):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def make_fake_imagenet_manual_dir(manual_dir):
  """ILSVRC2012_img_train.tar (a tar of per-synset tars) and ILSVRC2012_img_val.tar."""
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_train.tar'), 'w') as train:
    for s, synset in enumerate(SYNSETS):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as synset_tar:
        for i in range(IMAGES_PER_SYNSET):
          mode = 'L' if i == 1 else 'RGB'  # Real ImageNet has grey JPEGs too.
          _add(synset_tar, f'{synset}_{i + 1}.JPEG', _jpeg(10 * s + i, mode))
      _add(train, f'{synset}.tar', inner.getvalue())
  with tarfile.open(os.path.join(manual_dir, 'ILSVRC2012_img_val.tar'), 'w') as val:
    for i in range(NUM_VAL):
      _add(val, f'ILSVRC2012_val_{i + 1:08d}.JPEG', _jpeg(100 + i, size=(50, 70)))


def _config(name, data_dir, **overrides):
  config = ml_collections.ConfigDict(dict(
      seed=0, image_size=32, batch_size=4, eval_batch_size=4,
      dataset=dict(name=name, data_dir=data_dir, train_split='train', eval_split='validation',
                   num_classes=0),
      aug=dict(randaugment='rand-m9-mstd0.5-inc1', crop_pct=1.0), input=dict(num_workers=0)))
  config.update(overrides)
  return config


def test_prepare_imagenet_from_a_fake_manual_dir(tmp_path):
  manual_dir, data_dir = str(tmp_path / 'manual'), str(tmp_path / 'tfds')
  make_fake_imagenet_manual_dir(manual_dir)
  config = _config('imagenet2012', data_dir)
  with pytest.raises(data.DatasetNotFoundError, match='--dataset=imagenet2012 --manual_dir='):
    data.get_dataset_info(config)

  subprocess.run(  # The documented command, as a user runs it.
      [sys.executable, '-m', 'mambaout_jax.data.prepare', '--dataset=imagenet2012',
       f'--manual_dir={manual_dir}', f'--data_dir={data_dir}'],
      check=True, cwd=REPO, env={**os.environ, 'PYTHONPATH': REPO}, capture_output=True)

  info = data.get_dataset_info(config)
  assert info == data.DatasetInfo(num_classes=1000, num_train_examples=6, num_eval_examples=NUM_VAL)
  batch = next(data.create_train_iterator(config, process_index=0, process_count=1))
  assert batch['image'].shape == (4, 32, 32, 3) and set(batch['label']) <= {0, 1, 2}
  # Validation labels: TFDS's list, in sorted file-name order.
  label_names = tfds.builder('imagenet2012', data_dir=data_dir).info.features['label'].names
  with open(tfds.core.tfds_path('datasets/imagenet2012/validation_labels.txt')) as f:
    expected = sorted(label_names.index(s) for s in f.read().split()[:NUM_VAL])
  seen = []
  for p in range(2):
    for batch in data.create_eval_iterator(config, process_index=p, process_count=2):
      seen += batch['label'][batch['mask']].tolist()
  assert sorted(seen) == expected


def test_convert_an_existing_tfrecord_preparation(tmp_path):
  data_dir = str(tmp_path)
  sources._import_project_builders()  # pylint: disable=protected-access
  tfds.builder('mambaout_digits', data_dir=data_dir, file_format='tfrecord').download_and_prepare()
  config = _config('mambaout_digits', data_dir, image_size=8)
  with pytest.raises(data.DatasetNotFoundError, match='--convert_existing'):
    data.create_eval_iterator(config, process_index=0, process_count=1)

  prepare.convert_existing('mambaout_digits', data_dir, num_workers=2)

  tfrecord = tfds.as_numpy(tfds.load('mambaout_digits', split='validation', data_dir=data_dir,
                                     decoders={'image': tfds.decode.SkipDecoding()}))
  by_image = {example['image']: int(example['label']) for example in tfrecord}
  source = sources.open_source('mambaout_digits', 'validation', data_dir)
  assert len(source) == len(by_image) == 360
  assert all(by_image[source[i]['image']] == source[i]['label'] for i in range(0, 360, 7))
  batches = list(data.create_eval_iterator(config, process_index=0, process_count=1))
  assert sum(b['mask'].sum() for b in batches) == 360
