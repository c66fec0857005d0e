"""The recipe's pieces: timm's cosine schedule, the weight-decay mask, sharding rules, configs."""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mambaout_jax as mo
from mambaout_jax import optim, recipes, train
from mambaout_jax import sharding as shd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TIMM_SCHEDULE = """
import json, sys, torch
from timm.scheduler.cosine_lr import CosineLRScheduler
out = []
for kw, ts in json.loads(sys.argv[1]):
  opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=kw.pop('lr'))
  sched = CosineLRScheduler(opt, cycle_limit=1, **kw)
  out.append([sched._get_lr(t)[0] for t in ts])
print(json.dumps(out))
"""


def timm_lrs(*runs):
  """timm's CosineLRScheduler values, computed in a separate process: importing torchvision
  (timm needs it) after TensorFlow crashes this one."""
  if importlib.util.find_spec('timm') is None:
    pytest.skip('timm (requirements-dev.txt) is the reference')
  args = json.dumps([(kw, [int(t) for t in ts]) for kw, ts in runs])
  out = subprocess.run([sys.executable, '-c', TIMM_SCHEDULE, args], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return [np.array(v) for v in json.loads(out.stdout.strip().splitlines()[-1])]


def test_cosine_schedule_matches_timm_per_epoch_and_per_step():
  steps_per_epoch, epochs, warmup, cooldown = 7, 30, 5, 3
  steps = np.arange(0, (epochs + cooldown) * steps_per_epoch)
  kw = dict(base_lr=4e-3, steps_per_epoch=steps_per_epoch, epochs=epochs, warmup_epochs=warmup,
            warmup_lr=1e-6, min_lr=1e-5)
  per_epoch = np.array(jax.vmap(optim.cosine_schedule(per_step=False, **kw))(steps))
  per_step = np.array(jax.vmap(optim.cosine_schedule(per_step=True, **kw))(steps))
  timm_kw = dict(lr=4e-3, lr_min=1e-5, warmup_lr_init=1e-6)
  expected_per_epoch, expected_per_step = timm_lrs(
      (dict(t_initial=epochs, warmup_t=warmup, t_in_epochs=True, **timm_kw),
       steps // steps_per_epoch),
      (dict(t_initial=epochs * steps_per_epoch, warmup_t=warmup * steps_per_epoch,
            t_in_epochs=False, **timm_kw), steps))
  np.testing.assert_allclose(per_epoch, expected_per_epoch, rtol=1e-5)
  np.testing.assert_allclose(per_step, expected_per_step, rtol=1e-5)
  assert per_step[-1] == pytest.approx(1e-5)  # cool-down at min lr


def test_learning_rate_scales_with_batch():
  c = recipes.imagenet_recipe('mambaout_tiny')
  assert optim.learning_rate(c) == pytest.approx(4e-3)
  c.batch_size = 1024
  assert optim.learning_rate(c) == pytest.approx(1e-3)


def test_weight_decay_mask():
  model = nnx.eval_shape(lambda: mo.create_model('mambaout_test', rngs=nnx.Rngs(0), num_classes=10))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  params['ssm'] = {'A_log': jnp.zeros((4, 2)), 'D': jnp.zeros((4,)),
                   'x_proj': {'kernel': jnp.zeros((4, 8))}}
  mask = optim.decay_mask(params)
  flat = {'.'.join(map(str, k)): v for k, v in nnx.traversals.flatten_mapping(mask).items()}
  assert flat['stages.2.blocks.0.fc1.kernel'] and flat['stages.2.blocks.0.conv.kernel']
  assert flat['stem.conv1.kernel'] and flat['head.fc.kernel'] and flat['ssm.x_proj.kernel']
  for name in ('stages.2.blocks.0.fc1.bias', 'stages.2.blocks.0.norm.scale',
               'stages.2.blocks.0.ls.gamma', 'stages.2.blocks.0.conv.bias', 'ssm.A_log', 'ssm.D'):
    assert not flat[name], name


def test_mesh_and_fsdp_rule():
  assert shd.mesh_shape((('data', -1), ('fsdp', 1)), 8) == (8, 1)
  assert shd.mesh_shape((('data', -1), ('fsdp', 4)), 8) == (2, 4)
  with pytest.raises(ValueError, match='does not divide'):
    shd.mesh_shape((('data', -1), ('fsdp', 3)), 8)
  with pytest.raises(ValueError, match='unknown mesh axes'):
    shd.mesh_shape((('model', 2),), 8)
  assert shd.param_spec((384, 1024), 4) == jax.sharding.PartitionSpec(None, 'fsdp')
  assert shd.param_spec((64,), 4) == jax.sharding.PartitionSpec()  # small: replicated
  assert shd.param_spec((384, 1024), 1) == jax.sharding.PartitionSpec()
  mesh = shd.create_mesh((('data', 1), ('fsdp', 1)))
  assert mesh.devices.size == 1


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(ROOT, 'configs', '*.py'))))
def test_configs_build_and_name_a_registered_model(path):
  spec = importlib.util.spec_from_file_location('config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert config.model.name in mo.list_models()
  assert 'python -m mambaout_jax.main --config=configs/' in module.__doc__
  train.validate_config(config)
  for key in ('seed', 'dataset.name', 'dataset.data_dir', 'image_size', 'batch_size',
              'eval_batch_size', 'num_epochs', 'total_steps', 'log_every_steps',
              'eval_every_steps', 'checkpoint_every_steps'):
    node = config
    for part in key.split('.'):
      node = node[part]


def test_paper_configs_carry_the_recipe():
  for name, drop_path in [('femto', 0.025), ('kobe', 0.025), ('tiny', 0.2), ('small', 0.4),
                          ('base', 0.6)]:
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'configs', f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    assert c.model.drop_path_rate == drop_path
    assert (c.batch_size, c.num_epochs, c.cooldown_epochs, c.warmup_epochs) == (4096, 300, 10, 20)
    assert optim.learning_rate(c) == pytest.approx(4e-3)
    assert (c.weight_decay, c.min_lr, c.warmup_lr) == (0.05, 1e-5, 1e-6)
    assert (c.aug.mixup, c.aug.cutmix, c.aug.label_smoothing, c.aug.reprob) == (0.8, 1.0, 0.1, 0.25)
    assert c.aug.randaugment == 'rand-m9-mstd0.5-inc1' and c.model.dtype == 'bfloat16'


def test_model_kwargs_follow_what_the_model_accepts():
  config = recipes.base_config()
  config.model.name = 'mamba_test'
  assert train.model_kwargs(config, 10) == {'num_classes': 10, 'scan_order': 'cross'}  # default
  config.model.scan_order = 'raster'
  kwargs = train.model_kwargs(config, 10)
  assert kwargs['scan_order'] == 'raster'
  model = nnx.eval_shape(lambda: mo.create_model('mamba_test', **kwargs))
  orders = {m.scan_order for _, m in nnx.iter_modules(model) if hasattr(m, 'scan_order')}
  assert orders == {'raster'}
  config.model.name = 'mambaout_test'  # no SSM: the key does not apply
  with pytest.raises(ValueError, match="scan_order='raster' does not apply to mambaout_test"):
    train.model_kwargs(config, 10)
  config.model.scan_order = ''
  assert train.model_kwargs(config, 10) == {'num_classes': 10}
  config.model.name, config.image_size = 'vit_test', 48
  assert train.model_kwargs(config, 10) == {'num_classes': 10, 'img_size': 48}
  config.model.dwconv_impl = 'conv'  # a runtime kwarg the ViT does not take either
  with pytest.raises(ValueError, match=r"^config.model.dwconv_impl='conv' does not apply to "
                                       r"vit_test \(it has no depthwise convolution\); set "
                                       r"--config.model.dwconv_impl=auto$"):
    train.runtime_kwargs(config)
