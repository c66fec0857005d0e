"""Structural metadata of train checkpoints and exports, on the two models whose structure the
config changes beyond the variant: a Mamba-block model with a non-default scan order and a ViT at
a non-default image size. Each trains 2 steps; changing the structural key and rerunning in the
same workdir is refused before anything is written; the export loads with `load_pretrained(name,
DIR/export)` alone and gives the trainer's eval logits."""
import os

import numpy as np
import pytest
from flax import nnx

import mambaout_jax as mo
from mambaout_jax import checkpoint as ckpt_lib
from mambaout_jax import data as data_lib
from mambaout_jax import train
from test_train import small_config, snapshot

CASES = {
    # name: (config overrides, (structural key, config key, changed value))
    'mamba_raster': ({'model.name': 'mamba_test', 'model.scan_order': 'raster'},
                     ('scan_order', 'model.scan_order', 'bidirectional')),
    'vit_16px': ({'model.name': 'vit_test', 'image_size': 16, 'model.dwconv_impl': 'auto'},
                 ('img_size', 'image_size', 24)),
}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='module', params=sorted(CASES))
def run(request, data_dir, tmp_path_factory):
  overrides, change = CASES[request.param]
  workdir = str(tmp_path_factory.mktemp(request.param))
  config = small_config(data_dir, total_steps=2, **overrides)
  results = train.train_and_evaluate(config, workdir)
  return config, workdir, results, (overrides, change)


def test_changing_a_structural_key_is_refused_before_anything_is_written(run):
  config, workdir, _, (overrides, (key, config_key, value)) = run
  before = snapshot(workdir)
  assert any('checkpoints' in p for p in before)
  changed = small_config(config.dataset.data_dir, total_steps=2, **{**overrides, config_key: value})
  trained_value = train.model_kwargs(config, 10)[key]
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=rf'{key}={trained_value!r}.*{key}={value!r}.*another --workdir.*'
                           rf'--config.{config_key} back'):
    train.train_and_evaluate(changed, workdir)
  assert snapshot(workdir) == before  # no metrics line, no checkpoint, no config.json rewrite


def test_export_loads_from_its_metadata_and_gives_the_trainers_eval_logits(run):
  config, workdir, results, _ = run
  model = mo.load_pretrained(config.model.name, os.path.join(workdir, 'export'))
  assert {m.scan_order for _, m in nnx.iter_modules(model) if hasattr(m, 'scan_order')} <= {
      config.model.scan_order}

  # The trainer's eval on the whole validation split, recomputed from the loaded model's logits.
  logits, labels = [], []
  forward = nnx.jit(lambda m, x: m(x))
  for batch in data_lib.create_eval_iterator(config, process_index=0, process_count=1):
    keep = np.asarray(batch['mask'])
    logits.append(np.asarray(forward(model, batch['image']), np.float64)[keep])
    labels.append(np.asarray(batch['label'])[keep])
  logits, labels = np.concatenate(logits), np.concatenate(labels)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  assert len(labels) == results['eval/num_examples'] == 360
  assert np.mean(logits.argmax(-1) == labels) == pytest.approx(results['eval/top1'], abs=1e-9)
  assert -np.mean(log_probs[np.arange(len(labels)), labels]) == pytest.approx(
      results['eval/loss'], rel=1e-5)
