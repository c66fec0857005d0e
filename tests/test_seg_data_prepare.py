"""The `ade20k` TFDS builder: a fake ADEChallengeData2016.zip (tiny JPEG/PNG pairs, one corrupt
image, one label of the wrong size, one image without a label) goes through the documented
`prepare` command and then through the segmentation pipelines."""
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from mambaout_jax.data import prepare
from mambaout_jax.data import seg_pipeline
from mambaout_jax.data import seg_sources
from mambaout_jax.data import seg_transforms as T
from test_seg_data import encode, seg_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SIZES = [(20, 30), (24, 24), (30, 18), (16, 40)]
VAL_SIZES = [(20, 30), (33, 17), (12, 50)]  # (h, w)


def _label(i, h, w):
  """0 ('other') in the first column, i + 1 elsewhere: reduce_zero_label gives 255 and i."""
  label = np.full((h, w), i + 1, np.uint8)
  label[:, 0] = 0
  return label


def make_fake_ade_zip(manual_dir):
  os.makedirs(manual_dir, exist_ok=True)
  root = 'ADEChallengeData2016'
  with zipfile.ZipFile(os.path.join(manual_dir, 'ADEChallengeData2016.zip'), 'w') as z:
    z.writestr(f'{root}/objectInfo150.txt', 'Idx\tRatio\tTrain\tVal\tName\n')
    for folder, prefix, sizes in (('training', 'ADE_train', TRAIN_SIZES),
                                  ('validation', 'ADE_val', VAL_SIZES)):
      for i, (h, w) in enumerate(sizes):
        image = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        z.writestr(f'{root}/images/{folder}/{prefix}_{i + 1:08d}.jpg', encode(image, 'JPEG'))
        z.writestr(f'{root}/annotations/{folder}/{prefix}_{i + 1:08d}.png',
                   encode(_label(i, h, w)))
      z.writestr(f'{root}/images/{folder}/{prefix}_00000098.jpg', b'\xff\xd8 corrupt JPEG')
      z.writestr(f'{root}/annotations/{folder}/{prefix}_00000098.png', encode(_label(0, 9, 9)))
      z.writestr(f'{root}/images/{folder}/{prefix}_00000099.jpg', encode(image, 'JPEG'))
      z.writestr(f'{root}/annotations/{folder}/{prefix}_00000099.png', encode(_label(0, 5, 7)))
    z.writestr(f'{root}/images/validation/ADE_val_00000100.jpg', encode(image, 'JPEG'))


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('ade20k')
  manual_dir, data_dir = str(tmp / 'manual'), str(tmp / 'tfds')
  make_fake_ade_zip(manual_dir)
  config = seg_config('ade20k', data_dir)
  with pytest.raises(seg_sources.DatasetNotFoundError,
                     match='--dataset=ade20k --manual_dir=DIR_WITH_ADEChallengeData2016.zip'):
    seg_sources.get_seg_dataset_info(config)
  run = subprocess.run(  # The documented command, as a user runs it.
      [sys.executable, '-m', 'mambaout_jax.data.prepare', '--dataset=ade20k',
       f'--manual_dir={manual_dir}', f'--data_dir={data_dir}'],
      cwd=REPO, env={**os.environ, 'PYTHONPATH': REPO}, capture_output=True, text=True)
  assert run.returncode == 0, run.stderr[-3000:]
  return config, run.stderr


def test_prepare_skips_and_names_damaged_pairs(prepared):
  config, log = prepared
  info = seg_sources.get_seg_dataset_info(config)
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (150, 4, 3)
  assert 'ADE_val_00000098.jpg: cannot decode the image' in log
  assert 'ADE_val_00000099.jpg: the label map is 7x5' in log
  assert 'ADE_val_00000100.jpg: no label map' in log
  assert 'ade20k validation: skipped 3 of 6 images' in log


def test_prepared_ade20k_through_the_pipelines(prepared):
  config, _ = prepared
  batch = next(seg_pipeline.create_train_iterator(config, process_index=0, process_count=1))
  assert batch['image'].shape == (4, 32, 32, 3) and batch['label'].shape == (4, 32, 32)
  assert set(np.unique(batch['label'])) <= {0, 1, 2, 3, 255}
  # Eval canvases fitted to the sizes recorded while preparing: the largest label is 33x50.
  source = seg_sources.open_seg_source('ade20k', 'validation', config.dataset.data_dir)
  assert sorted(source.sizes()) == sorted(VAL_SIZES)
  seen = []
  for batch in seg_pipeline.create_eval_iterator(config, process_index=0, process_count=1):
    assert batch['label'].shape == (4, 64, 64)
    for k in np.flatnonzero(batch['mask']):
      h, w = batch['label_hw'][k]
      i = int(batch['label'][k, 0, 1])
      seen.append(i)
      expected = T.reduce_zero(_label(i, *VAL_SIZES[i]))  # Column 0 ('other') becomes 255.
      np.testing.assert_array_equal(batch['label'][k, :h, :w], expected)
  assert sorted(seen) == [0, 1, 2]


def test_missing_zip_names_the_file(tmp_path):
  os.makedirs(tmp_path / 'manual')
  (tmp_path / 'manual' / 'README').write_text('not the zip')
  with pytest.raises(FileNotFoundError, match='ADEChallengeData2016.zip not found in'):
    prepare.prepare('ade20k', str(tmp_path / 'tfds'), str(tmp_path / 'manual'))
