"""`python -m mambaout_jax.aot` compiles the real train step for a TPU topology on this CPU host."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_aot_compiles_the_train_step_for_a_small_tpu_slice():
  pytest.importorskip('libtpu', reason='libtpu is in requirements-dev.txt')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  cmd = [sys.executable, '-m', 'mambaout_jax.aot', '--config=configs/demo.py', '--topology=v5e:2x2',
         '--num_classes=10', '--config.image_size=16', '--config.batch_size=16',
         '--config.grad_accum_steps=2', '--config.model.dtype=bfloat16', '--json']
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report['num_devices'] == report['num_chips'] == 4
  assert report['device_kind'].startswith('TPU v5')
  assert report['mesh'] == {'data': 4, 'fsdp': 1}
  assert report['fits'] is True and 0 < report['total_gib'] < report['hbm_gib']
  # Parameters + AdamW moments (fp32, replicated) are arguments of the step on every device.
  assert report['argument_gib'] * 2 ** 30 >= 3 * 4 * report['num_params']
  # XLA's FLOPs are per device; per image a train step costs ~3x the forward pass. mambaout_test
  # with 10 classes at 16 px: ~0.32 MMAC = 0.64 MFLOP forward (python -m mambaout_jax.profile).
  assert 1.5e6 < report['flops_per_image'] < 3e6
