"""Inputs users get wrong, tried systematically: each gets a one-line error naming the problem and the
fix, or a documented recovery, and no earlier work is lost. The README's "Bad input" table lists
the same rows (and the checkpoint rows, which tests/test_train.py and tests/test_train_resume.py
cover).

Images are checked in-process (the decoder every split and `predict` share); the command-line rows
run `python -m mambaout_jax.main` once each, all at the same time, in an existing workdir whose
files must be byte-identical afterwards.
"""
import io
import os
import struct
import subprocess
import sys
import time
import zlib

import ml_collections
import numpy as np
from PIL import Image
import pytest

from mambaout_jax import data
from mambaout_jax import predict
from mambaout_jax.data import sources
from mambaout_jax.data import transforms as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rgb(height=24, width=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encode(img, fmt, **kwargs):
  buffer = io.BytesIO()
  img.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _png(pixels, color_type, bit_depth=16, size=None):
  """A PNG written by hand: PIL cannot write 16-bit colour, nor claim a size it does not hold."""
  height, width = size or pixels.shape[:2]

  def chunk(kind, payload):
    return (struct.pack('>I', len(payload)) + kind + payload
            + struct.pack('>I', zlib.crc32(kind + payload)))

  rows = b''.join(b'\x00' + row.astype('>u2' if bit_depth == 16 else 'u1').tobytes()
                  for row in pixels)
  header = struct.pack('>IIBBBBB', width, height, bit_depth, color_type, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(rows))
          + chunk(b'IEND', b''))


def _decoded(payload):
  """What the pipelines see: the eval decode, as uint8 RGB."""
  return np.asarray(T.decode_rgb(payload))


# ----------------------------------------------------------------------------------------------
# Images that decode: every one must become the right 8-bit RGB picture.


def test_png_named_jpeg_decodes_by_content_not_extension(tmp_path):
  pixels = _rgb()
  path = tmp_path / 'n01440764_1.JPEG'
  path.write_bytes(_encode(Image.fromarray(pixels), 'PNG'))
  np.testing.assert_array_equal(_decoded(path.read_bytes()), pixels)
  np.testing.assert_array_equal(np.asarray(predict.load_image(str(path))), pixels)


def test_cmyk_jpeg_decodes_to_the_rgb_it_was_made_from():
  pixels = np.asarray(Image.fromarray(_rgb()).resize((64, 48), Image.BILINEAR))  # JPEG-friendly
  cmyk = _encode(Image.fromarray(pixels).convert('CMYK'), 'JPEG', quality=98)
  assert Image.open(io.BytesIO(cmyk)).mode == 'CMYK'
  error = np.abs(_decoded(cmyk).astype(int) - pixels)
  assert error.mean() < 4, error.mean()  # JPEG loss only; inverted CMYK would be ~128.


def test_16_bit_grey_png_is_scaled_not_clipped():
  grey = np.random.default_rng(1).integers(0, 65536, (24, 32)).astype(np.uint16)
  payload = _png(grey, color_type=0)
  assert Image.open(io.BytesIO(payload)).mode == 'I;16'
  # PIL's own convert('RGB') clips to 255: nearly every pixel white.
  assert (np.asarray(Image.open(io.BytesIO(payload)).convert('RGB')) == 255).mean() > 0.9
  np.testing.assert_array_equal(_decoded(payload), np.repeat((grey >> 8)[..., None], 3, -1))


@pytest.mark.parametrize('color_type,channels', [(2, 3), (6, 4)])
def test_16_bit_colour_png_keeps_the_high_byte(color_type, channels):
  pixels = np.random.default_rng(2).integers(0, 65536, (24, 32, channels)).astype(np.uint16)
  np.testing.assert_array_equal(_decoded(_png(pixels, color_type)), pixels[..., :3] >> 8)


def test_palette_with_transparency_decodes_to_its_palette_colours():
  palette = np.random.default_rng(3).integers(0, 256, (16, 3), dtype=np.uint8)
  indices = np.random.default_rng(4).integers(0, 16, (24, 32), dtype=np.uint8)
  img = Image.fromarray(indices, 'P')
  img.putpalette(palette.flatten().tolist())
  payload = _encode(img, 'PNG', transparency=bytes([0] * 8 + [255] * 248))  # Indices 0-7 clear.
  assert Image.open(io.BytesIO(payload)).mode == 'P'
  np.testing.assert_array_equal(_decoded(payload), palette[indices])


def test_grey_and_alpha_images_decode_to_rgb():
  pixels = _rgb()
  rgba = np.concatenate([pixels, np.full(pixels.shape[:2] + (1,), 7, np.uint8)], -1)
  np.testing.assert_array_equal(_decoded(_encode(Image.fromarray(rgba), 'PNG')), pixels)
  grey = pixels[..., 0]
  np.testing.assert_array_equal(_decoded(_encode(Image.fromarray(grey), 'PNG')),
                                np.repeat(grey[..., None], 3, -1))


# ----------------------------------------------------------------------------------------------
# Images that do not decode: a clear ImageDecodeError (training replaces the example, eval counts
# it in eval/num_undecodable: tests/test_data_pipeline.py), quickly and without allocating.

JPEG = _encode(Image.fromarray(_rgb(64, 64)), 'JPEG')
BAD_IMAGES = {
    'zero bytes': (b'', 'empty file'),
    'truncated JPEG': (JPEG[:int(len(JPEG) * 0.8)], 'truncated'),
    'JPEG header only': (JPEG[:200], 'Truncated|truncated'),
    'not an image': (b'<html>404 not found</html>', 'not an image format'),
    'decompression bomb': (_png(np.zeros((1, 1), np.uint8), 0, bit_depth=8, size=(60000, 60000)),
                           'decompression bomb'),
}


@pytest.mark.parametrize('name', sorted(BAD_IMAGES))
def test_undecodable_image_gets_a_one_line_decode_error(name):
  payload, message = BAD_IMAGES[name]
  for transform in (T.EvalTransform(size=16), lambda b: T.TrainTransform(size=16)(
      b, np.random.default_rng(0))):
    t0 = time.time()
    with pytest.raises(T.ImageDecodeError, match=message) as info:
      transform(payload)
    assert '\n' not in str(info.value)
    assert time.time() - t0 < 5  # A 3.6 G-pixel claim is refused from its header.


def test_float_image_is_refused_not_clipped():
  img = Image.fromarray(np.random.default_rng(0).random((8, 8)).astype(np.float32), 'F')
  with pytest.raises(T.ImageDecodeError, match='float'):
    T.decode_rgb(_encode(img, 'TIFF'))


# ----------------------------------------------------------------------------------------------
# Image folders


def _folder(root, layout):
  for relative, payload in layout.items():
    path = root / relative
    if payload is None:  # An empty directory.
      path.mkdir(parents=True)
    else:
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(payload)


def test_folder_dataset_ignores_non_image_and_hidden_files(tmp_path):
  jpeg = _encode(Image.fromarray(_rgb()), 'JPEG')
  _folder(tmp_path, {'train/cat/1.jpg': jpeg, 'train/cat/2.JPEG': jpeg, 'train/cat/notes.txt': b'x',
                     'train/cat/.DS_Store': b'\0', 'train/cat/._1.jpg': b'\0\5\26\7',
                     'train/dog/1.png': _encode(Image.fromarray(_rgb()), 'PNG'),
                     'train/dog/labels.csv': b'a,b', 'train/.ipynb_checkpoints/x.jpg': jpeg})
  source = sources.open_source(f'folder:{tmp_path}', 'train')
  assert source.class_names == ['cat', 'dog']
  assert [os.path.relpath(source.describe(i), tmp_path) for i in range(len(source))] == [
      'train/cat/1.jpg', 'train/cat/2.JPEG', 'train/dog/1.png']


def test_folder_dataset_with_an_empty_class_keeps_its_label_and_warns(tmp_path, caplog):
  jpeg = _encode(Image.fromarray(_rgb()), 'JPEG')
  _folder(tmp_path, {'train/a/1.jpg': jpeg, 'train/b/': None, 'train/c/1.jpg': jpeg,
                     'validation/a/1.jpg': jpeg, 'validation/c/1.jpg': jpeg})
  with caplog.at_level('WARNING'):
    train = sources.open_source(f'folder:{tmp_path}', 'train')
  assert train.num_classes == 3 and [train[i]['label'] for i in range(2)] == [0, 2]
  assert any('hold no images (b)' in r.getMessage() for r in caplog.records)
  validation = sources.open_source(f'folder:{tmp_path}', 'validation')
  assert [validation[i]['label'] for i in range(2)] == [0, 2]  # The same numbering.


def test_folder_split_with_a_class_the_training_split_lacks_is_refused(tmp_path):
  jpeg = _encode(Image.fromarray(_rgb()), 'JPEG')
  _folder(tmp_path, {'train/a/1.jpg': jpeg, 'validation/a/1.jpg': jpeg, 'validation/z/1.jpg': jpeg})
  with pytest.raises(ValueError, match=r"class directories that 'train' lacks \(z\)"):
    sources.open_source(f'folder:{tmp_path}', 'validation')


def test_folder_dataset_without_images_or_split(tmp_path):
  _folder(tmp_path, {'train/a/readme.txt': b'x'})
  with pytest.raises(data.DatasetNotFoundError, match='no images'):
    sources.open_source(f'folder:{tmp_path}', 'train')
  with pytest.raises(data.DatasetNotFoundError, match='validation.*does not exist'):
    sources.open_source(f'folder:{tmp_path}', 'validation')


def test_missing_tfds_dataset_names_the_preparation_command(tmp_path):
  config = ml_collections.ConfigDict(dict(dataset=dict(
      name='imagenet2012', data_dir=str(tmp_path), train_split='train', eval_split='validation')))
  with pytest.raises(data.DatasetNotFoundError,
                     match='python -m mambaout_jax.data.prepare --dataset=imagenet2012'):
    data.get_dataset_info(config)


# ----------------------------------------------------------------------------------------------
# The command line: one line starting with FATAL, no traceback, the workdir untouched.

CLI_ROWS = {
    'unknown config key': (['--config.nope=1'], "unknown config key 'nope'"),
    'wrong value type': (['--config.batch_size=abc'], 'batch_size'),
    'unknown variant': (['--config.model.name=mambaout_nope'], "unknown model 'mambaout_nope'"),
    'missing dataset': (['--config.dataset.name=imagenet2012', '--config.dataset.data_dir={tmp}'],
                        'python -m mambaout_jax.data.prepare --dataset=imagenet2012'),
    'missing folder dataset': (['--config.dataset.name=folder:{tmp}/nowhere'], 'does not exist'),
    # /sys is read-only even for root, where a chmod-ed directory would still be writable.
    'unwritable workdir': (['--workdir=/sys/mambaout_run'], '/sys/mambaout_run'),
    'gs:// workdir without access': (['--workdir=gs://mambaout-test-no-such-bucket/run'],
                                     'gs://mambaout-test-no-such-bucket/run'),
}
# No network in tests: GCS requests go to a closed local port, failing at once (with TF's default 10
# retries and exponential back-off such a run spends ~3.5 min before failing; README: Bad input).
OFFLINE_GCS = {'https_proxy': 'http://127.0.0.1:9', 'http_proxy': 'http://127.0.0.1:9',
               'NO_GCE_CHECK': 'true', 'GCS_RETRY_CONFIG_MAX_RETRIES': '0'}


@pytest.fixture(scope='module')
def cli_runs(tmp_path_factory):
  """Starts every row's command at once (they spend their time importing) and collects them."""
  tmp = tmp_path_factory.mktemp('cli')
  workdir = tmp / 'run'
  (workdir / 'checkpoints' / '100').mkdir(parents=True)
  (workdir / 'checkpoints' / '100' / 'sentinel').write_text('earlier work')
  (workdir / 'metrics.jsonl').write_text('{"step": 100, "train/loss": 1.5}\n')
  before = {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, **OFFLINE_GCS)
  procs = {}
  for name, (flags, _) in CLI_ROWS.items():
    flags = [f.format(tmp=tmp) for f in flags]
    if not any(f.startswith('--workdir=') for f in flags):
      flags.append(f'--workdir={workdir}')
    cmd = [sys.executable, '-m', 'mambaout_jax.main', '--config=configs/demo.py',
           f'--config.dataset.data_dir={tmp}/tfds', *flags]
    procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
  results = {name: (p.wait(timeout=600), p.stdout.read()) for name, p in procs.items()}
  return results, all(path.read_bytes() == content for path, content in before.items())


@pytest.mark.parametrize('name', list(CLI_ROWS))
def test_command_line_bad_input_gets_one_fatal_line(cli_runs, name):
  returncode, output = cli_runs[0][name]
  fatal = [line for line in output.splitlines() if line.startswith('FATAL')]
  assert returncode != 0
  assert 'Traceback' not in output, output[-2000:]
  assert len(fatal) == 1 and CLI_ROWS[name][1] in fatal[0], output[-2000:]


def test_command_line_bad_input_leaves_the_workdir_untouched(cli_runs):
  assert all(returncode != 0 for returncode, _ in cli_runs[0].values())
  assert cli_runs[1]  # Checkpoints and metrics.jsonl byte-identical.
