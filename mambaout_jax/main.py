r"""Train, evaluate or export a model: the command-line entry point.

    python -m mambaout_jax.main --config=configs/demo.py --workdir=/tmp/mambaout_demo
    python -m mambaout_jax.main --config=configs/tiny.py --workdir=gs://bucket/tiny \
        --config.batch_size=1024 --config.grad_accum_steps=4
    python -m mambaout_jax.main --config=configs/demo.py --workdir=/tmp/mambaout_demo --mode=eval
    python -m mambaout_jax.main --config=configs/tiny.py --workdir=/tmp/tiny_eval --mode=eval \
        --config.init_from=hf-hub:timm/mambaout_tiny.in1k

A run resumes from the newest readable checkpoint in `--workdir`. On a multi-host TPU slice every
host runs the same command and `jax.distributed.initialize()` finds the others (JAX's own detection:
GCE metadata on TPU VMs, TPU_WORKER_HOSTNAMES on GKE); elsewhere pass
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (on CPU the hosts talk over gloo).

When one process of a multi-process run fails, every process ends within seconds with status 1, and
process 0's log names the failed process and its error (see `multihost.FailureWatch`).
"""
from __future__ import annotations

import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mambaout_jax import multihost

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Training config file (configs/*.py); override keys with --config.KEY=VALUE.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and exports.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'export'],
                          'train (resuming if possible), eval the latest checkpoint, or export its '
                          'params for mo.load_pretrained.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'HOST:PORT of process 0, for clusters JAX cannot auto-detect.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (with '
                                      '--coordinator_address).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (with --coordinator_address).')
flags.mark_flags_as_required(['config', 'workdir'])




def run(argv):
  """`main` under the multi-host failure policy: one process's error ends all of them."""
  watch = multihost.WATCH
  try:
    main(argv)
  except SystemExit as e:
    from mambaout_jax import train
    if not watch or e.code in (None, 0, train.PREEMPTED_EXIT_CODE):
      raise  # a preemption stops every process at the same step: a normal, synchronised exit
    watch[0].fail(str(e.code))
  except BaseException as e:  # pylint: disable=broad-except
    if not watch:
      raise
    logging.error('%s', traceback.format_exc())
    watch[0].fail(f'{type(e).__name__}: {e}')
  finally:
    if watch:
      watch[0].stop()


class _QuietLibraries:
  """absl log filter: drops INFO lines of Orbax / Grain internals (one line per file they write)."""

  def filter(self, record):
    quiet = any(f'/{lib}/' in record.pathname for lib in ('orbax', 'grain'))
    return record.levelno > 20 or not quiet


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; config keys are set as --config.KEY=V')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    multihost.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                     _PROCESS_ID.value)
  except ValueError as e:  # --coordinator_address without the others
    raise app.UsageError(str(e)) from e
  from mambaout_jax import train  # after jax.distributed, which must come before any jax work
  import jax
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  import tensorflow as tf  # already loaded by tfds; its file system serves gs:// paths
  from mambaout_jax import checkpoint, convert, data, pretrained
  from mambaout_jax.models import registry
  try:
    pretrained.apply_eval_overrides(_CONFIG.value, sys.argv, mode=_MODE.value)
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, mode=_MODE.value)
  except train.Preempted as e:
    logging.warning('stopped at step %s after saving a checkpoint; rerun the same command to '
                    'resume', e)
    sys.exit(train.PREEMPTED_EXIT_CODE)
  except (data.DatasetNotFoundError, checkpoint.CheckpointMismatchError,
          checkpoint.CheckpointUnreadableError, FloatingPointError, FileNotFoundError,
          convert.CheckpointFitError, registry.UnknownModelError) as e:  # user-fixable
    sys.exit(f'FATAL {type(e).__name__}: {e}')
  except (PermissionError, tf.errors.OpError) as e:  # the workdir (local or gs://) is not usable
    reason = str(e).strip().splitlines()[0] if str(e).strip() else ''
    sys.exit(f'FATAL {type(e).__name__}: cannot write to --workdir={_WORKDIR.value} ({reason}); '
             'choose a directory you can write to (for gs://: check the bucket name and your '
             'credentials, e.g. `gcloud auth application-default login`)')


def _config_keys(config, prefix='') -> list[str]:
  keys = []
  for k, v in config.items():
    keys += _config_keys(v, f'{prefix}{k}.') if hasattr(v, 'items') else [f'{prefix}{k}']
  return keys


def packaged_config(argv: list[str]) -> list[str]:
  """`--config=configs/NAME.py` that does not exist here -> the copy installed with the package
  (`pip install .` ships configs/ as mambaout_jax/configs), so the commands work from anywhere."""
  import os
  out = []
  for a in argv:
    if a.startswith('--config=configs/'):
      path, _, arg = a[len('--config='):].partition(':')
      packaged = os.path.join(os.path.dirname(os.path.abspath(__file__)), path)
      if not os.path.exists(path) and os.path.exists(packaged):
        a = f'--config={packaged}' + (f':{arg}' if arg else '')
    out.append(a)
  return out


def parse_flags(argv):
  """absl flag parsing, with a one-line error naming an unknown --config.KEY and the valid keys."""
  argv = packaged_config(argv)
  try:
    return flags.FLAGS(argv)
  except flags.IllegalFlagValueError as e:  # e.g. --config.batch_size=abc
    sys.exit(f'FATAL Flags parsing error: {str(e).splitlines()[0]}')
  except (AttributeError, KeyError) as e:
    paths = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
    if not paths:
      raise
    valid = _config_keys(_load_config_file(paths[-1]))
    bad = [a.split('=')[0][len('--config.'):] for a in argv if a.startswith('--config.')]
    bad = [k for k in bad if k not in valid] or [str(e)]
    sys.exit(f'FATAL Flags parsing error: unknown config key {bad[0]!r} in {paths[-1]}; '
             f'valid keys: {", ".join(valid)}')


def _load_config_file(path: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location('_mambaout_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


if __name__ == '__main__':
  app.run(run, flags_parser=parse_flags)
