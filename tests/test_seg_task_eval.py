"""Exactly-once segmentation eval on the embedded `digit_scenes` demo (configs/seg/demo.py):
validation scenes of 48..80 px (different sizes), an eval batch that leaves padding rows, on 1 and
on 8 devices: every scene counted once (num_examples, and per-class label areas equal to a count
made directly from the scenes), and the same sums on both layouts.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mambaout_jax import sharding as shd
from mambaout_jax.data import digit_scenes
from mambaout_jax.tasks import get_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_config(**overrides):
  import importlib.util
  spec = importlib.util.spec_from_file_location('seg_demo', os.path.join(ROOT, 'configs/seg/demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update_from_flattened_dict(overrides)
  return config


# ----------------------------------------------------------------------------------------------
# Exactly-once eval on 1 and 8 devices


def eval_sums_on(devices, config):
  task = get_task(config)
  info = task.dataset_info(config)
  model = task.build_model(config, info.num_classes, rngs=nnx.Rngs(0))
  model.eval()
  graphdef, state = nnx.split(model)
  mesh = jax.sharding.Mesh(np.array(devices).reshape(-1, 1), ('data', 'fsdp'))

  @jax.jit
  def sums_fn(state, batch):
    return task.eval_sums(nnx.merge(graphdef, state), batch)

  total = None
  for batch in task.create_eval_iterator(config, process_index=0, process_count=1):
    out = sums_fn(state, shd.host_local_to_global(batch, mesh))
    total = out if total is None else jax.tree.map(jnp.add, total, out)
  return jax.device_get(total), task.eval_metrics(jax.device_get(total))


def test_eval_counts_every_scene_once_on_1_and_8_devices():
  config = demo_config(eval_batch_size=24)          # 256 scenes -> 11 batches, 8 padding rows
  one, metrics_one = eval_sums_on(jax.devices()[:1], config)
  eight, metrics_eight = eval_sums_on(jax.devices()[:8], config)

  labels = [digit_scenes.make_scene('validation', i)[1] for i in range(256)]
  assert len({l.shape for l in labels}) > 100                     # sizes really differ
  flat = np.concatenate([l.reshape(-1) for l in labels])
  expected_area = np.bincount(flat[flat != 255], minlength=11)
  for sums in (one, eight):
    assert int(sums['num_examples']) == 256
    np.testing.assert_array_equal(sums['area_label'], expected_area)
    assert int(sums['area_pred'].sum()) == int(expected_area.sum())
  for key in one:
    np.testing.assert_array_equal(one[key], eight[key], err_msg=key)
  assert metrics_one == metrics_eight and metrics_one['num_examples'] == 256
