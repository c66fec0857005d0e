"""Logit parity with timm for every MambaOut variant, through the real conversion path.

For each variant: a timm model with random weights -> its state dict written as timm's .safetensors
and (official variants) as the official repo's .pth layout -> `mambaout_jax.convert` -> 
`load_pretrained` -> our jitted logits equal timm's in float32 (relative max error < 1e-5). The four
small variants are compared at 224²; the larger ones at 64² (the same operations and parameters,
every stage still more than one position wide, a twelfth of the CPU time of 224²) and with each
stage cut to its first block or two (`LARGE_DEPTHS`, the same keyword to timm and to `convert`:
every block of a stage has the same parameter shapes and code), while
`test_large_variants_have_timms_depths_and_block_shapes` checks their full-size structure against
timm's model built on PyTorch's meta device (no memory, no init). The official
.pth layout is checked for femto, kobe and tiny (its key mapping is the same rule for every
official variant; `test_official_and_timm_layouts_give_identical_params` compares the two layouts
key by key); each variant's forward is compiled once, with the params as arguments, and reused
for its second layout.
"""
import os

import jax
import numpy as np
import pytest
from flax import nnx

import mambaout_jax as mo
from mambaout_jax import convert
from mambaout_jax.models.mambaout import VARIANTS

import torch_reference as ref

SMALL = ['mambaout_test', 'mambaout_femto', 'mambaout_kobe', 'mambaout_tiny']
LARGE = sorted(set(VARIANTS) - set(SMALL))
LARGE_DEPTHS = (1, 1, 2, 1)


def rel_err(a, b):
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


# One compiled forward per (model structure, input shape): the params are arguments, not constants.
_forward = jax.jit(lambda graphdef, state, x: nnx.merge(graphdef, state)(x), static_argnums=0)


def logits(model, images):
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, images))


def check_variant(variant, tmp_path, batch, size=224, official_layout=True, depths=None):
  model_kwargs = {} if depths is None else {'depths': depths}
  tm = ref.timm_model(variant, **model_kwargs)
  sd = ref.timm_state_dict(tm)
  images = np.random.RandomState(1).randn(batch, size, size, 3).astype(np.float32)
  want = ref.timm_logits(tm, images)
  del tm
  layouts = {'timm.safetensors': lambda p: ref.save_safetensors(sd, p)}
  if official_layout and variant in ref.OFFICIAL_VARIANTS:
    layouts['official.pth'] = lambda p: ref.save_pth(ref.timm_to_official(sd), p, wrap='model')
  errors = {}
  for fname, write in layouts.items():
    src = os.path.join(tmp_path, fname)
    write(src)
    out = os.path.join(tmp_path, fname + '.out')
    convert.convert(variant, src, out, model_kwargs=model_kwargs)
    os.remove(src)
    model = mo.load_pretrained(variant, out)
    got = logits(model, images)
    errors[fname] = rel_err(got, want)
    assert got.shape == want.shape
    assert errors[fname] < 1e-5, (variant, fname, errors[fname])
  print(f'\nparity {variant}: max relative logit error {errors}')
  return errors


@pytest.mark.parametrize('variant', SMALL)
def test_logits_match_timm(variant, tmp_path):
  check_variant(variant, tmp_path, batch=2)


@pytest.mark.slow
@pytest.mark.parametrize('variant', LARGE)
def test_logits_match_timm_large(variant, tmp_path):
  check_variant(variant, tmp_path, batch=1, size=64, official_layout=False, depths=LARGE_DEPTHS)


@pytest.mark.parametrize('variant', LARGE)
def test_large_variants_have_timms_depths_and_block_shapes(variant):
  """Full-size timm (meta device) vs our variant table: the same blocks per stage, and every
  parameter of the shortened model (which `convert` matched shape for shape above) has the shape of
  the full model's parameter of the same name, and vice versa for the blocks they share."""
  import re
  import timm
  import torch
  with torch.device('meta'):
    full = timm.create_model(ref.TIMM_NAMES[variant], pretrained=False)
    short = timm.create_model(ref.TIMM_NAMES[variant], pretrained=False, depths=LARGE_DEPTHS)
  assert [len(stage.blocks) for stage in full.stages] == list(VARIANTS[variant]['depths'])
  block = re.compile(r'^stages\.(\d+)\.blocks\.(\d+)\.')

  def shared(key):
    m = block.match(key)
    return m is None or int(m[2]) < LARGE_DEPTHS[int(m[1])]

  full_shapes = {k: tuple(v.shape) for k, v in full.state_dict().items() if shared(k)}
  short_shapes = {k: tuple(v.shape) for k, v in short.state_dict().items()}
  assert full_shapes == short_shapes


def test_official_and_timm_layouts_give_identical_params(tmp_path):
  sd = ref.timm_state_dict(ref.timm_model('mambaout_femto'))
  model = mo.create_model('mambaout_femto')
  a = convert.params_from_state_dict(sd, model, variant='mambaout_femto', source='timm')
  b = convert.params_from_state_dict(ref.timm_to_official(sd), model, variant='mambaout_femto',
                                     source='official')
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
