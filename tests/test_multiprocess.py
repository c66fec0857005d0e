"""Two local processes (jax.distributed over gloo, 2 CPU devices each), through the real entry point.

A failure on one process only (its copy of the validation data is missing, found at the first eval
while process 0 waits in the eval collective) ends both within seconds, with status 1, and process
0's log names process 1 and its error. Also: when main.py starts jax.distributed by itself (JAX's
TPU cluster detection, its inputs faked). Training in 2 processes, SIGTERM on both, and exact resume
on another process count are tested in test_resume_processes.py.
"""
import glob
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from mambaout_jax.data import sources
from test_train_resume import environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('multiprocess')
  return {name: root / name for name in ('data', 'cache')}


def start_two(workdir, data_dirs, cache, logs, steps, eval_every=10_000):
  """Starts processes 0 and 1 of one run; process i reads data_dirs[i] and logs to logs[i]."""
  port = free_port()
  env = environment(cache, devices=2)
  procs = []
  for i in range(2):
    cmd = [sys.executable, '-m', 'mambaout_jax.main', '--config=configs/demo.py',
           f'--workdir={workdir}', f'--config.dataset.data_dir={data_dirs[i]}',
           '--config.image_size=16', '--config.batch_size=32', '--config.eval_batch_size=120',
           '--config.model.dwconv_impl=conv',
           f'--config.total_steps={steps}', '--config.log_every_steps=1',
           '--config.checkpoint_every_steps=10000', f'--config.eval_every_steps={eval_every}',
           f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}']
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(logs[i], 'a'),
                                  stderr=subprocess.STDOUT))
  return procs


# ---------------------------------------------------------------------------------------------
# When main.py initialises jax.distributed by itself: JAX's own TPU cluster detection, with its
# inputs (the Cloud TPU VM flag, the GCE metadata server, environment variables) faked.

@pytest.fixture
def tpu_host(monkeypatch):
  """Returns set_up(on_tpu_vm, metadata, **env); records the metadata keys read in .queried."""
  from jax._src.clusters import cloud_tpu_cluster
  for var in ('TPU_SKIP_MDS_QUERY', 'TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES',
              'TPU_WORKER_ID', 'MEGASCALE_NUM_SLICES', 'MEGASCALE_SLICE_ID',
              'MEGASCALE_COORDINATOR_ADDRESS'):
    monkeypatch.delenv(var, raising=False)
  served = {}

  def get_metadata(key):  # the metadata server: 200 with the value, or 404
    set_up.queried.append(key)
    return (served[key], 200) if key in served else ('', 404)

  def set_up(on_tpu_vm, metadata=None, **env):
    monkeypatch.setattr(cloud_tpu_cluster, 'running_in_cloud_tpu_vm', on_tpu_vm)
    served.update(metadata or {})
    for k, v in env.items():
      monkeypatch.setenv(k, v)
  set_up.queried = []
  monkeypatch.setattr(cloud_tpu_cluster, 'get_metadata', get_metadata)
  return set_up


# What a worker of a 4-host slice made by `gcloud compute tpus tpu-vm create` serves (no
# TPU_WORKER_HOSTNAMES there); endpoints in the name:id:ip format.
GCE_WORKER = {'agent-worker-number': '2',
              'worker-network-endpoints': ','.join(f'w{i}:{i}:10.0.0.{i}' for i in range(4))}


@pytest.mark.parametrize('case, on_tpu_vm, metadata, env, hosts', [
    ('gcloud tpu-vm create, 4 hosts', True, GCE_WORKER, {}, 4),
    ('two slices of 4 hosts', True, GCE_WORKER, {'MEGASCALE_NUM_SLICES': '2'}, 8),
    ('single-host TPU VM', True, {'agent-worker-number': '0', 'worker-network-endpoints': 'w0'},
     {}, 1),
    ('GKE, 2 hosts', True, {}, {'TPU_WORKER_HOSTNAMES': 'h0,h1', 'TPU_WORKER_ID': '1'}, 2),
    ('not a TPU VM', False, GCE_WORKER, {'TPU_WORKER_HOSTNAMES': 'h0,h1'}, 0),
], ids=lambda x: x if isinstance(x, str) else '')
def test_detected_tpu_hosts_follow_jax_cluster_detection(tpu_host, case, on_tpu_vm, metadata, env,
                                                         hosts):
  from mambaout_jax import multihost
  tpu_host(on_tpu_vm, metadata, **env)
  assert multihost.detected_tpu_hosts() == hosts
  if not on_tpu_vm:
    assert tpu_host.queried == []  # off a TPU VM nothing asks the metadata server


@pytest.mark.parametrize('metadata, initialized', [(GCE_WORKER, True),
                                                   ({'agent-worker-number': '0',
                                                     'worker-network-endpoints': 'w0'}, False)])
def test_main_initializes_distributed_on_a_multi_host_tpu_vm(tpu_host, monkeypatch, metadata,
                                                             initialized):
  import jax
  from mambaout_jax import multihost
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **kw: calls.append((a, kw)))
  monkeypatch.setattr(jax, 'process_count', lambda: 1)  # (no FailureWatch without a real client)
  tpu_host(True, metadata)
  multihost.initialize_distributed()
  assert calls == ([((), {})] if initialized else [])  # JAX finds coordinator, count and id itself


def test_failure_on_one_process_ends_both_with_the_reason_in_process_0_log(dirs, tmp_path):
  """Process 1's copy of the dataset lacks the validation file: it fails at the first eval (step
  2) while process 0 waits for it in the eval collective."""
  sources.ensure_prepared('mambaout_digits', str(dirs['data']))
  partial = tmp_path / 'data_p1'
  shutil.copytree(dirs['data'], partial)
  missing = glob.glob(str(partial / '*' / '*' / '*validation*'))
  assert missing
  for path in missing:
    os.remove(path)

  logs = [tmp_path / f'p{i}.log' for i in range(2)]
  procs = start_two(tmp_path / 'run', [dirs['data'], partial], dirs['cache'], logs, steps=6,
                    eval_every=2)
  ended = {}
  deadline = time.time() + 900
  while len(ended) < 2 and time.time() < deadline:
    for i, p in enumerate(procs):
      if i not in ended and p.poll() is not None:
        ended[i] = (p.returncode, time.time())
    time.sleep(0.1)
  for p in procs:
    if p.poll() is None:
      p.kill()
  text = [log.read_text() for log in logs]
  assert len(ended) == 2, 'still running after 900 s:\n' + '\n'.join(t[-2000:] for t in text)
  assert ended[0][0] == ended[1][0] == 1, (ended, text[0][-2000:], text[1][-2000:])
  gap = abs(ended[0][1] - ended[1][1])
  assert gap < 20, gap  # the watch polls every second; process 0 leaves last, within seconds
  reason = [l for l in text[0].splitlines() if 'process 1 failed:' in l]
  assert reason and os.path.basename(missing[0]) in reason[0], text[0][-3000:]
  print(f'\nprocess 1 failed; both ended with status 1, {gap:.1f} s apart; '
        f'process 0 logged: {reason[0][reason[0].index("process 1 failed"):][:120]}')
