"""The trainer in-process on the demo dataset (16 px digits, `mambaout_test`): it learns, exports,
evaluates, refuses another variant's checkpoint, falls back from a corrupt checkpoint, and gives the
same loss trajectory on 1 device, 8 devices and a data x fsdp mesh."""
import glob
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from mambaout_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name='demo'):
  spec = importlib.util.spec_from_file_location(f'config_{name}',
                                                os.path.join(ROOT, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def small_config(data_dir, **overrides):
  """The demo config shrunk for tests: 16 px, batch 32, log every step."""
  c = load_config('demo')
  c.dataset.data_dir = str(data_dir)
  c.image_size = 16
  c.batch_size = 32
  c.eval_batch_size = 120
  c.log_every_steps = 1
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 10_000
  c.model.dwconv_impl = 'conv'  # compiles ~1/3 faster than the CPU default ('shift') at this size
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def losses(records):
  return {r['step']: r['train/loss'] for r in records if 'train/loss' in r}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')  # mambaout_digits prepares itself here on first use


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """120 steps with EMA, checkpoints at 60 and 120."""
  workdir = str(tmp_path_factory.mktemp('demo'))
  config = small_config(data_dir, total_steps=120, checkpoint_every_steps=60, ema_decay=0.9,
                        log_every_steps=10)
  results = train.train_and_evaluate(config, workdir)
  return config, workdir, results


def test_demo_learns_writes_metrics_and_exports(trained):
  config, workdir, results = trained
  assert results['eval/top1'] > 0.5, results  # 10 classes: chance is 0.1
  assert results['eval/num_examples'] == 360
  assert 'eval_ema/top1' in results
  records = read_metrics(workdir)
  train_losses = losses(records)
  assert sorted(train_losses) == list(range(10, 121, 10))
  assert train_losses[120] < train_losses[10]
  assert {'train/lr', 'train/grad_norm', 'train/steps_per_sec'} <= set(records[0])
  assert records[-1]['step'] == 120 and records[-1]['eval/top1'] == results['eval/top1']
  assert json.load(open(os.path.join(workdir, 'config.json')))['model']['name'] == 'mambaout_test'
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))  # TensorBoard

  import mambaout_jax as mo
  model = mo.load_pretrained('mambaout_test', os.path.join(workdir, 'export'))
  assert model(np.zeros((2, 16, 16, 3), np.float32)).shape == (2, 10)


def test_eval_only_mode_corrupt_checkpoint_fallback_and_export_mode(trained, caplog):
  config, workdir, results = trained
  again = train.train_and_evaluate(config, workdir, mode='eval')
  assert again['eval/num_examples'] == 360  # the whole validation split, exactly once
  assert again['eval/top1'] == results['eval/top1']
  assert read_metrics(workdir)[-1]['step'] == 120

  # Corrupt every array file of the newest checkpoint: the previous one (step 60) is used.
  for path in glob.glob(os.path.join(workdir, 'checkpoints', '120', 'state', '**', '*'),
                        recursive=True):
    if os.path.isfile(path) and 'metadata' not in os.path.basename(path):
      with open(path, 'wb') as f:
        f.write(b'garbage')
  fallback = train.train_and_evaluate(config, workdir, mode='eval')
  assert read_metrics(workdir)[-1]['step'] == 60
  assert fallback['eval/num_examples'] == 360
  assert any('120' in r.getMessage() and 'older' in r.getMessage() for r in caplog.records)

  # --mode=export writes the params of the checkpoint it restored.
  train.train_and_evaluate(config, workdir, mode='export')
  meta = json.load(open(os.path.join(workdir, 'export', 'mambaout_meta.json')))
  assert meta['variant'] == 'mambaout_test' and meta['step'] == 60


def test_checkpoint_of_another_variant_is_refused(trained):
  config, workdir, _ = trained
  other = small_config(config.dataset.data_dir, **{'model.name': 'vit_test'})
  with pytest.raises(ValueError, match='mambaout_test.*vit_test'):
    train.train_and_evaluate(other, workdir, mode='eval')


def test_non_finite_loss_stops_with_the_last_checkpoint(data_dir, tmp_path):
  config = small_config(data_dir, total_steps=6, lr=1e30, lr_base_batch=0, warmup_epochs=0.0)
  with pytest.raises(FloatingPointError,
                     match=r'step \d+.*last good checkpoint.*Lower --config.lr'):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, 'checkpoints', '6'))


def test_same_loss_trajectory_on_1_and_8_devices_and_fsdp_with_accumulation(data_dir, tmp_path):
  """8 devices, 1 device, and data 2 x fsdp 4 with 2 micro-batches per step train alike. (Mixup and
  drop path are off here because their draws are per micro-batch; test_train_resume.py checks
  that with them on, a run resumed on 1 device repeats the 8-device one.)"""
  assert jax.device_count() == 8
  trajectories = {}
  for name, mesh, accum in [('8 devices', (('data', -1), ('fsdp', 1)), 1),
                            ('1 device', (('data', 1), ('fsdp', 1)), 1),
                            ('data 2 x fsdp 4, 2 micro-batches', (('data', 2), ('fsdp', 4)), 2)]:
    config = small_config(data_dir, total_steps=4, mesh=mesh, grad_accum_steps=accum)
    workdir = str(tmp_path / name.replace(' ', '_').replace(',', ''))
    train.train_and_evaluate(config, workdir)
    trajectories[name] = losses(read_metrics(workdir))
  reference = trajectories.pop('8 devices')
  assert sorted(reference) == [1, 2, 3, 4]
  assert len(set(reference.values())) == 4
  for name, trajectory in trajectories.items():
    np.testing.assert_allclose([trajectory[s] for s in reference], list(reference.values()),
                               rtol=2e-5, err_msg=name)
