"""The benchmarks' own logic: FLOPs counted from the jaxpr, the crossover and growth exponents of
benchmarks/long_sequence.py, and the cores-per-host arithmetic of benchmarks/input_pipeline.py."""
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'benchmarks'))

import input_pipeline  # noqa: E402
import long_sequence  # noqa: E402


def test_jaxpr_flops_counts_dots_convs_and_scan_trips():
  a, b = jnp.zeros((3, 5, 7)), jnp.zeros((3, 7, 11))
  assert long_sequence.flops(lambda a, b: jnp.einsum('bik,bkj->bij', a, b), a, b) == 2 * 3 * 5 * 7 * 11
  # Depthwise 7x7 'same' conv, 4 channels: 2 * out elements * 49 taps * 1 input channel per group.
  x, w = jnp.zeros((2, 8, 8, 4)), jnp.zeros((7, 7, 1, 4))
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=(
      'NHWC', 'HWIO', 'NHWC'), feature_group_count=4)
  assert long_sequence.flops(conv, x, w) == 2 * (2 * 8 * 8 * 4) * 49
  # A scan body (one multiply + one add on 6 elements) runs 10 times.
  scan = lambda h, xs: jax.lax.scan(lambda h, x: (h * 0.5 + x, None), h, xs)[0]
  assert long_sequence.flops(scan, jnp.zeros(6), jnp.zeros((10, 6))) == 10 * 2 * 6


def test_crossover_and_exponents_of_power_laws():
  tokens = [16, 64, 256, 1024]
  quad = [t ** 2 for t in tokens]
  lin = [100 * t for t in tokens]
  assert long_sequence.crossover(tokens, quad, lin) == pytest.approx(100)
  assert np.isnan(long_sequence.crossover(tokens, quad, [1e9 * t for t in tokens]))
  assert long_sequence.exponent(tokens, quad) == pytest.approx(2)
  assert long_sequence.exponent(tokens, lin) == pytest.approx(1)


def test_attention_block_crossover_is_near_6d_for_a_small_width():
  """The paper's L = 6D, measured on a D=32 ViT block: matmul FLOPs of softmax(QK^T)V (4 L^2 D)
  equal those of qkv, proj and the MLP (24 L D^2) at L = 6D = 192; softmax, LayerNorm and GELU
  add a few percent on either side."""
  # Token counts that are multiples of the sequential scan's chunk (64): no padding.
  rows = long_sequence.measure_blocks(32, [8, 16, 24, 32], memory=False)
  summary = long_sequence.summarize(32, rows)
  assert 0.9 * 192 < summary['attention_crossover_tokens'] < 1.1 * 192
  e = summary['flops_exponents']
  assert e['attention_core'] == pytest.approx(2, abs=0.02)
  for name in ('attention_rest', 'ssm', 'gated_cnn'):
    assert e[name] == pytest.approx(1, abs=0.02)


def test_cores_to_feed_a_host(tmp_path):
  path = tmp_path / 'roofline.jsonl'
  path.write_text(json.dumps({'model': 'm', 'device_kind': 'TPU v4', 'topology': 'v4:2x2x4',
                              'images_per_second_per_chip_ceiling': 1000.0}) + '\n')
  rates = input_pipeline.read_rates([str(path)], ['n@TPU v5 lite=500'])
  feed = input_pipeline.cores_to_feed(rates, img_per_s_per_core=200.0)
  assert [r['cores_needed'] for r in feed] == [4 * 1000 / 200, 4 * 500 / 200]
  assert feed[0]['fraction_of_host_vcpus'] == pytest.approx(20 / 240)
  with pytest.raises(SystemExit, match='no host size known'):
    input_pipeline.read_rates([], ['m@TPU v9=1'])
  with pytest.raises(SystemExit, match='expected MODEL@KIND'):
    input_pipeline.read_rates([], ['m=1'])
