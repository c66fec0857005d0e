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
process 0's log names the failed process and its error (see `FailureWatch`).
"""
from __future__ import annotations

import os
import sys
import threading
import time
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

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


# ------------------------------------------------------------------------------ multi-host start

def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """jax.distributed for multi-process runs: explicit flags, or JAX's own TPU cluster detection.
  A multi-process run also starts its `FailureWatch`."""
  import jax
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise app.UsageError('--coordinator_address needs --num_processes and --process_id')
    if jax.config.jax_platforms in (None, '', 'cpu') or 'cpu' in str(jax.config.jax_platforms):
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif detected_tpu_hosts() > 1:
    jax.distributed.initialize()
  if jax.process_count() > 1:
    _WATCH.append(FailureWatch.start())


def detected_tpu_hosts() -> int:
  """Processes in the TPU slice(s) JAX's `jax.distributed.initialize()` would detect, else 0.

  Asks JAX's own cluster detectors in JAX's order (jax._src.clusters: `GceTpuCluster` for TPU VMs
  made with `gcloud compute tpus tpu-vm create` or queued resources, which reads the GCE metadata
  server's `agent-worker-number` and `worker-network-endpoints`; `GkeTpuCluster`, which reads
  TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES), times MEGASCALE_NUM_SLICES. Off a Cloud TPU VM
  nothing is queried. A single-host TPU (1) needs no distributed client.
  """
  from jax._src import clusters
  from jax._src.clusters import cloud_tpu_cluster
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if (issubclass(env, cloud_tpu_cluster.BaseTpuCluster) and not env.opt_in_only_method
        and env.is_env_present()):
      return env.get_process_count()
  return 0


# ------------------------------------------------------------------------------ multi-host failure

class FailureWatch:
  """Ends every process of a multi-process run, within seconds, when one of them fails.

  Without it, a process that raises runs into jax.distributed's shutdown barrier at exit (up to its
  300 s shutdown timeout, then an abort) while the others wait forever in a collective that needs
  it. Instead, a process whose `main` raises (or exits with an error) calls `fail(reason)`: it logs
  the reason, writes it to the jax.distributed coordination service's key-value store under
  `mambaout/failed/<process>` and leaves with `os._exit(1)`, skipping the shutdown barrier. Every
  process runs a daemon thread that reads that key-value directory every `POLL_S`: on another
  process's failure it logs "process K failed: <reason>" (so process 0's log says what went wrong on
  any host) and leaves with `os._exit(1)` too. Process 0 hosts the coordination service, so it
  leaves last: it waits (at most `WAIT_S`) until every other process has marked itself
  `mambaout/exiting/<process>`; a process that outlives the service is ended by JAX's client
  (an abort, also non-zero). A process killed outright (SIGKILL, out of memory) reports nothing:
  a peer that then fails (e.g. a collective reports the lost connection) reports its own error,
  and JAX's coordination service ends the rest (abort) once the dead process has missed heartbeats
  for 100 s (seen: 73 s after a SIGKILL, with process 0 waiting in a gloo collective).
  """
  POLL_S = 1.0
  WAIT_S = 10.0

  def __init__(self, client, process_index: int, process_count: int):
    self.client, self.me, self.count = client, process_index, process_count
    self.stop_event = threading.Event()
    self.thread = threading.Thread(target=self._watch, name='FailureWatch', daemon=True)

  @classmethod
  def start(cls):
    import jax
    from jax._src import distributed
    watch = cls(distributed.global_state.client, jax.process_index(), jax.process_count())
    watch.thread.start()
    return watch

  def stop(self):
    """Before a normal exit (which shuts the distributed client down)."""
    self.stop_event.set()
    self.thread.join()

  def fail(self, reason: str):
    """Reports this process's failure to the others and ends it with status 1. Never returns."""
    self.stop_event.set()
    logging.error('process %d failed: %s', self.me, reason)
    self._try(self.client.key_value_set, f'mambaout/failed/{self.me}', reason[-4000:])
    self._exit()

  def _watch(self):
    while not self.stop_event.wait(self.POLL_S):
      failed = self._try(self.client.key_value_dir_get, 'mambaout/failed/', quiet=True)
      if failed is None:  # the service is unreachable; if it is gone, JAX's client ends this process
        continue
      failed = [(k, v) for k, v in failed if k != f'mambaout/failed/{self.me}']
      if failed and not self.stop_event.is_set():
        for key, reason in sorted(failed):
          logging.error('process %s failed: %s', key.rsplit('/', 1)[1], reason)
        logging.error('stopping process %d because another process failed', self.me)
        self._exit()

  def _exit(self):
    if self.me == 0:  # leave last: the others need the coordination service to hear of the failure
      deadline = time.time() + self.WAIT_S
      while time.time() < deadline:
        exiting = self._try(self.client.key_value_dir_get, 'mambaout/exiting/') or []
        if len(exiting) >= self.count - 1:
          break
        time.sleep(0.1)
      time.sleep(0.5)  # their os._exit follows right after the mark
    else:
      self._try(self.client.key_value_set, f'mambaout/exiting/{self.me}', '1')
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access

  @staticmethod
  def _try(fn, *args, quiet=False):
    try:
      return fn(*args)
    except Exception as e:  # pylint: disable=broad-except
      if not quiet:
        logging.warning('coordination service: %s', e)
      return None


_WATCH: list[FailureWatch] = []  # set by initialize_distributed in multi-process runs


def run(argv):
  """`main` under the multi-host failure policy: one process's error ends all of them."""
  try:
    main(argv)
  except SystemExit as e:
    from mambaout_jax import train
    if not _WATCH or e.code in (None, 0, train.PREEMPTED_EXIT_CODE):
      raise  # a preemption stops every process at the same step: a normal, synchronised exit
    _WATCH[0].fail(str(e.code))
  except BaseException as e:  # pylint: disable=broad-except
    if not _WATCH:
      raise
    logging.error('%s', traceback.format_exc())
    _WATCH[0].fail(f'{type(e).__name__}: {e}')
  finally:
    if _WATCH:
      _WATCH[0].stop()


class _QuietLibraries:
  """absl log filter: drops INFO lines of Orbax / Grain internals (one line per file they write)."""

  def filter(self, record):
    quiet = any(f'/{lib}/' in record.pathname for lib in ('orbax', 'grain'))
    return record.levelno > 20 or not quiet


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; config keys are set as --config.KEY=V')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from mambaout_jax import train  # after jax.distributed, which must come before any jax work
  import jax
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  import tensorflow as tf  # already loaded by tfds; its file system serves gs:// paths
  from mambaout_jax import checkpoint, convert, data
  from mambaout_jax.models import registry
  try:
    apply_eval_overrides(_CONFIG.value, sys.argv, mode=_MODE.value)
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


def apply_eval_overrides(config, argv, *, mode: str):
  """--mode=eval of a timm Hub tag (--config.init_from=hf-hub:timm/<tag>) uses the eval transform
  of the tag's pretrained config (image size, crop_pct, interpolation), except for the keys the
  command line sets itself."""
  if mode != 'eval' or not config.get('init_from'):
    return
  from mambaout_jax import pretrained
  overrides = pretrained.eval_overrides(config.init_from)  # CheckpointFitError: bad Hub name
  explicit = {a.split('=')[0][len('--config.'):] for a in argv if a.startswith('--config.')}
  overrides = {k: v for k, v in overrides.items() if k not in explicit}
  if overrides:
    logging.info('evaluating %s with its pretrained eval transform: %s', config.init_from,
                 ', '.join(f'{k}={v}' for k, v in overrides.items()))
    config.update_from_flattened_dict(overrides)


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
