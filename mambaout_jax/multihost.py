"""Multi-process runs: starting jax.distributed, and ending every process when one fails.

Kept apart from `main` (which defines absl flags at import) so that it can be imported and tested
next to the other command-line modules.
"""
from __future__ import annotations

import os
import sys
import threading
import time

from absl import logging


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """jax.distributed for multi-process runs: explicit flags, or JAX's own TPU cluster detection.
  A multi-process run also starts its `FailureWatch`."""
  import jax
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError('--coordinator_address needs --num_processes and --process_id')
    if jax.config.jax_platforms in (None, '', 'cpu') or 'cpu' in str(jax.config.jax_platforms):
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif detected_tpu_hosts() > 1:
    jax.distributed.initialize()
  if jax.process_count() > 1:
    WATCH.append(FailureWatch.start())


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


WATCH: list[FailureWatch] = []  # set by initialize_distributed in multi-process runs
