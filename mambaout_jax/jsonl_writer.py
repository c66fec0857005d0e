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


class JsonlWriter(interface.MetricWriter):

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    self._file = open(path, 'a')

  def write_scalars(self, step, scalars):
    record = {'step': int(step)}
    for key, value in scalars.items():
      value = np.asarray(value).item()
      record[key] = value if isinstance(value, (int, bool)) else float(value)
    self._file.write(json.dumps(record) + '\n')
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
    self._file.flush()
    os.fsync(self._file.fileno())

  def close(self):
    if not self._file.closed:
      self._file.close()


def read_metrics(path: str) -> list[dict]:
  """All records of a metrics.jsonl file, in file order."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
