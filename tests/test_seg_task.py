"""Exact resume of a segmentation run through `python -m mambaout_jax.main` (configs/seg/demo.py).

An uninterrupted run is the reference; a second run is stopped by SIGTERM (it saves and exits 143)
and resumed to the end: every train/loss it logged equals the reference's at that step, exactly
(BatchNorm statistics, drop path and the step-addressed input stream come back with the step), and
the final eval (mIoU, the per-class report) is the same. The reference's checkpoint is then
evaluated with `--mode=eval` in 2 processes (jax.distributed over gloo): every validation scene is
counted exactly once and the per-class report equals the 1-process one.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from mambaout_jax.data import digit_scenes
from test_resume_processes import free_port
from test_train_resume import environment, read_metrics, wait_for_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


# ----------------------------------------------------------------------------------------------
# Training through main: resumes exactly


def main_command(workdir):
  return [sys.executable, '-m', 'mambaout_jax.main', '--config=configs/seg/demo.py',
          f'--workdir={workdir}', f'--config.total_steps={STEPS}', '--config.log_every_steps=1',
          '--config.checkpoint_every_steps=4', f'--config.eval_every_steps={STEPS}',
          '--config.model.drop_path_rate=0.1',
          # 256 validation scenes of 48..80 px in batches of 24: the last batch has 8 padding rows
          # (4 in each process's last batch of 12 when 2 processes evaluate).
          '--config.eval_batch_size=24']


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


# ----------------------------------------------------------------------------------------------
# Evaluation in 2 processes: every scene counted exactly once


def test_2_process_eval_counts_every_scene_once(reference, dirs, tmp_path):
  """The reference's final checkpoint evaluated by `--mode=eval` in 2 processes of 4 CPU devices
  (the same 8-device global mesh; each process reads every other scene, 128 of them in 11 batches
  of 12, 4 padding rows): the per-class report is the 1-process one, and the label areas in it are
  a count made directly from the scenes."""
  workdir = tmp_path / 'two_processes'
  shutil.copytree(dirs['reference'], workdir)
  for name in ('metrics.jsonl', f'eval_per_class_{STEPS}.json'):  # written again by the eval
    os.remove(workdir / name)
  port = free_port()
  command = main_command(workdir) + ['--mode=eval', f'--coordinator_address=127.0.0.1:{port}',
                                     '--num_processes=2']
  env = environment(dirs['cache'], 4)
  log_path = tmp_path / 'eval.log'
  with open(log_path, 'w') as log:
    procs = [subprocess.Popen(command + [f'--process_id={i}'], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT) for i in range(2)]
    assert [p.wait(timeout=900) for p in procs] == [0, 0], log_path.read_text()[-4000:]

  got = [r for r in read_metrics(workdir) if 'eval/mIoU' in r]
  want = [r for r in reference if 'eval/mIoU' in r][-1]
  assert len(got) == 1 and got[0]['step'] == want['step'] == STEPS
  assert got[0]['eval/num_examples'] == want['eval/num_examples'] == 256
  report = json.loads((workdir / f'eval_per_class_{STEPS}.json').read_text())
  ref_report = json.loads((dirs['reference'] / f'eval_per_class_{STEPS}.json').read_text())
  assert report == ref_report   # every per-class intersection / prediction / label area, mIoU
  labels = np.concatenate([digit_scenes.make_scene('validation', i)[1].reshape(-1)
                           for i in range(256)])
  expected_area = np.bincount(labels[labels != 255], minlength=11)
  assert [row['area_label'] for row in report['per_class']] == expected_area.tolist()
  assert sum(row['area_pred'] for row in report['per_class']) == expected_area.sum()
  for key in ('eval/mIoU', 'eval/mAcc', 'eval/aAcc'):
    assert got[0][key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
