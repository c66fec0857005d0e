"""predict: official eval preprocessing (vs timm/torchvision) and the CLI's handling of bad files."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import mambaout_jax as mo
from mambaout_jax import params as params_lib, predict


@pytest.mark.parametrize('size,crop_pct', [((500, 375), 1.0), ((333, 517), 1.0), ((256, 256), 0.875)])
def test_preprocess_matches_timm_eval_transform(size, crop_pct):
  from timm.data import create_transform
  rng = np.random.RandomState(0)
  img = Image.fromarray(rng.randint(0, 256, size[::-1] + (3,), dtype=np.uint8))
  t = create_transform(224, is_training=False, interpolation='bicubic', crop_pct=crop_pct)
  want = t(img).numpy().transpose(1, 2, 0)
  got = predict.preprocess(img, 224, crop_pct)
  assert got.shape == (224, 224, 3)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_imagenet_classes_in_label_order():
  classes = predict.imagenet_classes()
  assert len(classes) == 1000
  assert [s for s, _ in classes] == sorted(s for s, _ in classes)  # TFDS / timm label order
  assert classes[207][1].startswith('golden retriever')


def test_topk_is_sorted_softmax():
  logits = np.array([[0.0, 3.0, 1.0, 2.0]])
  (preds,) = predict.topk(logits, 3)
  assert [i for i, _ in preds] == [1, 3, 2]
  p = np.exp(logits[0]) / np.exp(logits[0]).sum()
  np.testing.assert_allclose([q for _, q in preds], p[[1, 3, 2]])


def test_cli_classifies_good_images_and_reports_bad_ones(tmp_path):
  model = mo.create_model('mambaout_test')
  ckpt = params_lib.save_params(str(tmp_path / 'ckpt'), model, variant='mambaout_test')
  rng = np.random.RandomState(0)
  good = tmp_path / 'a.jpg'
  Image.fromarray(rng.randint(0, 256, (300, 400, 3), dtype=np.uint8)).save(good)
  gray = tmp_path / 'gray.png'
  Image.fromarray(rng.randint(0, 256, (64, 80), dtype=np.uint8), mode='L').save(gray)
  cmyk = tmp_path / 'cmyk.jpg'
  Image.fromarray(rng.randint(0, 256, (90, 70, 4), dtype=np.uint8), mode='CMYK').save(cmyk)
  bad = tmp_path / 'notes.jpg'
  bad.write_text('not an image')
  missing = tmp_path / 'missing.jpg'
  r = subprocess.run([sys.executable, '-m', 'mambaout_jax.predict', '--variant=mambaout_test',
                      f'--checkpoint={ckpt}', str(good), str(bad), str(gray), str(missing),
                      str(cmyk)], capture_output=True, text=True)
  assert r.returncode == 1
  errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 2
  assert 'notes.jpg: not a readable image' in errors[0]
  assert 'missing.jpg: no such file' in errors[1]
  lines = r.stdout.splitlines()
  for path in (good, gray, cmyk):
    i = lines.index(str(path))
    probs = [float(l.split()[0]) for l in lines[i + 1:i + 6]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    assert all('(n' in l for l in lines[i + 1:i + 6])  # ImageNet synset ids
