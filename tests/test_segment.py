"""Segmentation inference (whole / sliding window / multi-scale + flip) against a PyTorch
transcription of mmsegmentation's algorithms, and the `segment` CLI end to end."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

import jax
import jax.numpy as jnp
from mambaout_jax.tasks import seg_inference as si

K = 4


class Toy(nnx.Module):
  """Stride-4 'segmenter' whose logits depend on the whole input (a global context term), so
  every window of a sliding-window pass predicts differently."""

  def __init__(self, seed=0):
    rs = np.random.RandomState(seed)
    self.w = nnx.Param(jnp.asarray(rs.randn(3, K), jnp.float32))
    self.v = nnx.Param(jnp.asarray(rs.randn(3, K), jnp.float32))

  def __call__(self, x):
    b, h, w, c = x.shape
    p = x[:, :h // 4 * 4, :w // 4 * 4].reshape(b, h // 4, 4, w // 4, 4, c).mean((2, 4))
    return p @ self.w[...] + 3 * jnp.tanh(p.mean((1, 2), keepdims=True) @ self.v[...])


class ToyValid(Toy):
  """The Toy computed on each image's region of a padded canvas only (`valid_hw`), as UperNet."""
  output_stride = 4

  def __call__(self, x, valid_hw=None):
    b, h, w, c = x.shape
    p = x[:, :h // 4 * 4, :w // 4 * 4].reshape(b, h // 4, 4, w // 4, 4, c).mean((2, 4))
    v = jnp.asarray(valid_hw) // 4  # the toy floors (avg_pool2d)
    inside = ((jnp.arange(h // 4)[None, :, None] < v[:, 0, None, None]) &
              (jnp.arange(w // 4)[None, None, :] < v[:, 1, None, None]))[..., None]
    mean = (p * inside).sum((1, 2), keepdims=True) / inside.sum((1, 2), keepdims=True)
    return p @ self.w[...] + 3 * jnp.tanh(mean @ self.v[...])


def toy_torch(model, x):  # NCHW
  p = F.avg_pool2d(x, 4)
  w, v = (torch.tensor(np.asarray(a[...])) for a in (model.w, model.v))
  out = torch.einsum('bchw,ck->bkhw', p, w)
  return out + 3 * torch.tanh(torch.einsum('bc,ck->bk', p.mean((2, 3)), v))[:, :, None, None]


def up(x, size):
  return F.interpolate(x, size=tuple(int(s) for s in size), mode='bilinear', align_corners=False)


def mmseg_slide(model, img, crop, stride):
  """mmseg's slide_inference, transcribed (one unpadded image, NCHW)."""
  _, _, h_img, w_img = img.shape
  h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
  w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
  preds = img.new_zeros((1, K, h_img, w_img))
  count = img.new_zeros((1, 1, h_img, w_img))
  for h_idx in range(h_grids):
    for w_idx in range(w_grids):
      y1, x1 = h_idx * stride, w_idx * stride
      y2, x2 = min(y1 + crop, h_img), min(x1 + crop, w_img)
      y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
      crop_img = img[:, :, y1:y2, x1:x2]
      logit = up(toy_torch(model, crop_img), crop_img.shape[2:])
      preds += F.pad(logit, (x1, preds.shape[3] - x2, y1, preds.shape[2] - y2))
      count[:, :, y1:y2, x1:x2] += 1
  assert (count == 0).sum() == 0
  return preds / count


def mmseg_test(model, img, out_size, mode, ratios=(1.0,), flip=False, crop=32, stride=21):
  """mmseg's simple_test / aug_test: softmax at the original size, averaged over ratios/flips."""
  total = 0
  _, _, h, w = img.shape
  for r in ratios:
    x = img if r == 1.0 else up(img, (int(h * r + 0.5), int(w * r + 0.5)))
    for flipped in ((False, True) if flip else (False,)):
      xi = x.flip(3) if flipped else x
      logit = (up(toy_torch(model, xi), xi.shape[2:]) if mode == 'whole'
               else mmseg_slide(model, xi, crop, stride))
      prob = F.softmax(up(logit, out_size), dim=1)
      total = total + (prob.flip(3) if flipped else prob)
  return (total / (len(ratios) * (2 if flip else 1)))[0].permute(1, 2, 0).numpy()


SIZES = [(40, 75), (36, 50)]          # valid sizes on a 40x75 canvas, both >= the 32 crop
OUT = [(80, 150), (30, 47)]          # "original label" sizes


@pytest.fixture(scope='module')
def batch():
  rs = np.random.RandomState(0)
  canvas = np.zeros((2, 40, 75, 3), np.float32)
  imgs = [rs.randn(h, w, 3).astype(np.float32) for h, w in SIZES]
  for b, im in enumerate(imgs):
    canvas[b, :im.shape[0], :im.shape[1]] = im
  return canvas, imgs


def run(model, canvas, sizes=SIZES, out=OUT, **kw):
  return np.asarray(jax.jit(lambda c, s, o: si.predict_probs(
      model, c, image_sizes=s, out_sizes=o, out_shape=(80, 150), **kw))(
          canvas, np.array(sizes, np.int32), np.array(out, np.int32)))


@pytest.mark.parametrize('mode,ratios,flip', [
    ('slide', (1.0,), False), ('slide', (1.0, 1.25, 1.5), True), ('whole', (1.0,), False),
    ('whole', (0.5, 1.0, 1.75), True)])
def test_padded_batch_matches_mmseg_on_each_image(batch, mode, ratios, flip):
  # Slide: ratios keep both images >= the crop (smaller ones would see padding, documented).
  canvas, imgs = batch
  model = Toy()
  if mode == 'whole':  # whole-image inference is exact on an unpadded canvas: one image at a time
    got = [run(model, canvas[b:b + 1, :SIZES[b][0], :SIZES[b][1]], SIZES[b:b + 1], OUT[b:b + 1],
               mode=mode, scales=ratios, flip=flip) for b in range(2)]
  else:
    got = run(model, canvas, mode=mode, scales=ratios, flip=flip, crop=32, stride=21)
  for b, im in enumerate(imgs):
    want = mmseg_test(model, torch.from_numpy(im).permute(2, 0, 1)[None], OUT[b], mode, ratios,
                      flip)
    g = got[b][0] if mode == 'whole' else got[b]
    np.testing.assert_allclose(g[:OUT[b][0], :OUT[b][1]], want, rtol=1e-5, atol=1e-6)
    assert not g[OUT[b][0]:].any() and not g[:, OUT[b][1]:].any()


def test_whole_on_a_padded_batch_uses_valid_hw(batch):
  """A model taking valid_hw makes whole-image inference on a padded canvas equal mmseg's
  per-image run (sizes multiples of 4 here, where the toy's floor-pooling is exact)."""
  sizes, out = [(40, 76), (36, 52)], [(80, 150), (30, 47)]
  rs = np.random.RandomState(2)
  canvas = np.zeros((2, 44, 80, 3), np.float32)
  imgs = [rs.randn(h, w, 3).astype(np.float32) for h, w in sizes]
  for b, im in enumerate(imgs):
    canvas[b, :im.shape[0], :im.shape[1]] = im
  got = run(ToyValid(), canvas, sizes, out, mode='whole', scales=(1.0,), flip=True)
  for b, im in enumerate(imgs):
    want = mmseg_test(Toy(), torch.from_numpy(im).permute(2, 0, 1)[None], out[b], 'whole',
                      flip=True)
    np.testing.assert_allclose(got[b, :out[b][0], :out[b][1]], want, rtol=1e-5, atol=1e-6)


def test_slide_windows_and_count_normalisation(batch):
  """Raw slide logits (no resize back) equal mmseg's, count-normalised, on the valid region; the
  canvas is larger than both images, so its last windows exist for no image (skipped)."""
  canvas, imgs = batch
  canvas = np.pad(canvas, ((0, 0), (0, 30), (0, 45), (0, 0)))
  model = Toy(1)
  got = np.asarray(jax.jit(lambda c, s: si.slide_logits(model, c, crop=32, stride=21,
                                                        image_sizes=s))(
      canvas, np.array(SIZES, np.int32)))
  for b, im in enumerate(imgs):
    want = mmseg_slide(model, torch.from_numpy(im).permute(2, 0, 1)[None], 32, 21)
    h, w = SIZES[b]
    np.testing.assert_allclose(got[b, :h, :w], want[0].permute(1, 2, 0).numpy(), rtol=1e-5,
                               atol=1e-6)


def test_labels_are_the_argmax_and_minus_one_outside(batch):
  canvas, _ = batch
  model = Toy()
  kw = dict(image_sizes=np.array(SIZES, np.int32), out_sizes=np.array(OUT, np.int32),
            out_shape=(80, 150), mode='slide', crop=32, stride=21)
  probs = np.asarray(jax.jit(lambda c: si.predict_probs(model, c, **kw))(canvas))
  labels = np.asarray(jax.jit(lambda c: si.predict_labels(model, c, **kw))(canvas))
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(labels[1, :30, :47], probs[1, :30, :47].argmax(-1))
  assert (labels[1, 30:] == -1).all() and (labels[1, :, 47:] == -1).all()


def test_predict_reads_the_eval_batch_and_config(batch):
  import ml_collections
  canvas, _ = batch
  config = ml_collections.ConfigDict({'seg': {
      'inference': 'slide', 'slide_crop': 32, 'slide_stride': 21, 'eval_scales': (1.0,),
      'eval_flip': False}})
  eval_batch = {'image': canvas, 'image_hw': np.array(SIZES, np.int32),
                'label': np.full((2, 80, 150), 255, np.int32), 'label_hw': np.array(OUT, np.int32)}
  got = jax.jit(lambda b: si.predict(Toy(), b, config))(eval_batch)
  want = jax.jit(lambda c, s, o: si.predict_labels(
      Toy(), c, mode='slide', crop=32, stride=21, image_sizes=s, out_sizes=o,
      out_shape=(80, 150)))(canvas, eval_batch['image_hw'], eval_batch['label_hw'])
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bad_mode_is_rejected():
  with pytest.raises(ValueError, match="choose 'whole' or 'slide'"):
    si.predict_probs(Toy(), jnp.zeros((1, 8, 8, 3)), mode='sliding')


# ----------------------------------------------------------------------------------------------
# The segment CLI, end to end on a tiny checkpoint.

def _write_checkpoint(path, model, with_stats=True):
  from mambaout_jax import params as params_lib
  flat = params_lib.flat_params(model)
  if with_stats:
    flat.update({k: v.get_value() for k, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))})
  params_lib.save_params(str(path), flat, variant='upernet_mambaout_test',
                         model_kwargs={'num_classes': 5})


def test_segment_cli_writes_label_maps_and_overlays(tmp_path):
  import subprocess
  import sys
  from PIL import Image
  from mambaout_jax import params as params_lib
  from mambaout_jax import segment
  from test_upernet import randomize
  model = randomize(params_lib.build_uninitialised('upernet_mambaout_test', num_classes=5), seed=3)
  _write_checkpoint(tmp_path / 'ckpt', model)
  rs = np.random.RandomState(0)
  images = {'a.jpg': rs.randint(0, 256, (45, 70, 3), np.uint8),
            'b.png': rs.randint(0, 256, (60, 40), np.uint8)}  # greyscale: converted to RGB
  for name, arr in images.items():
    Image.fromarray(arr).save(tmp_path / name)
  (tmp_path / 'bad.jpg').write_text('not an image')
  files = [str(tmp_path / n) for n in ('a.jpg', 'bad.jpg', 'b.png', 'missing.png')]
  out = subprocess.run([sys.executable, '-m', 'mambaout_jax.segment',
                        '--variant=upernet_mambaout_test', f'--checkpoint={tmp_path / "ckpt"}',
                        f'--out={tmp_path / "out"}', '--mode=slide', '--crop=32', '--stride=21',
                        '--scale=64,32', *files], capture_output=True, text=True)
  assert out.returncode == 1, out.stderr
  errors = [line for line in out.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 2 and 'bad.jpg' in errors[0] and 'missing.png' in errors[1], out.stderr
  model.eval()
  for name, arr in images.items():
    stem = name.split('.')[0]
    labels = np.asarray(Image.open(tmp_path / 'out' / f'{stem}.png'))
    overlay = Image.open(tmp_path / 'out' / f'{stem}_overlay.png')
    assert labels.dtype == np.uint8 and labels.shape == arr.shape[:2]
    assert overlay.mode == 'RGB' and overlay.size == (arr.shape[1], arr.shape[0])
    rgb = np.asarray(Image.open(tmp_path / name).convert('RGB'))
    x = segment.preprocess(rgb, (64, 32))
    assert x.shape[:2] == {'a': (32, 50), 'b': (48, 32)}[stem]  # keep-ratio eval resize
    predict = nnx.jit(lambda m, x, shape=arr.shape[:2]: si.predict_labels(
        m, x, mode='slide', crop=32, stride=21, out_sizes=np.array([shape]), out_shape=shape))
    want = predict(model, x[None])[0]
    np.testing.assert_array_equal(labels, np.asarray(want))
    assert len(np.unique(labels)) > 1


def test_segment_refuses_a_checkpoint_without_batchnorm_statistics(tmp_path, capsys):
  from mambaout_jax import params as params_lib
  from mambaout_jax import segment
  from test_upernet import randomize
  model = randomize(params_lib.build_uninitialised('upernet_mambaout_test', num_classes=5))
  _write_checkpoint(tmp_path / 'ckpt', model, with_stats=False)
  assert segment.main(['--variant=upernet_mambaout_test', f'--checkpoint={tmp_path / "ckpt"}',
                       f'--out={tmp_path / "out"}', 'x.png']) == 1
  assert 'no BatchNorm statistics' in capsys.readouterr().err
