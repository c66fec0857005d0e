"""`hf-hub:timm/<tag>` sources, offline: a huggingface_hub cache laid out by the test (the layout
`hf download` leaves) holds a timm-layout mambaout_femto checkpoint with random weights."""
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from mambaout_jax import params as params_lib, pretrained

import torch_reference as ref
from hub_cache import lay_out_hub_cache

TAG = 'hf-hub:timm/mambaout_femto.in1k'


@pytest.fixture(scope='module')
def hub_cache(tmp_path_factory):
  root = tmp_path_factory.mktemp('hub')
  sd = ref.timm_state_dict(ref.timm_model('mambaout_femto', seed=4))
  src = str(root / 'model.safetensors')
  ref.save_safetensors(sd, src)
  lay_out_hub_cache(root / 'cache', 'timm/mambaout_femto.in1k', 'model.safetensors', src)
  return root / 'cache', sd


@pytest.fixture
def offline(hub_cache, monkeypatch):
  monkeypatch.setenv('HF_HUB_CACHE', str(hub_cache[0]))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  return hub_cache


def femto_params():
  model = params_lib.build_uninitialised('mambaout_femto')  # shapes only: nothing to compute
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def assert_is_state_dict(flat, sd):
  from mambaout_jax.convert import to_torch_layout, torch_key
  assert len(flat) == len(sd)
  for path, value in flat.items():
    np.testing.assert_array_equal(to_torch_layout(np.asarray(value)), sd[torch_key(path)])


def test_hub_tag_resolves_from_the_cache_offline(offline):
  _, sd = offline
  got = pretrained.init_params(TAG, femto_params(), variant='mambaout_femto')
  assert_is_state_dict(params_lib.flatten(got), sd)


def test_cache_first_without_offline_mode(hub_cache, monkeypatch):
  """A cached file is used without contacting the Hub (a download attempt would fail here)."""
  import huggingface_hub
  monkeypatch.setenv('HF_HUB_CACHE', str(hub_cache[0]))
  monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)

  def no_network(*args, **kwargs):
    raise AssertionError('the Hub was contacted for a cached file')
  monkeypatch.setattr(huggingface_hub, 'hf_hub_download', no_network)
  path = pretrained.hub_file(TAG)
  assert path.startswith(str(hub_cache[0])) and path.endswith('model.safetensors')


def test_not_cached_is_one_line(offline, monkeypatch):
  with pytest.raises(FileNotFoundError) as e:
    pretrained.hub_file('hf-hub:timm/mambaout_kobe.in1k')
  msg = str(e.value)
  assert '\n' not in msg
  assert msg.startswith('hf-hub:timm/mambaout_kobe.in1k: model.safetensors is not in the Hugging '
                        f'Face cache {offline[0]} and HF_HUB_OFFLINE=1 forbids a download')
  assert '`hf download timm/mambaout_kobe.in1k model.safetensors' in msg

  # Online but the Hub unreachable: huggingface_hub's error becomes one line, same advice.
  import huggingface_hub
  from huggingface_hub import errors
  monkeypatch.delenv('HF_HUB_OFFLINE')

  def unreachable(*args, **kwargs):
    raise errors.LocalEntryNotFoundError('An error happened while trying to locate the file on '
                                         'the Hub\nand we cannot find it in the local cache.')
  monkeypatch.setattr(huggingface_hub, 'hf_hub_download', unreachable)
  with pytest.raises(FileNotFoundError, match='not in the Hugging Face cache .* and the Hub is not '
                                              'reachable .*; download it where') as e:
    pretrained.hub_file('hf-hub:timm/mambaout_kobe.in1k')
  assert '\n' not in str(e.value)


def test_hub_tag_of_another_variant_or_unknown_tag_is_refused(offline):
  with pytest.raises(ValueError, match='holds mambaout_femto weights, but the model is '
                                       'mambaout_kobe'):
    pretrained.init_params(TAG, {}, variant='mambaout_kobe')
  with pytest.raises(ValueError, match='timm has no MambaOut weights named'):
    pretrained.init_params('hf-hub:timm/mambaout_femto.in21k', {}, variant='mambaout_femto')
  with pytest.raises(ValueError, match='hf-hub:OWNER/NAME'):
    pretrained.hub_file('hf-hub:mambaout_femto')


def test_convert_cli_takes_a_hub_tag_offline(offline, tmp_path):
  cache, sd = offline
  env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE='1')
  out = tmp_path / 'femto'
  r = subprocess.run([sys.executable, '-m', 'mambaout_jax.convert', '--variant=mambaout_femto',
                      f'--src={TAG}', f'--out={out}'], capture_output=True, text=True, env=env)
  assert r.returncode == 0, r.stderr
  flat, meta = params_lib.read_params(str(out))
  assert meta['source'] == TAG
  assert_is_state_dict(flat, sd)

  r = subprocess.run([sys.executable, '-m', 'mambaout_jax.convert', '--variant=mambaout_tiny',
                      '--src=hf-hub:timm/mambaout_tiny.in1k', f'--out={tmp_path / "t"}'],
                     capture_output=True, text=True, env=env)
  assert r.returncode == 1
  assert r.stderr.startswith('error: hf-hub:timm/mambaout_tiny.in1k: model.safetensors is not in '
                             'the Hugging Face cache')
  assert len(r.stderr.strip().splitlines()) == 1
