"""Conversion CLI and its refusals: wrong variant, mis-shaped or unexpected keys, head resets."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import mambaout_jax as mo
from mambaout_jax import convert, params as params_lib

import torch_reference as ref


@pytest.fixture(scope='module')
def femto_sd():
  return ref.timm_state_dict(ref.timm_model('mambaout_femto'))


def run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'mambaout_jax.convert', *args],
                        capture_output=True, text=True)


def test_cli_converts_official_pth_and_model_loads(tmp_path, femto_sd):
  src = str(tmp_path / 'mambaout_femto.pth')
  ref.save_pth(ref.timm_to_official(femto_sd), src)
  out = str(tmp_path / 'femto')
  r = run_cli('--variant=mambaout_femto', f'--src={src}', f'--out={out}')
  assert r.returncode == 0, r.stderr
  params, meta = params_lib.read_params(out)
  assert meta['variant'] == 'mambaout_femto'
  np.testing.assert_array_equal(params[('stages', 2, 'blocks', 4, 'fc1', 'kernel')],
                                femto_sd['stages.2.blocks.4.fc1.weight'].T)
  np.testing.assert_array_equal(params[('stem', 'conv1', 'kernel')],
                                femto_sd['stem.conv1.weight'].transpose(2, 3, 1, 0))


def test_checkpoint_of_another_variant_is_refused(tmp_path, femto_sd):
  src = str(tmp_path / 'femto.safetensors')
  ref.save_safetensors(femto_sd, src)
  out = str(tmp_path / 'kobe')
  r = run_cli('--variant=mambaout_kobe', f'--src={src}', f'--out={out}')
  assert r.returncode == 1
  assert "missing key 'stages.2.blocks.9.conv.bias'" in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1
  assert not os.path.exists(out)  # nothing half-written

  with pytest.raises(ValueError, match=r"key 'stem.conv1.bias' has shape \(24,\) "
                                       r"but mambaout_tiny expects \(48,\)$"):
    convert.convert('mambaout_tiny', src, str(tmp_path / 'tiny'))


def test_unexpected_key_is_refused(tmp_path, femto_sd):
  sd = dict(femto_sd, **{'stages.0.blocks.0.extra.weight': np.zeros(3, np.float32)})
  src = str(tmp_path / 'x.safetensors')
  ref.save_safetensors(sd, src)
  with pytest.raises(ValueError, match="unexpected key 'stages.0.blocks.0.extra.weight'"):
    convert.convert('mambaout_femto', src, str(tmp_path / 'out'))


def test_head_reset_for_new_num_classes(tmp_path, femto_sd):
  src = str(tmp_path / 'femto.safetensors')
  ref.save_safetensors(femto_sd, src)
  with pytest.raises(ValueError, match='--reset_head'):
    convert.convert('mambaout_femto', src, str(tmp_path / 'a'), num_classes=10)
  out = convert.convert('mambaout_femto', src, str(tmp_path / 'b'), num_classes=10,
                        reset_head=True)
  model = mo.load_pretrained('mambaout_femto', out)
  assert model.num_classes == 10
  kernel = np.asarray(model.head.fc.kernel.get_value())
  assert kernel.shape == (1152, 10) and 0.01 < kernel.std() < 0.03  # fresh trunc-normal(0.02)
  np.testing.assert_array_equal(np.asarray(model.head.pre_logits.fc.kernel.get_value()),
                                femto_sd['head.pre_logits.fc.weight'].T)


def test_load_pretrained_refuses_wrong_variant(tmp_path):
  model = mo.create_model('mambaout_test')
  out = params_lib.save_params(str(tmp_path / 't'), model, variant='mambaout_test')
  with pytest.raises(ValueError, match="holds a mambaout_test checkpoint, not mambaout_femto"):
    mo.load_pretrained('mambaout_femto', out)
  with pytest.raises(FileNotFoundError, match='not a mambaout_jax params checkpoint'):
    mo.load_pretrained('mambaout_test', str(tmp_path))
  loaded = mo.load_pretrained('mambaout_test', out)
  for a, b in zip(jax.tree.leaves(params_lib.flat_params(model)),
                  jax.tree.leaves(params_lib.flat_params(loaded))):
    np.testing.assert_array_equal(a, b)
