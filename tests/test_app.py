"""The web demo as a user meets it: a real server process on a free local port, a real HTTP client
(gradio_client), an image classified, a non-image refused with a message, a clean stop."""
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx
from PIL import Image

import mambaout_jax as mo
from mambaout_jax import params as params_lib, predict

gradio_client = pytest.importorskip('gradio_client')
pytest.importorskip('gradio')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def wait_for_server(proc, port, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f'the server exited with {proc.returncode}: {proc.stdout.read()}')
    try:
      with socket.create_connection(('127.0.0.1', port), timeout=1):
        return
    except OSError:
      time.sleep(1)
  raise AssertionError('the server did not start listening')


def test_demo_classifies_over_http_and_stops_cleanly(tmp_path):
  # A checkpoint with a decisive classifier (a random head gives near-ties in the top-5).
  model = mo.create_model('mambaout_test', rngs=nnx.Rngs(3))
  model.head.fc.kernel.set_value(model.head.fc.kernel.get_value() * 300)
  ckpt = params_lib.save_params(str(tmp_path / 'ckpt'), model, variant='mambaout_test')
  image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (150, 200, 3), np.uint8))
  image.save(tmp_path / 'photo.png')
  (tmp_path / 'notes.jpg').write_text('not an image')

  # The model's own prediction, computed here without the app.
  loaded = mo.load_pretrained('mambaout_test', ckpt)
  logits = np.asarray(loaded(predict.preprocess(predict.load_image(str(tmp_path / 'photo.png')))
                             [None]))
  want = [(predict.class_name(i, 1000), p) for i, p in predict.topk(logits, 5)[0]]
  assert want[0][1] - want[1][1] > 1e-3  # no near-tie decides the order

  port = free_port()
  env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp_path / 'gradio'), GRADIO_ANALYTICS_ENABLED='False')
  proc = subprocess.Popen(
      [sys.executable, '-m', 'mambaout_jax.app', '--variant=mambaout_test', f'--checkpoint={ckpt}',
       f'--port={port}'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  try:
    wait_for_server(proc, port)
    client = gradio_client.Client(f'http://127.0.0.1:{port}/', verbose=False)
    label, crop, gallery = client.predict(gradio_client.handle_file(str(tmp_path / 'photo.png')),
                                          api_name='/classify')
    got = [(c['label'], c['confidence']) for c in label['confidences']]
    assert [n for n, _ in got] == [n for n, _ in want]
    np.testing.assert_allclose([p for _, p in got], [p for _, p in want], rtol=1e-4)
    assert np.asarray(Image.open(crop)).shape == (224, 224, 3)
    assert [g['caption'].split(' (')[0] for g in gallery] == [
        'stage 0: 56x56x16', 'stage 1: 28x28x32', 'stage 2: 14x14x48', 'stage 3: 7x7x64']

    with pytest.raises(gradio_client.exceptions.AppError,
                       match=r'notes.jpg is not an image that can be read .*upload an image file'):
      client.predict(gradio_client.handle_file(str(tmp_path / 'notes.jpg')), api_name='/classify')
  finally:
    proc.send_signal(signal.SIGINT)
    try:
      out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
      proc.kill()
      raise
  assert proc.returncode == 0, out
  assert 'Traceback' not in out, out
  with pytest.raises(OSError):  # the port is closed
    socket.create_connection(('127.0.0.1', port), timeout=1).close()


def test_cli_defaults_are_safe_and_bad_checkpoints_are_one_line(tmp_path, monkeypatch):
  from mambaout_jax import app
  launched = {}

  class FakeDemo:
    def queue(self, **kwargs):
      return self

    def launch(self, **kwargs):
      launched.update(kwargs)

  monkeypatch.setattr(app, 'load_classifier', lambda *a, **k: None)
  monkeypatch.setattr(app, 'create_demo', lambda *a, **k: FakeDemo())
  assert app.main(['--variant=mambaout_test', '--checkpoint=x']) == 0
  assert launched['server_name'] == '127.0.0.1' and launched['share'] is False
  assert launched['max_file_size'] == '10mb'
  monkeypatch.undo()

  r = subprocess.run([sys.executable, '-m', 'mambaout_jax.app', '--variant=mambaout_test',
                      f'--checkpoint={tmp_path / "missing.pth"}'], capture_output=True, text=True)
  assert r.returncode == 1
  assert r.stderr.strip() == f'error: {tmp_path / "missing.pth"}: no such file or directory; give ' \
                             'a params checkpoint directory, a .pth/.safetensors file or ' \
                             'hf-hub:timm/<tag>'


def test_heatmap_scales_and_enlarges():
  from mambaout_jax import app
  h = app.heatmap(np.array([[0.0, 1.0], [2.0, 4.0]]), size=4)
  assert h.shape == (4, 4, 3) and h.dtype == np.uint8
  np.testing.assert_array_equal(h[0, 0], app._INFERNO[0])    # the minimum: first stop
  np.testing.assert_array_equal(h[3, 3], app._INFERNO[-1])   # the maximum: last stop
  np.testing.assert_array_equal(h[0, 0], h[1, 1])            # nearest-neighbour enlargement
