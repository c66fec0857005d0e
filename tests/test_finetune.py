"""config.init_from in the trainer. configs/finetune.py starts from the weights it is given: a short
demo run trains a model, a fine-tune run starts from its export, and the fine-tune's first
train/loss is the trained model's loss on that first batch (computed here without the trainer), not
a random model's. `--mode=eval` of a Hub tag evaluates those weights on a fresh workdir."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import mambaout_jax as mo
from mambaout_jax import data as data_lib, pretrained, train

from hub_cache import lay_out_hub_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = 'hf-hub:timm/mambaout_femto.in1k'


def load_config(name):
  spec = importlib.util.spec_from_file_location(f'config_{name}',
                                                os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def first_loss(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return next(r['train/loss'] for r in map(json.loads, f) if 'train/loss' in r and r['step'] == 1)


def loss_on(model, batch, *, num_classes, label_smoothing):
  """Mean soft-target cross-entropy with label smoothing, as timm's fine-tuning loss."""
  targets = optax.smooth_labels(jax.nn.one_hot(batch['label'], num_classes), label_smoothing)
  with jax.default_matmul_precision('highest'):
    logits = model(batch['image'])
  return float(optax.softmax_cross_entropy(logits, targets).mean())


@pytest.fixture(scope='module')
def demo_export(tmp_path_factory):
  """A short demo run (16 px digits, mambaout_test): its export is a trained model."""
  data_dir = tmp_path_factory.mktemp('tfds')
  workdir = str(tmp_path_factory.mktemp('demo'))
  c = load_config('demo')
  c.dataset.data_dir = str(data_dir)
  c.image_size = 16
  c.batch_size = 64
  c.total_steps = 100
  c.log_every_steps = 50
  c.eval_every_steps = 100
  c.checkpoint_every_steps = 100
  c.model.dwconv_impl = 'conv'
  results = train.train_and_evaluate(c, workdir)
  assert results['eval/top1'] > 0.6, results  # 10 classes: chance is 0.1
  return data_dir, os.path.join(workdir, 'export')


def finetune_config(data_dir, export):
  c = load_config('finetune')
  c.model.name = 'mambaout_test'
  c.model.drop_path_rate = 0.0  # the loss of one deterministic forward pass
  c.model.dwconv_impl = 'conv'
  c.init_from = export
  c.dataset.name = 'mambaout_digits'
  c.dataset.data_dir = str(data_dir)
  c.image_size = 16
  c.batch_size = 32
  c.eval_batch_size = 120
  c.aug.hflip = 0.0  # the demo's augmentation, so the trained model's loss is low on the batch
  c.aug.scale = (0.5, 1.0)
  c.input.num_workers = 0
  c.total_steps = 1
  c.log_every_steps = 1
  c.eval_every_steps = 1
  return c


def test_finetune_starts_from_the_trained_model(demo_export, tmp_path):
  data_dir, export = demo_export
  c = finetune_config(data_dir, export)
  assert c.init_head == 'reset' and c.aug.mixup == 0 and c.aug.cutmix == 0
  train.train_and_evaluate(c, str(tmp_path / 'ft'))
  got = first_loss(str(tmp_path / 'ft'))

  batch = next(data_lib.create_train_iterator(c, process_index=0, process_count=1))
  trained = loss_on(mo.load_pretrained('mambaout_test', export), batch, num_classes=10,
                    label_smoothing=c.aug.label_smoothing)
  random = loss_on(mo.create_model('mambaout_test', rngs=nnx.Rngs(c.seed), num_classes=10), batch,
                   num_classes=10, label_smoothing=c.aug.label_smoothing)
  print(f'first fine-tune loss {got:.6f}; the demo export on that batch {trained:.6f}; '
        f'a random init {random:.6f}')
  np.testing.assert_allclose(got, trained, rtol=1e-5)
  assert random - trained > 0.5  # the two are far apart: the check can tell them apart


def test_eval_overrides_apply_to_eval_of_a_hub_tag_only():
  from mambaout_jax import pretrained
  tag = 'hf-hub:timm/mambaout_base_tall_rw.sw_e500_in1k'
  c = load_config('base_tall_rw')
  c.init_from = tag
  c.aug.eval_interpolation = 'bilinear'
  pretrained.apply_eval_overrides(c, ['main', '--config.image_size=256'], mode='train')
  assert (c.image_size, c.aug.crop_pct, c.aug.eval_interpolation) == (224, 1.0, 'bilinear')
  pretrained.apply_eval_overrides(c, ['main', '--config.image_size=256'], mode='eval')
  # The command line's own image_size is kept; the rest comes from timm's pretrained config.
  assert (c.image_size, c.aug.crop_pct, c.aug.eval_interpolation) == (224, 0.95, 'bicubic')


def test_main_evaluates_a_hub_tag_without_a_training_checkpoint(tmp_path, monkeypatch):
  """`--mode=eval --config.init_from=hf-hub:...` on a fresh workdir evaluates the Hub weights
  (the digits' 10 labels scored by femto's 1000-way classifier): eval/* in metrics.jsonl equal the
  top-1 and loss of those weights computed here without the trainer."""
  # Random weights in timm's layout (written without torch: importing torch into a process that
  # has run TensorFlow's data pipeline can crash it).
  from safetensors.numpy import save_file
  from mambaout_jax.convert import torch_key, torch_shape
  from mambaout_jax.params import build_uninitialised, flat_params
  rng = np.random.RandomState(4)
  save_file({torch_key(path): rng.normal(0, 0.05, torch_shape(v.shape)).astype(np.float32)
             for path, v in flat_params(build_uninitialised('mambaout_femto')).items()},
            str(tmp_path / 'model.safetensors'))
  cache = tmp_path / 'hf'
  lay_out_hub_cache(cache, TAG[len('hf-hub:'):], 'model.safetensors',
                    str(tmp_path / 'model.safetensors'))
  data_dir, workdir = tmp_path / 'tfds', tmp_path / 'eval'
  overrides = {'dataset.name': 'mambaout_digits', 'dataset.data_dir': str(data_dir),
               'image_size': 32, 'eval_batch_size': 120, 'model.dtype': 'float32',
               'input.num_workers': 0, 'init_from': TAG}
  env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1')
  r = subprocess.run([sys.executable, '-m', 'mambaout_jax.main', '--config=configs/femto.py',
                      '--mode=eval', f'--workdir={workdir}',
                      *[f'--config.{k}={v}' for k, v in overrides.items()]],
                     capture_output=True, text=True, env=env, cwd=REPO)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (f'evaluating {TAG} with its pretrained eval transform: aug.crop_pct=1.0, '
          'aug.eval_interpolation=bicubic') in r.stderr
  with open(workdir / 'metrics.jsonl') as f:
    results = [json.loads(line) for line in f][-1]
  assert results['eval/num_examples'] == 360

  monkeypatch.setenv('HF_HUB_CACHE', str(cache))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  c = load_config('femto')
  c.init_from = ''
  c.update_from_flattened_dict(overrides)
  model = pretrained.load('mambaout_femto', TAG)
  forward = nnx.jit(lambda m, x: m(x))
  hits, loss, count = 0, 0.0, 0
  for batch in data_lib.create_eval_iterator(c, process_index=0, process_count=1):
    mask = np.asarray(batch['mask'])
    logits = np.asarray(forward(model, batch['image']))[mask]
    labels = np.asarray(batch['label'])[mask]
    hits += int((logits.argmax(-1) == labels).sum())
    loss += float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum())
    count += int(mask.sum())
  assert count == 360
  assert results['eval/top1'] == pytest.approx(hits / count, abs=1e-9)
  assert results['eval/loss'] == pytest.approx(loss / count, rel=1e-4)
