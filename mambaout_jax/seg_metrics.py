"""Semantic-segmentation metrics as mmsegmentation's `IoUMetric` defines them.

Per class c, over the whole validation set (pixels labelled `IGNORE_INDEX` ignored):
  intersection[c] = #pixels with label c predicted c
  pred_area[c]    = #pixels predicted c (among non-ignored pixels)
  label_area[c]   = #pixels labelled c
  union[c]        = pred_area[c] + label_area[c] - intersection[c]
  IoU[c] = intersection[c] / union[c],  Acc[c] = intersection[c] / label_area[c]
  mIoU = nanmean(IoU), mAcc = nanmean(Acc), aAcc = sum(intersection) / sum(label_area),
all in percent as in mmseg's tables. A class that never occurs in the labels nor the predictions
(union 0) has IoU NaN and is left out of the mean, as mmseg does (np.nanmean).

`pixel_sums` runs inside jit and returns per-class SUMS (int32 vectors), masked by the example
mask, so adding them over batches, devices and hosts gives the exact totals on any layout.
`metrics_from_sums` turns the totals into the numbers; `per_class_table` / `write_report` write
the per-class table.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255


def pixel_sums(pred, label, mask, num_classes: int) -> dict:
  """Per-class intersection / prediction / label areas of a batch, inside jit.

  pred, label: int (B, H, W) at the label's resolution (padding pixels labelled IGNORE_INDEX);
  mask: bool (B,), False on padding rows. Labels outside [0, num_classes) count as ignored.
  Counts are int32: exact up to 2^31 pixels per class over the whole validation set.
  """
  label = label.astype(jnp.int32)
  pred = pred.astype(jnp.int32)
  valid = (label != IGNORE_INDEX) & (label >= 0) & (label < num_classes)
  valid = valid & mask.astype(bool).reshape((-1,) + (1,) * (label.ndim - 1))
  weight = valid.astype(jnp.int32).reshape(-1)
  label_flat = jnp.where(valid, label, 0).reshape(-1)
  pred_flat = jnp.clip(pred, 0, num_classes - 1).reshape(-1)
  hit = (pred.reshape(-1) == label_flat).astype(jnp.int32) * weight

  def count(index, w):
    return jnp.zeros((num_classes,), jnp.int32).at[index].add(w)

  return {'area_intersect': count(label_flat, hit), 'area_pred': count(pred_flat, weight),
          'area_label': count(label_flat, weight),
          'num_examples': jnp.sum(mask.astype(jnp.int32))}


def metrics_from_sums(sums: dict) -> dict[str, float]:
  """Host side: mIoU, mAcc, aAcc (percent) and num_examples from the accumulated sums."""
  per_class = per_class_metrics(sums)
  inter = np.asarray(sums['area_intersect'], np.float64)
  label = np.asarray(sums['area_label'], np.float64)
  with np.errstate(invalid='ignore', divide='ignore'):
    a_acc = inter.sum() / label.sum()
  return {'mIoU': _nanmean(per_class['IoU']) * 100, 'mAcc': _nanmean(per_class['Acc']) * 100,
          'aAcc': float(a_acc) * 100, 'num_examples': int(sums['num_examples'])}


def per_class_metrics(sums: dict) -> dict[str, np.ndarray]:
  """Per-class IoU and Acc (fractions; NaN where the class has zero union / zero label area)."""
  inter = np.asarray(sums['area_intersect'], np.float64)
  pred = np.asarray(sums['area_pred'], np.float64)
  label = np.asarray(sums['area_label'], np.float64)
  union = pred + label - inter
  with np.errstate(invalid='ignore', divide='ignore'):
    iou = np.where(union > 0, inter / union, np.nan)
    acc = np.where(label > 0, inter / label, np.nan)
  return {'IoU': iou, 'Acc': acc}


def _nanmean(x: np.ndarray) -> float:
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else float('nan')


def per_class_table(sums: dict, class_names) -> str:
  """A text table: class, IoU, Acc (percent; 'nan' for classes absent from labels and preds)."""
  m = per_class_metrics(sums)
  names = list(class_names) if class_names else [str(i) for i in range(len(m['IoU']))]
  width = max(5, max(len(n) for n in names))
  lines = [f'{"class":<{width}}  {"IoU":>6}  {"Acc":>6}']
  for name, iou, acc in zip(names, m['IoU'] * 100, m['Acc'] * 100):
    lines.append(f'{name:<{width}}  {iou:6.2f}  {acc:6.2f}')
  return '\n'.join(lines)


def write_report(sums: dict, class_names, *, workdir: str, step: int, prefix: str = 'eval') -> str:
  """Writes WORKDIR/<prefix>_per_class_<step>.json (per class IoU/Acc in percent, null for NaN,
  plus the raw areas); returns the path. Works for local paths and gs:// (etils.epath)."""
  from etils import epath
  m = per_class_metrics(sums)
  names = list(class_names) if class_names else [str(i) for i in range(len(m['IoU']))]
  rows = []
  for c, name in enumerate(names):
    rows.append({'class': name,
                 'IoU': None if np.isnan(m['IoU'][c]) else float(m['IoU'][c] * 100),
                 'Acc': None if np.isnan(m['Acc'][c]) else float(m['Acc'][c] * 100),
                 'area_intersect': int(sums['area_intersect'][c]),
                 'area_pred': int(sums['area_pred'][c]),
                 'area_label': int(sums['area_label'][c])})
  overall = {k: (None if isinstance(v, float) and np.isnan(v) else v)
             for k, v in metrics_from_sums(sums).items()}
  report = {'step': int(step), **overall, 'per_class': rows}
  path = epath.Path(workdir) / f'{prefix}_per_class_{int(step)}.json'
  path.write_text(json.dumps(report, indent=1, allow_nan=False) + '\n')
  return os.fspath(path)
