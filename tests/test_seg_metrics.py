"""The segmentation metric against a float64 NumPy reference (mmseg's IoUMetric, written here)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mambaout_jax import seg_metrics


def reference_metrics(preds, labels, num_classes, ignore_index=255):
  """mmseg's intersect_and_union per image + total_area_to_metrics, in float64, one image at a
  time (lists of differently sized maps)."""
  inter = np.zeros(num_classes, np.float64)
  union = np.zeros(num_classes, np.float64)
  area_label = np.zeros(num_classes, np.float64)
  for pred, label in zip(preds, labels):
    keep = label != ignore_index
    p, l = pred[keep].astype(np.float64), label[keep].astype(np.float64)
    i = p[p == l]
    ai = np.histogram(i, bins=num_classes, range=(0, num_classes - 1))[0]
    ap = np.histogram(p, bins=num_classes, range=(0, num_classes - 1))[0]
    al = np.histogram(l, bins=num_classes, range=(0, num_classes - 1))[0]
    inter += ai
    union += ap + al - ai
    area_label += al
  with np.errstate(invalid='ignore', divide='ignore'):
    iou = inter / union
    acc = inter / area_label
  return {'mIoU': np.nanmean(iou) * 100, 'mAcc': np.nanmean(acc) * 100,
          'aAcc': inter.sum() / area_label.sum() * 100, 'IoU': iou}


def random_maps(rng, num_images, num_classes, absent=(3, 7)):
  """Differently sized label maps with 255 pixels; classes `absent` never labelled, class 3 also
  never predicted (union 0 -> NaN), class 7 predicted (IoU 0)."""
  preds, labels = [], []
  for _ in range(num_images):
    h, w = rng.integers(5, 23, size=2)
    label = rng.integers(0, num_classes, size=(h, w))
    for a in absent:
      label[label == a] = (a + 1) % num_classes
    label[rng.random((h, w)) < 0.2] = 255
    pred = np.where(rng.random((h, w)) < 0.6, label, rng.integers(0, num_classes, size=(h, w)))
    pred[pred == 255] = 0
    pred[pred == 3] = 4
    preds.append(pred)
    labels.append(label)
  return preds, labels


def pad_batch(maps, fill, height, width):
  out = np.full((len(maps), height, width), fill, np.int32)
  for k, m in enumerate(maps):
    out[k, :m.shape[0], :m.shape[1]] = m
  return out


def test_hand_computed():
  # 2x3 image, 3 classes; one ignored pixel.  label: [[0, 0, 1], [2, 255, 1]]
  pred = np.array([[[0, 1, 1], [1, 2, 1]]])
  label = np.array([[[0, 0, 1], [2, 255, 1]]])
  sums = jax.device_get(seg_metrics.pixel_sums(pred, label, np.array([True]), 3))
  np.testing.assert_array_equal(sums['area_intersect'], [1, 2, 0])
  np.testing.assert_array_equal(sums['area_pred'], [1, 4, 0])
  np.testing.assert_array_equal(sums['area_label'], [2, 2, 1])
  m = seg_metrics.metrics_from_sums(sums)
  # IoU: 1/(1+2-1), 2/(4+2-2), 0/(0+1) -> mean 1/3; Acc: 1/2, 2/2, 0/1 -> 1/2; aAcc 3/5
  assert m['mIoU'] == pytest.approx(100 / 3, rel=1e-12)
  assert m['mAcc'] == pytest.approx(50.0, rel=1e-12)
  assert m['aAcc'] == pytest.approx(60.0, rel=1e-12)
  assert m['num_examples'] == 1


def test_matches_numpy_reference_over_batches_and_devices(tmp_path):
  num_classes, batch = 11, 8
  rng = np.random.default_rng(0)
  preds, labels = random_maps(rng, 29, num_classes)   # 29 images: the last batch has padding
  ref = reference_metrics(preds, labels, num_classes)
  assert np.isnan(ref['IoU'][3]) and ref['IoU'][7] == 0  # the test covers both cases

  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  fn = jax.jit(lambda p, l, m: seg_metrics.pixel_sums(p, l, m, num_classes),
               in_shardings=(sharded, sharded, sharded))
  total = None
  for start in range(0, 32, batch):
    chunk = slice(start, start + batch)
    p, l = preds[chunk], labels[chunk]
    n = len(p)
    # padding rows: garbage predictions, labels that would count if the mask were ignored
    p = p + [np.ones((4, 4), np.int64)] * (batch - n)
    l = l + [np.ones((4, 4), np.int64)] * (batch - n)
    mask = np.arange(batch) < n
    out = fn(pad_batch(p, 0, 24, 24), pad_batch(l, 255, 24, 24), mask)
    total = out if total is None else jax.tree.map(jnp.add, total, out)
  total = jax.device_get(total)
  got = seg_metrics.metrics_from_sums(total)
  assert got['num_examples'] == 29
  for key in ('mIoU', 'mAcc', 'aAcc'):
    assert got[key] == pytest.approx(ref[key], rel=1e-12), key
  np.testing.assert_allclose(seg_metrics.per_class_metrics(total)['IoU'], ref['IoU'],
                             rtol=1e-12, equal_nan=True)

  names = [f'c{i}' for i in range(num_classes)]
  table = seg_metrics.per_class_table(total, names)
  assert 'c3' in table.splitlines()[4] and 'nan' in table.splitlines()[4]
  path = seg_metrics.write_report(total, names, workdir=str(tmp_path), step=12)
  report = json.loads(open(path).read())
  assert report['step'] == 12 and report['per_class'][3]['IoU'] is None
  assert report['per_class'][5]['IoU'] == pytest.approx(ref['IoU'][5] * 100, rel=1e-12)
