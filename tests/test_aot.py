"""`python -m mambaout_jax.aot` compiles the real train step for a TPU topology on this CPU host."""
import json
import os
import subprocess
import sys

import pytest

from mambaout_jax import aot

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
  # Roofline: v5e's documented peak and bandwidth, the bound is the larger of the two times.
  assert report['peak_flops_per_device'] == 197e12
  assert report['hbm_bandwidth_per_device'] == 819e9
  compute = report['flops_per_step_per_device'] / 197e12
  memory = report['bytes_accessed_per_device'] / 819e9
  assert report['roofline_seconds'] == pytest.approx(max(compute, memory))
  assert report['bound'] == ('compute' if compute >= memory else 'memory')
  assert report['mfu_ceiling'] == pytest.approx(compute / max(compute, memory))
  assert report['images_per_second_per_chip_ceiling'] == pytest.approx(
      16 / 4 / report['roofline_seconds'])
  # A step reads at least the parameters and both AdamW moments once.
  assert report['bytes_accessed_per_device'] >= 3 * 4 * report['num_params']
  # The per-category split (estimated from the HLO text) is of the same order as XLA's count.
  shares = report['hbm_bytes_share_by_category']
  assert sum(shares.values()) == pytest.approx(1.0)
  assert 0.2 < report['hlo_bytes_estimate_per_device'] / report['bytes_accessed_per_device'] < 5
  # 2 micro-batches: the report says the cost may count the micro-batch loop once.
  assert 'with 2 micro-batches' in report['cost_note']
  assert aot.format_report(report).splitlines()[-1] == f"  note: {report['cost_note']}"


def test_aot_compiles_the_segmentation_train_step_from_the_tasks_batch():
  pytest.importorskip('libtpu', reason='libtpu is in requirements-dev.txt')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  cmd = [sys.executable, '-m', 'mambaout_jax.aot', '--config=configs/seg/demo.py',
         '--topology=v5e:2x2', '--config.image_size=32', '--config.batch_size=8', '--json']
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])
  # The segmentation task's batch: 32x32 crops with a label per pixel, not one per image.
  assert report['task'] == 'segmentation' and report['model'] == 'upernet_mambaout_test'
  assert report['batch_shapes'] == {'image': [8, 32, 32, 3], 'label': [8, 32, 32]}
  assert report['mesh'] == {'data': 4, 'fsdp': 1}
  assert report['fits'] is True and 0 < report['total_gib'] < report['hbm_gib']
  assert report['argument_gib'] * 2 ** 30 >= 3 * 4 * report['num_params']  # fp32 params + AdamW
  # ~4.66 MMAC forward per 32 px image (python -m mambaout_jax.profile
  # --variant=upernet_mambaout_test --resolution=32) -> a train step ~3 x 2 x 4.66M FLOPs each.
  assert 1.5e7 < report['flops_per_image'] < 4e7
  assert 'cost_note' not in report  # one micro-batch: no loop to under-count
  # The depthwise convs were traced as on a TPU (grouped convolution), not as the CPU host's
  # shifted multiply-adds that their 'auto' implementation picks on this machine.
  shares = report['hbm_bytes_share_by_category']
  assert shares.get('depthwise/grouped convolution fusion', 0) > 0
  assert not any(k.startswith('shifted multiply-add') for k in shares)


HLO = """HloModule m

%fused_exp (param_0: f32[8,16]) -> f32[8,16] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  ROOT %exponential.1 = f32[8,16]{1,0} exponential(f32[8,16]{1,0} %param_0)
}

%fused_dw (param_0: bf16[2,8,8,4], param_1: bf16[7,7,1,4]) -> bf16[2,8,8,4] {
  %param_0 = bf16[2,8,8,4]{3,2,1,0} parameter(0)
  %param_1 = bf16[7,7,1,4]{3,2,1,0} parameter(1)
  ROOT %convolution.2 = bf16[2,8,8,4]{3,2,1,0} convolution(bf16[2,8,8,4]{3,2,1,0} %param_0, bf16[7,7,1,4]{3,2,1,0} %param_1), window={size=7x7 pad=3_3x3_3}, dim_labels=b01f_01io->b01f, feature_group_count=4
}

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %gte.0 = s32[] get-tuple-element((s32[], f32[8,16]{1,0}) %p), index=0
  %gte.1 = f32[8,16]{1,0} get-tuple-element((s32[], f32[8,16]{1,0}) %p), index=1
  %fusion.1 = f32[8,16]{1,0} fusion(f32[8,16]{1,0} %gte.1), kind=kLoop, calls=%fused_exp, metadata={op_name="f32[1000]"}
  ROOT %tuple = (s32[], f32[8,16]{1,0}) tuple(s32[] %gte.0, f32[8,16]{1,0} %fusion.1)
}

ENTRY %main (a: f32[8,16], b: f32[16,4], x: bf16[2,8,8,4], w: bf16[7,7,1,4]) -> f32[8,4] {
  %a = f32[8,16]{1,0} parameter(0)
  %b = f32[16,4]{1,0} parameter(1)
  %x = bf16[2,8,8,4]{3,2,1,0} parameter(2)
  %w = bf16[7,7,1,4]{3,2,1,0} parameter(3)
  %fusion.2 = bf16[2,8,8,4]{3,2,1,0} fusion(bf16[2,8,8,4]{3,2,1,0} %x, bf16[7,7,1,4]{3,2,1,0} %w), kind=kOutput, calls=%fused_dw
  %init = (s32[], f32[8,16]{1,0}) tuple(s32[] %c, f32[8,16]{1,0} %a)
  %while.1 = (s32[], f32[8,16]{1,0}) while((s32[], f32[8,16]{1,0}) %init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %gte.2 = f32[8,16]{1,0} get-tuple-element((s32[], f32[8,16]{1,0}) %while.1), index=1
  ROOT %dot.3 = f32[8,4]{1,0} dot(f32[8,16]{1,0} %gte.2, f32[16,4]{1,0} %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""


def test_hlo_bytes_by_category_counts_top_level_ops_and_loop_trips():
  # Hand-counted: the loop body's fusion reads + writes 8x16 f32 on each of 5 trips; the dot
  # reads 8x16 + 16x4 and writes 8x4 f32; the depthwise conv reads 2x8x8x4 + 7x7x4 bf16 and writes
  # 2x8x8x4 bf16. Fused intermediates, parameters, tuples and metadata text count nothing.
  assert aot.hlo_bytes_by_category(HLO) == {
      'elementwise fusion': 5 * 2 * 8 * 16 * 4,
      'matmul (dot)': (8 * 16 + 16 * 4 + 8 * 4) * 4,
      'depthwise/grouped convolution fusion': (2 * 2 * 8 * 8 * 4 + 7 * 7 * 4) * 2}


def test_roofline_bound_and_ceilings():
  r = aot.roofline(flops=2e12, bytes_accessed=1e9, peak_flops=1e15, bandwidth=1e12,
                   images_per_device=32)
  assert r['bound'] == 'compute' and r['roofline_seconds'] == 2e-3 and r['mfu_ceiling'] == 1.0
  r = aot.roofline(flops=1e12, bytes_accessed=4e9, peak_flops=1e15, bandwidth=1e12,
                   images_per_device=32, devices_per_chip=2)
  assert r['bound'] == 'memory' and r['roofline_seconds'] == 4e-3
  assert r['mfu_ceiling'] == pytest.approx(0.25)
  assert r['images_per_second_per_chip_ceiling'] == pytest.approx(2 * 32 / 4e-3)
