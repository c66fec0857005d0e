"""Exact resume on a different number of processes: 2 -> 1 -> 2 (jax.distributed over gloo).

The reference is one uninterrupted run in 1 process with 4 CPU devices. The same command is then
started in 2 processes with 2 devices each from an empty workdir, stopped with SIGTERM (every
process saves and exits 143), resumed in 1 process and stopped again (2 -> 1), and resumed in 2
processes to the end (1 -> 2), which evaluates there. The global mesh has 4 devices throughout, so
the global batch of every step (its rows, their augmentation, the mixup and drop-path draws: all
functions of (seed, step)) is the same array in every segment, and every `train/loss` must match
the reference to float rounding; the 2-process evaluation counts every validation example exactly
once and agrees with the reference's. Before the input pipeline was addressed by step, a
process-count change restarted the data stream from its beginning. The launches share a persistent
compilation cache.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 24
CHECKPOINT_EVERY = 8
EVAL_EVERY = TOTAL_STEPS  # one evaluation, at the end (in 2 processes for the resumed run)
GLOBAL_DEVICES = 4


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(num_processes, workdir, data_dir, cache_dir, log):
  """Starts the trainer in `num_processes` processes sharing GLOBAL_DEVICES CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={GLOBAL_DEVICES // num_processes}',
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  cmd = [sys.executable, '-m', 'mambaout_jax.main', '--config=configs/demo.py',
         f'--workdir={workdir}', f'--config.dataset.data_dir={data_dir}',
         '--config.image_size=16', '--config.batch_size=32', '--config.eval_batch_size=120',
         '--config.model.dwconv_impl=conv', f'--config.total_steps={TOTAL_STEPS}',
         '--config.log_every_steps=1', f'--config.checkpoint_every_steps={CHECKPOINT_EVERY}',
         f'--config.eval_every_steps={EVAL_EVERY}', '--config.model.drop_path_rate=0.2',
         '--config.aug.mixup=0.8', '--config.aug.cutmix=1.0']
  if num_processes > 1:
    port = free_port()
    cmd_for = lambda i: cmd + [f'--coordinator_address=127.0.0.1:{port}',
                               f'--num_processes={num_processes}', f'--process_id={i}']
  else:
    cmd_for = lambda i: cmd
  return [subprocess.Popen(cmd_for(i), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
          for i in range(num_processes)]


def read_metrics(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith('\n')]


def train_steps(workdir):
  return [r['step'] for r in read_metrics(workdir) if 'train/loss' in r]


def wait_all(procs, timeout=900):
  deadline = time.time() + timeout
  return [p.wait(timeout=max(1, deadline - time.time())) for p in procs]


def stop_after(procs, workdir, step, timeout=900):
  """SIGTERM to every process once `step` is logged; returns the step the checkpoint holds."""
  deadline = time.time() + timeout
  while not any(s >= step for s in train_steps(workdir)):
    assert time.time() < deadline, 'timed out waiting for a training step'
    assert all(p.poll() is None for p in procs), 'a process ended before the awaited step'
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGTERM)
  assert wait_all(procs) == [143] * len(procs)
  saved = checkpoint_steps(workdir)
  assert saved[-1] == max(train_steps(workdir))
  return saved[-1]


def checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())


def test_2_to_1_to_2_processes_repeats_the_uninterrupted_run(tmp_path):
  data_dir, cache_dir, log_path = tmp_path / 'data', tmp_path / 'cache', tmp_path / 'runs.log'
  log = open(log_path, 'w')
  tail = lambda: log_path.read_text()[-4000:]

  reference = tmp_path / 'reference'
  assert wait_all(launch(1, reference, data_dir, cache_dir, log)) == [0], tail()
  ref = {r['step']: r['train/loss'] for r in read_metrics(reference) if 'train/loss' in r}
  assert sorted(ref) == list(range(1, TOTAL_STEPS + 1))

  workdir = tmp_path / 'changing'
  first = stop_after(launch(2, workdir, data_dir, cache_dir, log), workdir, 5)  # from scratch
  second = stop_after(launch(1, workdir, data_dir, cache_dir, log), workdir, 15)  # 2 -> 1
  assert first < second < TOTAL_STEPS, (first, second)
  assert wait_all(launch(2, workdir, data_dir, cache_dir, log)) == [0, 0], tail()  # 1 -> 2
  log.close()

  records = [r for r in read_metrics(workdir) if 'train/loss' in r]
  assert [r['step'] for r in records] == list(range(1, TOTAL_STEPS + 1))  # No step twice or lost.
  got = np.array([r['train/loss'] for r in records])
  want = np.array([ref[s] for s in range(1, TOTAL_STEPS + 1)])
  difference = np.abs(got / want - 1)
  for name, (start, end) in {'2 processes from scratch': (1, first),
                             '1 process after 2': (first + 1, second),
                             '2 processes after 1': (second + 1, TOTAL_STEPS)}.items():
    print(f'\n{name}, steps {start}-{end}: largest relative train/loss difference to the '
          f'uninterrupted run {difference[start - 1:end].max():.1e}')
  np.testing.assert_allclose(got, want, rtol=1e-6)  # What the README promises.
  # The last evaluation ran in 2 processes: every validation example counted once, same top-1.
  evals = [r for r in read_metrics(workdir) if 'eval/top1' in r]
  ref_eval = [r for r in read_metrics(reference) if 'eval/top1' in r][-1]
  assert evals[-1]['step'] == ref_eval['step'] == TOTAL_STEPS
  assert evals[-1]['eval/num_examples'] == ref_eval['eval/num_examples'] == 360
  np.testing.assert_allclose(evals[-1]['eval/top1'], ref_eval['eval/top1'], atol=1.5 / 360)
  # Checkpoints hold the train state and its structure only: the input pipeline's position is a
  # function of the global step, so no per-process iterator state is saved.
  for step in checkpoint_steps(workdir):
    items = os.listdir(workdir / 'checkpoints' / str(step))
    assert {'state', 'meta'} <= set(items) and 'data' not in items, items
