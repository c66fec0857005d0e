"""Profile of the segmentation models: the paper's Table 3 (params / MACs of UperNet at 512x2048)
and the MAC count against PyTorch's flop counter on the reference implementation."""
import json
import subprocess
import sys

import pytest
import torch

from mambaout_jax import profile

from test_upernet import TUperNet

TABLE3 = {  # params (M), MACs (G) at 512x2048, as printed in the paper's Table 3
    'upernet_mambaout_tiny': (54, 938), 'upernet_mambaout_small': (76, 1032),
    'upernet_mambaout_base': (112, 1178)}


@pytest.mark.parametrize('variant', sorted(TABLE3))
def test_profile_matches_paper_table3(variant):
  r = profile.profile(variant, '512x2048')
  params, macs = TABLE3[variant]
  print(f'\n{variant}: {r["params"] / 1e6:.2f}M params (paper {params}M), '
        f'{r["macs"] / 1e9:.1f}G MACs (paper {macs}G)')
  assert abs(r['params'] / 1e6 - params) / params < 0.02
  assert abs(r['macs'] / 1e9 - macs) / macs < 0.02
  # Tighter: the counts round to the printed values (params to 1M, MACs to 1G).
  assert round(r['params'] / 1e6) == params and round(r['macs'] / 1e9) == macs
  # The convention: params include the auxiliary head, MACs leave it out; the other choices miss.
  assert round((r['params'] - r['aux_head_params']) / 1e6) != params
  assert round((r['macs'] + r['aux_head_macs']) / 1e9) != macs
  assert [s['tokens'] for s in r['stages']] == [65536, 16384, 4096, 1024]


def test_profile_counts_what_torch_flop_counter_counts():
  """MACs of backbone + decode head + aux head = PyTorch's count on the reference model / 2."""
  import timm
  from torch.utils.flop_counter import FlopCounterMode
  r = profile.profile('upernet_mambaout_test', '96x128', num_classes=7)
  tm = TUperNet(timm.create_model('test_mambaout'), (16, 32, 48, 64), 32, 16, 7).eval()
  with FlopCounterMode(display=False) as counter, torch.no_grad():
    tm(torch.zeros(1, 96, 128, 3))
  timm_head = sum(p.numel() for n, p in tm.named_parameters() if n.startswith('body.head.'))
  assert r['macs_matmul_conv'] + r['aux_head_macs'] == counter.get_total_flops() // 2
  assert r['params'] == sum(p.numel() for p in tm.parameters()) - timm_head


def test_profile_cli_resolution_and_json():
  out = subprocess.run([sys.executable, '-m', 'mambaout_jax.profile',
                        '--variant=upernet_mambaout_test', '--resolution=64x96', '--json'],
                       capture_output=True, text=True, check=True)
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r['resolution'] == '64x96' and r['params'] > 0 and r['macs'] > 0
  assert [(s['tokens'], s['width']) for s in r['stages']] == [
      (16 * 24, 16), (8 * 12, 32), (4 * 6, 48), (2 * 3, 64)]
  bad = subprocess.run([sys.executable, '-m', 'mambaout_jax.profile', '--variant=mambaout_test',
                        '--resolution=64x'], capture_output=True, text=True)
  assert bad.returncode == 1 and 'HEIGHTxWIDTH' in bad.stderr
