"""The segmentation demo learns: the README's command for configs/seg/demo.py, shortened, segments
digits it never saw.

`python -m mambaout_jax.main --config=configs/seg/demo.py` for a few hundred steps (the schedule
squeezed into them) from scratch on one CPU device, as a user runs it, then its whole-image eval on
the 256 validation scenes (handwriting disjoint from training). Predicting background everywhere
scores an mIoU of about 7 (background's IoU over 11 classes) and no digit IoU; the test asks for
several times that and for most digits to be found.
"""
import json
import os
import subprocess
import sys

import pytest

from mambaout_jax.data import digit_scenes
from test_train_resume import environment, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 500


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('seg_demo')
  log = workdir.parent / 'seg_demo.log'
  command = [sys.executable, '-m', 'mambaout_jax.main', '--config=configs/seg/demo.py',
             f'--workdir={workdir}', f'--config.total_steps={STEPS}',
             f'--config.eval_every_steps={STEPS}', f'--config.checkpoint_every_steps={STEPS}']
  run = subprocess.run(command, cwd=ROOT, env=environment(workdir.parent / 'cache', 1),
                       stdout=open(log, 'w'), stderr=subprocess.STDOUT)
  assert run.returncode == 0, log.read_text()[-3000:]
  return workdir, read_metrics(workdir)


def test_demo_learns_to_segment_digits_it_never_saw(trained):
  workdir, records = trained
  results = [r for r in records if 'eval/mIoU' in r][-1]
  print(f"\nseg demo, {STEPS} steps: mIoU {results['eval/mIoU']:.1f}")
  assert results['step'] == STEPS and results['eval/num_examples'] == 256
  assert results['eval/mIoU'] > 35, results
  report = json.load(open(workdir / f'eval_per_class_{STEPS}.json'))
  iou = {row['class']: row['IoU'] for row in report['per_class']}
  assert iou['background'] > 85, iou
  assert sum((iou[str(d)] or 0) > 20 for d in range(10)) >= 7, iou   # told apart, not one class
  # Logged every 50 steps; train/epoch counts passes over the 4096 training scenes (batch 16).
  epochs = {r['step']: r['train/epoch'] for r in records if 'train/epoch' in r}
  assert sorted(epochs) == list(range(50, STEPS + 1, 50))
  assert epochs[STEPS] == pytest.approx(STEPS * 16 / digit_scenes.SPLIT_SIZES['train'])
