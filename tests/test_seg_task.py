"""Exact resume of a segmentation run through `python -m mambaout_jax.main` (configs/seg/demo.py).

An uninterrupted run is the reference; a second run is stopped by SIGTERM (it saves and exits 143)
and resumed to the end: every train/loss it logged equals the reference's at that step, exactly
(BatchNorm statistics, drop path and the step-addressed input stream come back with the step), and
the final eval (mIoU, the per-class report) is the same.
"""
import json
import os
import signal
import subprocess
import sys

import pytest

from test_train_resume import environment, read_metrics, wait_for_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


# ----------------------------------------------------------------------------------------------
# Training through main: resumes exactly


def main_command(workdir):
  return [sys.executable, '-m', 'mambaout_jax.main', '--config=configs/seg/demo.py',
          f'--workdir={workdir}', f'--config.total_steps={STEPS}', '--config.log_every_steps=1',
          '--config.checkpoint_every_steps=4', f'--config.eval_every_steps={STEPS}',
          '--config.model.drop_path_rate=0.1']


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('seg')
  return {name: root / name for name in ('cache', 'reference', 'interrupted')}


@pytest.fixture(scope='module')
def reference(dirs):
  log = dirs['reference'].parent / 'reference.log'
  run = subprocess.run(main_command(dirs['reference']), cwd=ROOT,
                       env=environment(dirs['cache'], 8), stdout=open(log, 'w'),
                       stderr=subprocess.STDOUT)
  assert run.returncode == 0, log.read_text()[-3000:]
  return read_metrics(dirs['reference'])


def test_resumed_run_repeats_the_uninterrupted_train_loss(reference, dirs, tmp_path):
  ref = {r['step']: r['train/loss'] for r in reference if 'train/loss' in r}
  assert sorted(ref) == list(range(1, STEPS + 1))
  workdir = dirs['interrupted']
  env = environment(dirs['cache'], 8)
  log = open(tmp_path / 'runs.log', 'w')
  proc = subprocess.Popen(main_command(workdir), cwd=ROOT, env=env, stdout=log,
                          stderr=subprocess.STDOUT)
  wait_for_step(proc, workdir, lambda s: s >= 5, timeout=1200)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 143
  stopped_at = max(r['step'] for r in read_metrics(workdir) if 'train/loss' in r)
  assert stopped_at < STEPS
  run = subprocess.run(main_command(workdir), cwd=ROOT, env=env, stdout=log,
                       stderr=subprocess.STDOUT)
  log.close()
  assert run.returncode == 0, (tmp_path / 'runs.log').read_text()[-3000:]
  records = [r for r in read_metrics(workdir) if 'train/loss' in r]
  assert {r['step'] for r in records} == set(ref)
  for r in records:
    assert r['train/loss'] == ref[r['step']], (r['step'], r['train/loss'], ref[r['step']])
  final = [r for r in read_metrics(workdir) if 'eval/mIoU' in r][-1]
  assert final['step'] == STEPS and final['eval/num_examples'] == 256
  assert final['eval/mIoU'] == [r for r in reference if 'eval/mIoU' in r][-1]['eval/mIoU']
  report = json.loads((workdir / f'eval_per_class_{STEPS}.json').read_text())
  assert [r['class'] for r in report['per_class']] == [str(d) for d in range(10)] + ['background']
  print(f'\nSIGTERM after step {stopped_at}, resumed: {len(records)} train/loss lines equal '
        'the uninterrupted run')
