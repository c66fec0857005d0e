"""pretrained: init_params from every kind of source, checked against timm's own forward pass; the
classifier and variant refusals; the timm tag table against the installed timm."""
import os

import jax
import numpy as np
import pytest
from flax import nnx

import mambaout_jax as mo
from mambaout_jax import params as params_lib, pretrained

import torch_reference as ref


@pytest.fixture(scope='module')
def timm_test():
  """timm's test_mambaout with random weights (1000 classes), its state dict and an input batch."""
  tm = ref.timm_model('mambaout_test', seed=1)
  x = np.random.RandomState(0).randn(2, 64, 64, 3).astype(np.float32)
  return tm, ref.timm_state_dict(tm), x


def fresh(num_classes=1000, seed=0):
  model = mo.create_model('mambaout_test', rngs=nnx.Rngs(seed), num_classes=num_classes)
  return model, jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def with_params(model, params):
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  model.eval()
  return model


def logits(model, x):
  with jax.default_matmul_precision('highest'):
    return np.asarray(model(x))


@pytest.mark.parametrize('layout', ['timm.safetensors', 'official.pth', 'timm_wrapped.pth',
                                    'params_dir'])
def test_init_params_reproduces_timm_logits(tmp_path, timm_test, layout):
  tm, sd, x = timm_test
  if layout == 'timm.safetensors':
    source = str(tmp_path / 'model.safetensors')
    ref.save_safetensors(sd, source)
  elif layout == 'official.pth':
    source = str(tmp_path / 'official.pth')
    ref.save_pth(ref.timm_to_official(sd), source)
  elif layout == 'timm_wrapped.pth':
    source = str(tmp_path / 'ckpt.pth')
    ref.save_pth(sd, source, wrap='state_dict')
  else:
    ref.save_safetensors(sd, str(tmp_path / 'm.safetensors'))
    from mambaout_jax.convert import convert
    source = convert('mambaout_test', str(tmp_path / 'm.safetensors'), str(tmp_path / 'ckpt'))
  model, params = fresh()
  got = pretrained.init_params(source, params, variant='mambaout_test')
  assert jax.tree.structure(got) == jax.tree.structure(params)
  want = ref.timm_logits(tm, x)
  ours = logits(with_params(model, got), x)
  np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_head_of_another_size_needs_init_head_reset(tmp_path, timm_test):
  _, sd, _ = timm_test
  source = str(tmp_path / 'model.safetensors')
  ref.save_safetensors(sd, source)
  _, params = fresh(num_classes=10, seed=3)
  with pytest.raises(ValueError) as e:
    pretrained.init_params(source, params, variant='mambaout_test')
  msg = str(e.value)
  assert "key 'head.fc.bias' has shape (1000,) but mambaout_test expects (10,)" in msg
  assert '--config.init_head=reset' in msg and '\n' not in msg

  got = pretrained.init_params(source, params, variant='mambaout_test', init_head='reset')
  np.testing.assert_array_equal(got['head']['fc']['kernel'], params['head']['fc']['kernel'])
  np.testing.assert_array_equal(got['head']['fc']['bias'], params['head']['fc']['bias'])
  np.testing.assert_array_equal(got['head']['pre_logits']['fc']['kernel'],
                                sd['head.pre_logits.fc.weight'].T)
  np.testing.assert_array_equal(got['stages'][2]['blocks'][1]['conv']['kernel'],
                                sd['stages.2.blocks.1.conv.weight'].transpose(2, 3, 1, 0))

  # Same number of classes: 'reset' still loads the trained classifier (nothing to reset).
  _, params1000 = fresh()
  got = pretrained.init_params(source, params1000, variant='mambaout_test', init_head='reset')
  np.testing.assert_array_equal(got['head']['fc']['kernel'], sd['head.fc.weight'].T)


def test_backbone_only_drops_the_source_head(tmp_path, timm_test):
  """A dense-task backbone (features_only: no head, output norms norm0..3) from a classification
  checkpoint: every classification key loads, the output norms keep their fresh init."""
  _, sd, _ = timm_test
  source = str(tmp_path / 'model.safetensors')
  ref.save_safetensors(sd, source)
  model = mo.create_model('mambaout_test', rngs=nnx.Rngs(0), features_only=True)
  backbone = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert {'norm0', 'norm3'} <= set(backbone) and 'head' not in backbone
  for key in backbone['norm2']:  # distinguishable from any checkpoint value
    backbone['norm2'][key] = backbone['norm2'][key] + 0.5
  got = pretrained.init_params(source, backbone, variant='mambaout_test', backbone_only=True)
  assert jax.tree.structure(got) == jax.tree.structure(backbone)
  np.testing.assert_array_equal(got['norm2']['scale'], backbone['norm2']['scale'])
  np.testing.assert_array_equal(got['stem']['conv1']['kernel'],
                                sd['stem.conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(got['stages'][3]['blocks'][0]['fc2']['kernel'],
                                sd['stages.3.blocks.0.fc2.weight'].T)
  # Any other backbone key the source lacks is still refused.
  extra = dict(backbone, extra={'kernel': np.zeros((2, 2), np.float32)})
  with pytest.raises(ValueError, match="missing key 'extra.weight'"):
    pretrained.init_params(source, extra, variant='mambaout_test', backbone_only=True)


def test_mismatches_are_refused_in_one_line(tmp_path, timm_test):
  _, sd, _ = timm_test
  _, params = fresh()
  bad = dict(sd, **{'stages.0.blocks.0.extra.weight': np.zeros(3, np.float32)})
  src = str(tmp_path / 'extra.safetensors')
  ref.save_safetensors(bad, src)
  with pytest.raises(ValueError, match="unexpected key 'stages.0.blocks.0.extra.weight'"):
    pretrained.init_params(src, params, variant='mambaout_test', init_head='reset')

  femto_params = {'stem': params['stem']}  # a params dir of another variant
  out = params_lib.save_params(str(tmp_path / 'ckpt'), params_lib.flatten(
      jax.tree.map(np.asarray, params)), variant='mambaout_test')
  with pytest.raises(ValueError, match='holds a mambaout_test checkpoint, but the model is '
                                       'mambaout_femto; set --config.model.name=mambaout_test'):
    pretrained.init_params(out, femto_params, variant='mambaout_femto')
  with pytest.raises(ValueError, match="unexpected key 'stages.0.blocks.0.conv.bias'"):
    pretrained.init_params(out, femto_params, variant='mambaout_test')
  with pytest.raises(FileNotFoundError, match='no such file or directory'):
    pretrained.init_params(str(tmp_path / 'nope.pth'), params, variant='mambaout_test')
  with pytest.raises(ValueError, match="unknown init_head 'random'"):
    pretrained.init_params(out, params, variant='mambaout_test', init_head='random')
  # A training workdir instead of its export.
  os.rename(out, tmp_path / 'export')
  with pytest.raises(FileNotFoundError, match=f'pass its params export {tmp_path}/export$'):
    pretrained.init_params(str(tmp_path), params, variant='mambaout_test')


def test_load_builds_the_model_from_a_file_with_its_classes(tmp_path):
  tm = ref.timm_model('mambaout_test', seed=2, num_classes=7)
  src = str(tmp_path / 'm.safetensors')
  ref.save_safetensors(ref.timm_state_dict(tm), src)
  model = pretrained.load('mambaout_test', src)
  assert model.num_classes == 7
  x = np.random.RandomState(1).randn(1, 64, 64, 3).astype(np.float32)
  want = ref.timm_logits(tm, x)
  np.testing.assert_allclose(logits(model, x), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_tag_table_is_timms():
  """Every tag the installed timm lists for MambaOut, with its pretrained_cfg's eval transform."""
  import timm
  assert sorted(pretrained.TIMM_TAGS) == sorted(timm.list_pretrained('mambaout*'))
  for name, tag in pretrained.TIMM_TAGS.items():
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    assert cfg['hf_hub_id'] == f'timm/{name}'
    assert (tag.num_classes, tag.image_size, tag.crop_pct, tag.interpolation, tag.crop_mode,
            tag.test_image_size, tag.test_crop_pct) == (
                cfg['num_classes'], cfg['input_size'][-1], cfg['crop_pct'], cfg['interpolation'],
                cfg['crop_mode'], cfg['test_input_size'][-1], cfg.get('test_crop_pct')), name
    assert pretrained.tag_variant(name) in mo.list_models()
  assert pretrained.TIMM_TAGS['mambaout_base_plus_rw.sw_e150_in12k'].num_classes == 11821


def test_eval_overrides():
  assert pretrained.eval_overrides('hf-hub:timm/mambaout_tiny.in1k') == {
      'image_size': 224, 'aug.crop_pct': 1.0, 'aug.eval_interpolation': 'bicubic'}
  assert pretrained.eval_overrides('hf-hub:timm/mambaout_base_tall_rw.sw_e500_in1k')[
      'aug.crop_pct'] == 0.95
  assert pretrained.eval_overrides(
      'hf-hub:timm/mambaout_base_plus_rw.sw_e150_r384_in12k_ft_in1k')['image_size'] == 384
  assert pretrained.eval_overrides('/some/export') == {}
  with pytest.raises(ValueError, match="timm has no MambaOut weights named 'mambaout_tiny.in22k'"):
    pretrained.eval_overrides('hf-hub:timm/mambaout_tiny.in22k')
