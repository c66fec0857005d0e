"""`DIR/metrics.jsonl`: a clu MetricWriter appending one JSON object per write_scalars call.

Each line is `{"step": N, "key": value, ...}` with floats written at full precision (Python's
repr), so two runs can be compared step by step. The file is append-only: a resumed run repeats
the steps after its checkpoint, and readers take the last line for a step.
"""
from __future__ import annotations

import json
import os

import numpy as np
from clu.metric_writers import interface
from etils import epath


class JsonlWriter(interface.MetricWriter):
  """Appends to a local file; on object stores (gs://...), which cannot append, the whole file is
  rewritten at every flush (metrics files stay small: one line per log step)."""

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._remote = '://' in path
    self._path.parent.mkdir(parents=True, exist_ok=True)
    if self._remote:
      self._lines = self._path.read_text().splitlines(keepends=True) if self._path.exists() else []
      self._file = None
    else:
      self._file = open(path, 'a')

  def write_scalars(self, step, scalars):
    record = {'step': int(step)}
    for key, value in scalars.items():
      value = np.asarray(value).item()
      record[key] = value if isinstance(value, (int, bool)) else float(value)
    line = json.dumps(record) + '\n'
    if self._remote:
      self._lines.append(line)
    else:
      self._file.write(line)
      self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    if self._remote:
      self._path.write_text(''.join(self._lines))
    else:
      self._file.flush()
      os.fsync(self._file.fileno())

  def close(self):
    self.flush()
    if self._file is not None and not self._file.closed:
      self._file.close()


def read_metrics(path: str) -> list[dict]:
  """All records of a metrics.jsonl file, in file order."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
