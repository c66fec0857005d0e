"""Two local processes (jax.distributed over gloo, 2 CPU devices each) train like one process.

Each process reads its own half of every global batch (the data pipeline's host sharding); the global
batch holds the same examples with the same augmentation as in a single process, so without mixup
and drop path (whose per-row draws depend on the row's position) the loss trajectory is the same up
to float summation order. Eval must count every validation example exactly once.
"""
import os
import socket
import subprocess
import sys

import numpy as np

from mambaout_jax import train
from test_train import losses, read_metrics, small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  data_dir = tmp_path / 'data'
  config = small_config(data_dir, total_steps=STEPS, checkpoint_every_steps=3)
  one = train.train_and_evaluate(config, str(tmp_path / 'one'))  # also prepares the dataset

  port = free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu',
             PYTHONPATH=ROOT)
  workdir = tmp_path / 'two'
  procs = []
  for i in range(2):
    cmd = [sys.executable, '-m', 'mambaout_jax.main', '--config=configs/demo.py',
           f'--workdir={workdir}', f'--config.dataset.data_dir={data_dir}',
           '--config.image_size=16', '--config.batch_size=32', '--config.eval_batch_size=120',
           '--config.model.dwconv_impl=conv',
           f'--config.total_steps={STEPS}', '--config.log_every_steps=1',
           '--config.checkpoint_every_steps=3', '--config.eval_every_steps=10000',
           f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}']
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(tmp_path / f'p{i}.log', 'w'),
                                  stderr=subprocess.STDOUT))
  for i, p in enumerate(procs):
    assert p.wait(timeout=900) == 0, (tmp_path / f'p{i}.log').read_text()[-3000:]

  records = read_metrics(workdir)
  two = records[-1]
  assert two['eval/num_examples'] == one['eval/num_examples'] == 360
  reference = losses(read_metrics(tmp_path / 'one'))
  trajectory = losses(records)
  assert sorted(trajectory) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([trajectory[s] for s in reference], list(reference.values()),
                             rtol=2e-5)
  np.testing.assert_allclose(two['eval/top1'], one['eval/top1'], atol=1.5 / 360)
  # The checkpoint holds the train state and its structure only: the input pipeline's position
  # is a function of the global step, so no per-process iterator state is saved.
  items = os.listdir(workdir / 'checkpoints' / str(STEPS))
  assert {'state', 'meta'} <= set(items) and 'data' not in items, items
