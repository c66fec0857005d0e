"""Segmentation task pieces without training: the loss vs PyTorch (mmseg's default reduction), the
poly schedule vs mmcv's formula, the demo scenes' invariants."""
import io

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

from mambaout_jax import optim
from mambaout_jax.data import digit_scenes
from mambaout_jax.tasks import segmentation


def test_loss_matches_torch_mmseg_default():
  rng = np.random.default_rng(0)
  decode = rng.normal(size=(2, 6, 5, 7)).astype(np.float32)     # stride-4 logits, NHWC
  aux = rng.normal(size=(2, 2, 2, 7)).astype(np.float32)        # stride-16
  labels = rng.integers(0, 7, size=(2, 24, 19))
  labels[rng.random(labels.shape) < 0.3] = 255

  def torch_ce(logits):  # mmseg: resize(bilinear, align_corners=False), CE 'none', mean over ALL
    up = torch.nn.functional.interpolate(torch.tensor(logits).permute(0, 3, 1, 2), size=(24, 19),
                                         mode='bilinear', align_corners=False)
    loss = torch.nn.functional.cross_entropy(up, torch.tensor(labels), reduction='none',
                                             ignore_index=255)
    return loss.mean().item()

  total, parts = segmentation.segmentation_loss((jnp.asarray(decode), jnp.asarray(aux)),
                                                jnp.asarray(labels), aux_weight=0.4)
  assert float(parts['loss_decode']) == pytest.approx(torch_ce(decode), rel=1e-5)
  assert float(parts['loss_aux']) == pytest.approx(torch_ce(aux), rel=1e-5)
  assert float(total) == pytest.approx(torch_ce(decode) + 0.4 * torch_ce(aux), rel=1e-5)


def test_poly_schedule_is_mmcv_poly_with_linear_warmup():
  sched = optim.poly_schedule(base_lr=1e-4, total_steps=160_000, warmup_steps=1500,
                              warmup_ratio=1e-6, power=1.0, min_lr=0.0)

  def mmcv(it):  # PolyLrUpdaterHook.get_lr, then LrUpdaterHook.get_warmup_lr('linear')
    regular = (1e-4 - 0.0) * (1 - it / 160_000) ** 1.0 + 0.0
    if it < 1500:
      k = (1 - it / 1500) * (1 - 1e-6)
      return regular * (1 - k)
    return regular

  for it in (0, 1, 750, 1499, 1500, 80_000, 159_999, 160_000):
    assert float(sched(it)) == pytest.approx(mmcv(it), rel=1e-5, abs=1e-14), it
  assert float(sched(0)) == pytest.approx(1e-10, rel=1e-4)


def _decode(png):
  return np.asarray(Image.open(io.BytesIO(png)))


def test_digit_scenes_are_deterministic_labelled_and_split_by_scan():
  train = digit_scenes.DigitScenes('train')
  val = digit_scenes.DigitScenes('validation')
  assert (len(train), len(val)) == (4096, 256)
  a, b = train[17], digit_scenes.DigitScenes('train')[17]
  assert a == b                                             # a pure function of (split, index)
  image, label = _decode(a['image']), _decode(a['label'])
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and label.shape == (64, 64)
  sizes = set()
  for i in range(12):
    image, label = _decode(val[i]['image']), _decode(val[i]['label'])
    assert image.shape[:2] == label.shape
    sizes.add(label.shape)
    values = set(np.unique(label).tolist())
    assert values <= set(range(11)) | {255} and 10 in values and values - {10, 255}
  assert len(sizes) > 6                                     # validation scenes vary in size
  # Disjoint handwriting: no validation scan is a training scan.
  train_scans = {s.tobytes() for s in digit_scenes._scans('train')[0]}
  assert not any(s.tobytes() in train_scans for s in digit_scenes._scans('validation')[0])
  with pytest.raises(ValueError, match='unknown split'):
    digit_scenes.DigitScenes('test')


def test_init_from_loads_the_classification_backbone_only(tmp_path):
  import jax
  import mambaout_jax as mo
  from flax import nnx
  from mambaout_jax import params as params_lib
  from mambaout_jax import recipes
  from mambaout_jax.tasks import get_task

  classifier = mo.create_model('mambaout_test', rngs=nnx.Rngs(7), num_classes=1000)
  source = params_lib.save_params(str(tmp_path / 'cls'), classifier, variant='mambaout_test',
                                  model_kwargs={'num_classes': 1000})
  src = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(classifier, nnx.Param)))
  config = recipes.segmentation_recipe('upernet_mambaout_test', drop_path_rate=0.0)
  config.init_from = source
  seg = mo.create_model('upernet_mambaout_test', rngs=nnx.Rngs(0), num_classes=11)
  fresh = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(seg, nnx.Param)))
  got = get_task(config).init_params_from(config, fresh)

  assert jax.tree.structure(got) == jax.tree.structure(fresh)
  np.testing.assert_array_equal(got['backbone']['stem']['conv1']['kernel'],
                                src['stem']['conv1']['kernel'])
  np.testing.assert_array_equal(got['backbone']['stages'][2]['blocks'][1]['fc1']['kernel'],
                                src['stages'][2]['blocks'][1]['fc1']['kernel'])
  assert not np.array_equal(got['backbone']['stem']['conv1']['kernel'],
                            fresh['backbone']['stem']['conv1']['kernel'])
  for fresh_part in ('decode_head', 'auxiliary_head'):   # the heads keep their initialisation
    jax.tree.map(np.testing.assert_array_equal, got[fresh_part], fresh[fresh_part])
  jax.tree.map(np.testing.assert_array_equal, got['backbone']['norm0'], fresh['backbone']['norm0'])


# ----------------------------------------------------------------------------------------------
# config.model keys reach the UperNet backbone


def test_dwconv_impl_reaches_the_upernet_backbone():
  """The trainer's build (train.build_model: the task's structural kwargs + the runtime ones)
  hands --config.model.dwconv_impl to the backbone's depthwise convs; both give the same logits."""
  import jax
  from flax import nnx
  from mambaout_jax import recipes, train
  from mambaout_jax.models import layers

  config = recipes.segmentation_recipe('upernet_mambaout_test', drop_path_rate=0.0)
  config.model.dtype = 'float32'
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 48, 3)), jnp.float32)
  impls, logits = [], []
  for impl in ('shift', 'conv'):
    config.model.dwconv_impl = impl
    model = train.build_model(config, 11)
    model.eval()
    impls.append({m.impl for _, m in nnx.iter_modules(model.backbone)
                  if isinstance(m, layers.DepthwiseConv2d)})
    logits.append(np.asarray(jax.jit(lambda m, a: m(a))(model, x)))
  assert impls == [{'shift'}, {'conv'}]
  np.testing.assert_allclose(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_structural_kwargs_include_the_backbones_scan_order():
  """scan_order (Mamba-block backbones) is recorded with the checkpoint's model_kwargs: the
  variant's default when unset, the config's when set, and it reaches every SSM of the backbone;
  on an SSM-free backbone a set scan_order is the one-line error."""
  from flax import nnx
  import mambaout_jax as mo
  from mambaout_jax import recipes
  from mambaout_jax.tasks import get_task

  config = recipes.segmentation_recipe('upernet_mamba_tiny', drop_path_rate=0.0)
  task = get_task(config)
  assert task.model_kwargs(config, 150) == {'num_classes': 150, 'scan_order': 'cross'}
  config.model.scan_order = 'raster'
  kwargs = task.model_kwargs(config, 150)
  assert kwargs == {'num_classes': 150, 'scan_order': 'raster'}
  model = nnx.eval_shape(lambda: mo.create_model('upernet_mamba_tiny', rngs=nnx.Rngs(0), **kwargs))
  orders = {m.scan_order for _, m in nnx.iter_modules(model.backbone) if hasattr(m, 'scan_order')}
  assert orders == {'raster'}
  directions = {len(m.directions) for _, m in nnx.iter_modules(model.backbone)
                if hasattr(m, 'directions')}
  assert directions == {1}  # 'cross' has 4 SSMs per block: the parameter tree follows the key
  config.model.name = 'upernet_mambaout_test'
  with pytest.raises(ValueError, match=r"^config.model.scan_order='raster' does not apply to "
                                       r"upernet_mambaout_test \(it has no SSM\); set "):
    task.model_kwargs(config, 11)
  config.model.scan_order = ''
  assert task.model_kwargs(config, 11) == {'num_classes': 11}
