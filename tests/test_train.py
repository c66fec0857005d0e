"""The trainer in-process on the demo dataset (16 px digits, `mambaout_test`): it learns, exports,
evaluates, refuses another variant's checkpoint, falls back from a corrupt checkpoint, and gives the
same loss trajectory on 1 device, 8 devices and a data x fsdp mesh."""
import glob
import importlib.util
import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from mambaout_jax import checkpoint as ckpt_lib
from mambaout_jax import params as params_lib
from mambaout_jax import train
from mambaout_jax.tasks.classification import ClassificationTask

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


def snapshot(workdir) -> dict[str, bytes]:
  """Every file under the workdir with its bytes."""
  files = sorted(p for p in glob.glob(os.path.join(workdir, '**'), recursive=True)
                 if os.path.isfile(p))
  return {p: open(p, 'rb').read() for p in files}


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

  # --mode=export writes the params of the checkpoint it restored, with every structural kwarg.
  train.train_and_evaluate(config, workdir, mode='export')
  meta = json.load(open(os.path.join(workdir, 'export', 'mambaout_meta.json')))
  assert meta['variant'] == 'mambaout_test' and meta['step'] == 60
  assert meta['model_kwargs'] == {'num_classes': 10}

  # When no checkpoint reads back, the run refuses instead of starting afresh beside them.
  copy = os.path.join(os.path.dirname(workdir), 'all_corrupt')
  shutil.copytree(workdir, copy)
  for path in glob.glob(os.path.join(copy, 'checkpoints', '60', 'state', '**', '*'),
                        recursive=True):
    if os.path.isfile(path) and 'metadata' not in os.path.basename(path):
      with open(path, 'wb') as f:
        f.write(b'garbage')
  before = snapshot(copy)
  with pytest.raises(ckpt_lib.CheckpointUnreadableError,
                     match=r'none of the 2 checkpoints .* \(steps 60, 120\) reads back'):
    train.train_and_evaluate(config, copy)
  assert snapshot(copy) == before


@pytest.mark.parametrize('key, value, structural', [
    ('dataset.num_classes', 7, 'num_classes=10.*num_classes=7'),
    ('ema_decay', 0.0, 'ema=True.*ema=False'),
    ('grad_clip_norm', 1.0, 'grad_clip=False.*grad_clip=True'),
])
def test_a_structural_change_is_refused_before_anything_is_written(trained, key, value,
                                                                     structural):
  config, workdir, _ = trained
  before = snapshot(workdir)
  changed = small_config(config.dataset.data_dir, **{key: value, 'ema_decay': config.ema_decay})
  if key == 'ema_decay':
    changed.ema_decay = value
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=rf'{structural}; use another --workdir or set --config.{key} back'):
    train.train_and_evaluate(changed, workdir)
  assert snapshot(workdir) == before  # checkpoints, metrics.jsonl and config.json untouched


def test_checkpoint_of_another_variant_is_refused(trained):
  config, workdir, _ = trained
  other = small_config(config.dataset.data_dir,
                       **{'model.name': 'vit_test', 'model.dwconv_impl': 'auto'})
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match="variant='mambaout_test'.*variant='vit_test'.*--config.model.name back"):
    train.train_and_evaluate(other, workdir, mode='eval')


def test_non_finite_loss_stops_with_the_last_checkpoint(data_dir, tmp_path):
  config = small_config(data_dir, total_steps=6, lr=1e30, lr_base_batch=0, warmup_epochs=0.0,
                        checkpoint_every_steps=1, async_checkpointing=False)
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(config, str(tmp_path))
  # Step 1's loss is that of the initial params; the lr of 1e30 makes every later one non-finite.
  assert re.fullmatch(r'train/loss is (nan|inf) at step 2; stopped without saving\. The last good '
                      r'checkpoint is step 1 in \S+\. Lower --config.lr .*', str(error.value)), error
  assert sorted(os.listdir(os.path.join(tmp_path, 'checkpoints'))) == ['1']


def test_fsdp_shardings_hand_computed_ema_and_the_shift_dwconv_in_the_sharded_step(data_dir):
  """data 2 x fsdp 4 with the CPU default depthwise conv ('shift', custom gradient): parameters
  and Adam moments sharded by the FSDP rule, the EMA equal to one computed by hand from the
  parameters after each step, and the first step equal to the 'conv' formulation's."""
  from flax import traverse_util
  from mambaout_jax import data as data_lib
  from mambaout_jax import sharding as shd
  config = small_config(data_dir, mesh=(('data', 2), ('fsdp', 4)), ema_decay=0.75,
                        **{'model.dwconv_impl': 'shift'})
  mesh = shd.create_mesh(config.mesh)
  fns = train.create_step_functions(config, mesh, 10, 10.0)
  state, rest = fns.init()

  flat_params = traverse_util.flatten_dict(state['params'])
  sharded = [k for k, v in flat_params.items() if 'fsdp' in v.sharding.spec]
  assert len(sharded) >= 4, 'the FSDP rule should shard the larger kernels'
  for key, value in flat_params.items():
    assert value.sharding.spec == shd.param_spec(value.shape, 4), key
  adam = state['opt_state'][0]  # optax.adamw: (ScaleByAdamState, ...)
  for moments in (adam.mu, adam.nu):
    for key, value in traverse_util.flatten_dict(moments).items():
      assert value.sharding.spec == flat_params[key].sharding.spec, key

  batches = data_lib.create_train_iterator(config)
  ema = jax.tree.map(np.asarray, jax.device_get(state['params']))
  first_batch = next(batches)
  batch = first_batch
  for _ in range(3):
    state, metrics = fns.train_step(state, shd.host_local_to_global(batch, mesh), rest)
    if _ == 0:
      shift_metrics = jax.device_get(metrics)
    params = jax.tree.map(np.asarray, jax.device_get(state['params']))
    ema = jax.tree.map(lambda e, p: 0.75 * e + 0.25 * p, ema, params)
    batch = next(batches)
  for (key, got), want in zip(traverse_util.flatten_dict(jax.device_get(state['ema_params'])).items(),
                              traverse_util.flatten_dict(ema).values()):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=str(key))
  assert all(v.sharding.spec == flat_params[k].sharding.spec
             for k, v in traverse_util.flatten_dict(state['ema_params']).items())

  config.model.dwconv_impl = 'conv'
  conv = train.create_step_functions(config, mesh, 10, 10.0)
  conv_state, conv_rest = conv.init()
  _, conv_metrics = conv.train_step(conv_state, shd.host_local_to_global(first_batch, mesh),
                                    conv_rest)
  for name in ('train/loss', 'train/grad_norm'):
    np.testing.assert_allclose(shift_metrics[name], jax.device_get(conv_metrics[name]),
                               rtol=1e-5, err_msg=name)


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


# ----------------------------------------------------------------------------------------------
# The trainer is task-generic: a toy task whose model has BatchNorm (its running statistics are
# the train state's `model_state`) and whose eval batches report undecodable rows.

class ToyBatchNormModel(nnx.Module):
  def __init__(self, num_classes, *, batch_norm=True, rngs, **runtime_kwargs):
    del runtime_kwargs  # dtype, drop path: not used by this model
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.5, rngs=rngs) if batch_norm else None
    self.head = nnx.Linear(8, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.conv(x)
    return self.head(nnx.relu(self.bn(x) if self.bn is not None else x).mean((1, 2)))


def toy_batch(seed, size):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, size).astype(np.int32)
  images = rng.normal(2.0, 3.0, (size, 8, 8, 3)).astype(np.float32) + labels[:, None, None, None]
  return {'image': images, 'label': labels}


class ToyTask(ClassificationTask):
  """Classification's loss and metrics on random 8x8 images; the stream is a function of step."""

  def dataset_info(self, config):
    from mambaout_jax.data import DatasetInfo
    return DatasetInfo(num_classes=3, num_train_examples=64, num_eval_examples=20)

  def model_kwargs(self, config, num_classes):
    return {'num_classes': num_classes}

  batch_norm = True

  def build_model(self, config, num_classes, *, rngs, **runtime_kwargs):
    return ToyBatchNormModel(num_classes, batch_norm=self.batch_norm, rngs=rngs, **runtime_kwargs)

  def create_train_iterator(self, config, *, process_index, process_count, start_step=0):
    step = start_step
    while True:
      batch = toy_batch(step, config.batch_size)
      yield {k: v[process_index::process_count] for k, v in batch.items()}
      step += 1

  def create_eval_iterator(self, config, *, process_index, process_count):
    for i in range(2):  # 20 examples in 2 batches of 16: rows 20..31 are padding
      batch = toy_batch(10_000 + i, 16)
      position = np.arange(16) + 16 * i
      batch['undecodable'] = np.isin(position, (3, 17))  # two examples the pipeline could not read
      batch['mask'] = (position < 20) & ~batch['undecodable']
      yield {k: v[process_index::process_count] for k, v in batch.items()}


def restore_numpy(workdir, step):
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', str(step), 'state'))


def test_a_task_with_batchnorm_trains_checkpoints_and_resumes_its_running_statistics(tmp_path):
  config = small_config('', total_steps=4, checkpoint_every_steps=2, keep_checkpoints=5,
                        batch_size=16, eval_batch_size=16)
  reference, resumed = str(tmp_path / 'reference'), str(tmp_path / 'resumed')
  results = train.train_and_evaluate(config, reference, task=ToyTask())
  assert results['eval/num_examples'] == 18 and results['eval/num_undecodable'] == 2
  stats = {s: restore_numpy(reference, s)['model_state']['bn'] for s in (2, 4)}
  assert np.abs(stats[2]['mean']).min() > 1e-3 and np.abs(stats[2]['var'] - 1).min() > 1e-3
  assert not np.allclose(stats[2]['mean'], stats[4]['mean'])  # and updated every step
  exported, _ = params_lib.read_params(os.path.join(reference, 'export'))
  np.testing.assert_array_equal(exported[('bn', 'mean')], stats[4]['mean'])  # exported with params

  # Resume from step 2: the statistics come back from the checkpoint (momentum keeps them).
  shutil.copytree(reference, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '4'))
  os.remove(os.path.join(resumed, 'metrics.jsonl'))
  again = train.train_and_evaluate(config, resumed, task=ToyTask())
  assert losses(read_metrics(resumed)) == {s: losses(read_metrics(reference))[s] for s in (3, 4)}
  for name in ('mean', 'var'):
    np.testing.assert_array_equal(restore_numpy(resumed, 4)['model_state']['bn'][name],
                                  stats[4][name])
  assert again == results  # eval used the restored running statistics


def test_init_from_in_a_fresh_workdir_and_eval_only_without_a_training_split_limit(tmp_path):
  """The trainer's side of config.init_from: the task's hook gets the fresh params and what it
  returns is trained from (EMA too); --mode=eval evaluates it with no checkpoint, whatever the
  batch size; an existing checkpoint wins over init_from."""
  class WithoutBatchNorm(ToyTask):  # exports hold params only (no running statistics)
    batch_norm = False

  source = str(tmp_path / 'source')
  config = small_config('', total_steps=2, batch_size=16, eval_batch_size=16, ema_decay=0.5)
  trained_results = train.train_and_evaluate(config, source, task=WithoutBatchNorm())

  class FromExport(WithoutBatchNorm):
    def init_params_from(self, config, params):
      from mambaout_jax import params as params_lib
      loaded, _ = params_lib.read_params(config.init_from)
      assert set(params_lib.flatten(params)) == set(loaded)
      return params_lib.nest(loaded)

  config.init_from = os.path.join(source, 'export')
  config.batch_size = 4096  # larger than the 64 training examples: eval does not care
  fresh = str(tmp_path / 'fresh')
  results = train.train_and_evaluate(config, fresh, mode='eval', task=FromExport())
  for key in ('eval/loss', 'eval/top1', 'eval/num_examples'):
    assert results[key] == pytest.approx(trained_results[key], rel=1e-6), key
  assert results['eval_ema/loss'] == pytest.approx(trained_results['eval/loss'], rel=1e-6)
  assert not os.path.exists(os.path.join(fresh, 'checkpoints', '0'))

  config.init_from = '/does/not/exist'  # never read: the source's own checkpoint wins
  config.batch_size = 16
  assert train.train_and_evaluate(config, source, mode='eval', task=FromExport()) == trained_results


def test_classification_init_from_reads_an_export(trained, tmp_path):
  """config.init_from on the classification task, through mambaout_jax.pretrained (the
  pretrained-weights branch): the export of the trained demo, evaluated without training."""
  pytest.importorskip('mambaout_jax.pretrained')
  config, workdir, _ = trained
  export_meta = json.load(open(os.path.join(workdir, 'export', 'mambaout_meta.json')))
  fresh = small_config(config.dataset.data_dir, init_from=os.path.join(workdir, 'export'))
  results = train.train_and_evaluate(fresh, str(tmp_path), mode='eval')
  logged = [r for r in read_metrics(workdir) if r['step'] == export_meta['step'] and
            'eval/top1' in r]
  assert results['eval/top1'] == logged[-1]['eval/top1']
