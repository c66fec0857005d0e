"""notebooks/mambaout_jax_colab.ipynb, executed headless with papermill on CPU, fails on any cell error.

The kernel is this interpreter (a kernelspec written for the test and put first on JUPYTER_PATH, so
a `python3` kernel registered elsewhere on the machine cannot be picked up instead). Checkpoints
are made here: a timm random-init model saved as .safetensors (the notebook converts it), and a
params checkpoint of ours (what the trainer exports).
"""
import json
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'mambaout_jax_colab.ipynb')

papermill = pytest.importorskip('papermill')
nbformat = pytest.importorskip('nbformat')


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
  """A `python3` kernelspec that runs this very interpreter, found before any other."""
  spec_dir = tmp_path / 'jupyter' / 'kernels' / 'python3'
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'Python 3 (test)', 'language': 'python'}))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  monkeypatch.setenv('JUPYTER_PLATFORM_DIRS', '1')
  monkeypatch.setenv('PYTHONPATH', REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
  return tmp_path


def execute(workdir, **parameters):
  out = workdir / 'executed.ipynb'
  papermill.execute_notebook(NOTEBOOK, str(out), parameters=parameters, kernel_name='python3',
                             cwd=str(workdir), progress_bar=False, execution_timeout=600)
  return nbformat.read(str(out), as_version=4)


def stdout_of(cell):
  return ''.join(o.get('text', '') for o in cell.get('outputs', []) if o.output_type == 'stream')


def summary_of(nb):
  last = stdout_of(nb.cells[-1]).strip().splitlines()[-1]
  return json.loads(last)


def png_count(nb):
  return sum('image/png' in o.get('data', {}) for c in nb.cells for o in c.get('outputs', []))


def test_notebook_is_parameterised_for_papermill():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code[0].metadata.get('tags') == ['parameters']
  namespace = {}
  exec(code[0].source, namespace)  # the parameters cell is plain Python
  assert {'variant', 'checkpoint'} <= set(namespace)
  assert all(not c.get('outputs') for c in code), 'commit the notebook without outputs'


def test_notebook_converts_a_timm_checkpoint_and_matches_timm(kernel_env):
  import torch_reference as ref
  from PIL import Image
  from sklearn.datasets import load_sample_images
  from mambaout_jax import predict

  tm = ref.timm_model('mambaout_test', seed=1)
  src = kernel_env / 'test_mambaout.safetensors'
  ref.save_safetensors(ref.timm_state_dict(tm), str(src))

  nb = execute(kernel_env, variant='mambaout_test', checkpoint=str(src))
  s = summary_of(nb)
  # The kernel ran this venv's interpreter, and the install cell did nothing.
  assert os.path.realpath(s['python']) == os.path.realpath(sys.executable)
  assert any('already installed: nothing to do' in stdout_of(c) for c in nb.cells)
  assert s['variant'] == 'mambaout_test' and 'converted' in s['source']
  assert (kernel_env / 'checkpoints').is_dir()  # the conversion was written next to the notebook
  assert s['images'] == ['china.jpg', 'flower.jpg', 'drawing.png']
  assert s['stage_shapes'] == [[3, 56, 56, 16], [3, 28, 28, 32], [3, 14, 14, 48], [3, 7, 7, 64]]
  assert s['timm_rel_err'] is not None and s['timm_rel_err'] < 1e-4
  assert png_count(nb) == 2  # predictions, feature maps

  # Independently of the notebook: timm's own top-1 on the two bundled photos is the notebook's.
  photos = np.stack([predict.preprocess(Image.fromarray(im)) for im in load_sample_images().images])
  timm_top1 = ref.timm_logits(tm, photos).argmax(-1).tolist()
  assert [t[0] for t in s['top5'][:2]] == timm_top1
  printed = stdout_of(next(c for c in nb.cells if 'china.jpg\n' in stdout_of(c)))
  first = predict.class_name(s['top5'][0][0], 1000)
  assert printed.splitlines()[1].endswith(first)


def test_notebook_loads_a_params_checkpoint_of_ours(tmp_path, monkeypatch):
  """The load cell on a directory (our export format) calls load_pretrained: run in-process, since
  a second headless run of the whole notebook would double this file's time."""
  from flax import nnx
  import mambaout_jax as mo
  from mambaout_jax.params import flat_params, save_params

  model = mo.create_model('mambaout_test', rngs=nnx.Rngs(7), num_classes=10)
  save_params(str(tmp_path / 'export'), model, variant='mambaout_test',
              model_kwargs={'num_classes': 10})
  nb = nbformat.read(NOTEBOOK, as_version=4)
  cells = [c.source for c in nb.cells if c.cell_type == 'code']
  imports = next(c for c in cells if c.startswith('import json'))
  load = next(c for c in cells if 'def load_model' in c)
  monkeypatch.chdir(tmp_path)
  namespace = {'variant': 'mambaout_test', 'checkpoint': str(tmp_path / 'export'),
               'sys': sys, 'os': os}
  exec(imports, namespace)
  exec(load, namespace)
  assert namespace['source'] == f'params checkpoint {tmp_path / "export"}'
  loaded = flat_params(namespace['model'])
  for path, value in flat_params(model).items():
    np.testing.assert_array_equal(np.asarray(loaded[path]), np.asarray(value))
  assert namespace['model'].num_classes == 10
  assert not (tmp_path / 'checkpoints').exists()  # nothing converted, nothing downloaded


def test_notebook_loads_a_hub_name(tmp_path, monkeypatch):
  """The load cell on `hf-hub:OWNER/NAME` resolves it from the Hugging Face cache (laid out here,
  offline) and converts it on the fly: timm's logits come out."""
  import torch_reference as ref
  from hub_cache import lay_out_hub_cache

  tm = ref.timm_model('mambaout_test', seed=5, num_classes=12)
  ref.save_safetensors(ref.timm_state_dict(tm), str(tmp_path / 'model.safetensors'))
  lay_out_hub_cache(tmp_path / 'hf', 'someone/mambaout_test_demo', 'model.safetensors',
                    str(tmp_path / 'model.safetensors'))
  monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hf'))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  cells = [c.source for c in nb.cells if c.cell_type == 'code']
  imports = next(c for c in cells if c.startswith('import json'))
  load = next(c for c in cells if 'def load_model' in c)
  monkeypatch.chdir(tmp_path)
  namespace = {'variant': 'mambaout_test', 'checkpoint': 'hf-hub:someone/mambaout_test_demo',
               'sys': sys, 'os': os}
  exec(imports, namespace)
  exec(load, namespace)
  assert namespace['source'].startswith('hf-hub:someone/mambaout_test_demo (' + str(tmp_path / 'hf'))
  model = namespace['model']
  assert model.num_classes == 12
  x = np.random.RandomState(0).randn(1, 64, 64, 3).astype(np.float32)
  want = ref.timm_logits(tm, x)
  import jax
  with jax.default_matmul_precision('highest'):
    got = np.asarray(model(x))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
