"""pyproject.toml: `pip install` of the package works, and the installed copy imports and runs its
CLIs (with their bundled configs and class names) from a directory that is not the checkout."""
import os
import shutil
import subprocess
import sys
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pyproject():
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    return tomllib.load(f)


def test_every_package_directory_is_listed():
  tool = pyproject()['tool']['setuptools']
  dirs = {'mambaout_jax': 'mambaout_jax', 'configs': 'mambaout_jax.configs'}
  found = set()
  for top, name in dirs.items():
    for root, subdirs, files in os.walk(os.path.join(REPO, top)):
      subdirs[:] = [d for d in subdirs if d != '__pycache__']
      if any(f.endswith('.py') for f in files):
        rel = os.path.relpath(root, os.path.join(REPO, top))
        found.add(name if rel == '.' else name + '.' + rel.replace(os.sep, '.'))
  assert found == set(tool['packages'])
  assert tool['package-dir'] == {'mambaout_jax.configs': 'configs'}
  extras = pyproject()['project']['optional-dependencies']
  assert {'tpu', 'demo', 'dev'} <= set(extras)
  assert not any(d.startswith('gradio') for d in pyproject()['project']['dependencies'])


def test_installed_copy_runs_from_another_directory(tmp_path):
  src = tmp_path / 'src'  # a copy, so the build leaves nothing in the checkout
  src.mkdir()
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(REPO, name), src / name)
  for name in ('mambaout_jax', 'configs'):
    shutil.copytree(os.path.join(REPO, name), src / name,
                    ignore=shutil.ignore_patterns('__pycache__'))
  site = tmp_path / 'site'
  r = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps',
                      '--no-build-isolation', '--target', str(site), str(src)],
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr

  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env['PYTHONPATH'] = str(site)

  def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=elsewhere)

  r = run('-c', 'import mambaout_jax as mo, os\n'
                'from mambaout_jax import main, predict\n'
                'print(mo.__file__)\n'
                'print(len(predict.imagenet_classes()))\n'
                'print(main.packaged_config(["--config=configs/demo.py"])[0])\n'
                'print("mambaout_femto" in mo.list_models())')
  assert r.returncode == 0, r.stderr
  module, classes, config, femto = r.stdout.split()
  assert module == str(site / 'mambaout_jax' / '__init__.py')
  assert classes == '1000' and femto == 'True'
  assert config == f'--config={site / "mambaout_jax" / "configs" / "demo.py"}'

  r = run('-m', 'mambaout_jax.pretrained')
  assert r.returncode == 0, r.stderr
  assert '| `mambaout_tiny.in1k` | 1000 | 224 | 1.0 | bicubic | 82.742 |' in r.stdout

  # The trainer's CLI finds configs/demo.py in the installed package (an unknown key is then
  # reported against that file's keys, before any training).
  r = run('-m', 'mambaout_jax.main', '--config=configs/demo.py', f'--workdir={tmp_path / "w"}',
          '--config.no_such_key=1')
  assert r.returncode == 1
  assert "FATAL Flags parsing error: unknown config key 'no_such_key' in " \
         f"{site / 'mambaout_jax' / 'configs' / 'demo.py'}" in r.stderr
