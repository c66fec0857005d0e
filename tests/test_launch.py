"""launch/: the TPU pod scripts' dry-runs, their real gcloud calls (a fake gcloud records them), the
worker-side helper run for real on this machine, and the local multi-process runner."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
POD_SCRIPTS = ['create', 'setup', 'run', 'status', 'logs', 'stop', 'delete', 'relaunch']
COMMON = ['--name=mo-pod', '--zone=us-central2-b']


@pytest.fixture
def root(tmp_path):
  """A checkout with the launch scripts, the real requirements.txt and a config to launch."""
  r = tmp_path / 'repo'
  shutil.copytree(LAUNCH, r / 'launch')
  shutil.copy(os.path.join(REPO, 'requirements.txt'), r / 'requirements.txt')
  (r / 'configs').mkdir()
  (r / 'configs' / 'tiny.py').write_text('def get_config():\n  pass\n')
  return r


def clean_env(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ('TPU_NAME', 'TPU_ZONE', 'GCP_PROJECT', 'MAMBAOUT_LOG_DIR')}
  env.update(extra)
  return env


def script(root, name, *args, env=None, check=True):
  p = subprocess.run(['bash', str(root / 'launch' / f'{name}.sh'), *args], capture_output=True,
                     text=True, env=env or clean_env(), timeout=60)
  if check:
    assert p.returncode == 0, p.stderr
  return p


def dry_run(root, name, *args, **kw):
  """The commands a script prints under --dry-run, each parsed back into its argv by a shell."""
  out = script(root, name, *COMMON, '--dry-run', *args, **kw).stdout
  lines = [l for l in out.splitlines() if l.strip()]
  return [shlex.split(l) for l in lines]


def flag(argv, name):
  values = [a.split('=', 1)[1] for a in argv if a.startswith(name + '=')]
  assert len(values) == 1, (name, argv)
  return values[0]


# ---------------------------------------------------------------------------------------------
# --help and argument validation


@pytest.mark.parametrize('name', POD_SCRIPTS + ['worker', 'local_multiprocess'])
def test_every_script_has_help(name):
  p = subprocess.run(['bash', os.path.join(LAUNCH, f'{name}.sh'), '--help'], capture_output=True,
                     text=True, env=clean_env(), timeout=30)
  assert p.returncode == 0, p.stderr
  assert p.stdout.startswith('Usage:')
  if name in POD_SCRIPTS:
    assert '--dry-run' in p.stdout and '--name=NAME' in p.stdout


@pytest.mark.parametrize('name,args,message', [
    ('create', ['--zone=us-central2-b', '--accelerator-type=v4-32'], 'pass --name=NAME'),
    ('create', ['--name=mo', '--accelerator-type=v4-32'], 'pass --zone=ZONE'),
    ('create', ['--name=Mo_Pod', '--zone=us-central2-b', '--accelerator-type=v4-32'], "bad --name"),
    ('create', ['--name=mo', '--zone=uscentral', '--accelerator-type=v4-32'], "bad --zone"),
    ('create', COMMON, 'pass --accelerator-type=TYPE'),
    ('create', COMMON + ['--accelerator-type=v4'], "bad --accelerator-type 'v4'"),
    ('create', COMMON + ['--accelerator-type=v9x-8'], 'pass --runtime-version'),
    ('create', COMMON + ['--accelerator-type=v4-8', '--valid-until=6h'], 'add --queued'),
    ('create', COMMON + ['--accelerator-type=v4-8', '--spot', '--reserved'], 'pick one'),
    ('create', COMMON + ['--accelerator-type=v4-8', '--bogus'], "unknown option '--bogus'"),
    ('create', COMMON + ['--accelerator-type'], 'needs a value'),
    ('run', COMMON + ['--workdir=gs://bkt/run'], 'pass --config='),
    ('run', COMMON + ['--config=configs/nope.py', '--workdir=gs://bkt/run'],
     'no config file configs/nope.py'),
    ('run', COMMON + ['--config=configs/tiny.py'], 'pass --workdir=gs://'),
    ('run', COMMON + ['--config=configs/tiny.py', '--workdir=/tmp/run'], 'is not a gs:// path'),
    ('run', COMMON + ['--config=configs/tiny.py', '--workdir=gs://bkt/r', '--mode=fit'],
     "bad --mode 'fit'"),
    ('run', COMMON + ['--config=configs/tiny.py', '--workdir=gs://bkt/r', '--config.x=1'],
     'flags for the trainer go after --'),
    ('run', COMMON + ['--config=configs/tiny.py', '--workdir=gs://bkt/r', '--',
                      '--num_processes=4'], "'--num_processes' after -- clashes"),
    ('run', COMMON + ['--config=configs/tiny.py', '--workdir=gs://bkt/r', '--worker=first'],
     "bad --worker 'first'"),
    ('setup', COMMON + ['--repo=https://example.com/x.git', '--copy'], 'pick one'),
    ('setup', COMMON + ['--ref=dev'], '--ref needs --repo'),
    ('setup', COMMON + ['--python=py3'], "bad --python 'py3'"),
    ('logs', COMMON + ['--lines=many'], "bad --lines 'many'"),
    ('stop', COMMON + ['--timeout=soon'], "bad --timeout 'soon'"),
])
def test_bad_arguments_get_one_line_errors(root, name, args, message):
  p = script(root, name, '--dry-run', *args, check=False)
  assert p.returncode == 2
  assert p.stdout == ''
  assert p.stderr.count('\n') == 1 and p.stderr.startswith(f'{name}.sh: error: '), p.stderr
  assert message in p.stderr


def test_name_and_zone_default_from_the_environment(root):
  p = script(root, 'delete', '--dry-run', env=clean_env(TPU_NAME='env-pod', TPU_ZONE='us-west4-a',
                                                      GCP_PROJECT='my-proj'))
  assert shlex.split(p.stdout) == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'env-pod',
                                   '--zone=us-west4-a', '--project=my-proj']


# ---------------------------------------------------------------------------------------------
# create / delete / status


def test_create_on_demand(root):
  [cmd] = dry_run(root, 'create', '--accelerator-type=v4-32')
  assert cmd == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'mo-pod', '--zone=us-central2-b',
                 '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base']


@pytest.mark.parametrize('accel,runtime', [('v5litepod-16', 'v2-alpha-tpuv5-lite'),
                                           ('v5p-64', 'v2-alpha-tpuv5'),
                                           ('v6e-32', 'v2-alpha-tpuv6e'),
                                           ('v3-8', 'tpu-ubuntu2204-base')])
def test_create_picks_the_runtime_for_the_generation(root, accel, runtime):
  [cmd] = dry_run(root, 'create', f'--accelerator-type={accel}')
  assert flag(cmd, '--accelerator-type') == accel and flag(cmd, '--version') == runtime
  [cmd] = dry_run(root, 'create', f'--accelerator-type={accel}', '--runtime-version=my-image')
  assert flag(cmd, '--version') == 'my-image'


def test_create_spot_with_extra_gcloud_flags(root):
  [cmd] = dry_run(root, 'create', '--accelerator-type=v5litepod-16', '--spot', '--project=proj',
                  '--', '--network=my net', '--internal-ips')
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'mo-pod']
  assert '--spot' in cmd and '--preemptible' not in cmd
  assert cmd[-3:] == ['--network=my net', '--internal-ips', '--project=proj']


def test_create_queued_resource(root):
  [cmd] = dry_run(root, 'create', '--accelerator-type=v4-64', '--queued', '--spot',
                  '--valid-until=6h')
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'mo-pod']
  assert flag(cmd, '--node-id') == 'mo-pod'
  assert flag(cmd, '--accelerator-type') == 'v4-64'
  assert flag(cmd, '--runtime-version') == 'tpu-ubuntu2204-base'
  assert flag(cmd, '--valid-until-duration') == '6h'
  assert '--spot' in cmd and not any(a.startswith('--version=') for a in cmd)


def test_delete_and_status(root):
  assert dry_run(root, 'delete', '--yes') == [
      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'mo-pod', '--zone=us-central2-b', '--quiet']]
  [cmd] = dry_run(root, 'delete', '--queued')
  assert cmd[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'mo-pod']
  assert '--force' in cmd
  describe_qr, describe, ssh = dry_run(root, 'status', '--queued')
  assert describe_qr[:6] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 'mo-pod']
  assert describe[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', 'mo-pod']
  assert flag(ssh, '--worker') == 'all'
  assert shlex.split(flag(ssh, '--command'))[-2:] == ['launch/worker.sh', 'status']
  assert len(dry_run(root, 'status', '--no-workers')) == 1


# ---------------------------------------------------------------------------------------------
# setup / run / logs / stop: ssh to every worker


def remote(ssh_argv):
  """The words of the shell command that gcloud ... ssh --command= runs on each worker."""
  assert ssh_argv[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']
  return shlex.split(flag(ssh_argv, '--command'))


def test_setup_copies_the_checkout_and_installs_jax_tpu_on_every_worker(root):
  pack, scp, ssh = dry_run(root, 'setup')
  assert pack[0] == 'tar' and root.as_posix() in pack
  archive = pack[pack.index('-czf') + 1]
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert scp[5:7] == [archive, 'mo-pod:mambaout_jax_code.tar.gz']
  assert flag(scp, '--worker') == 'all' and flag(ssh, '--worker') == 'all'
  words = remote(ssh)
  assert words[-3:] == ['launch/worker.sh', 'setup', '--python=3.11']
  # worker.sh installs jax[tpu] at the version requirements.txt pins.
  worker = (root / 'launch' / 'worker.sh').read_text()
  assert '"jax[tpu]==$jax"' in worker and 'requirements.txt' in worker


def test_setup_from_git_with_code_only(root):
  [ssh] = dry_run(root, 'setup', '--repo=https://example.com/me/mambaout jax.git', '--ref=v1',
                  '--code-only', '--worker=0,2')
  assert flag(ssh, '--worker') == '0,2'
  words = remote(ssh)
  assert 'https://example.com/me/mambaout jax.git' in words and 'v1' in words
  assert 'worker.sh' not in ' '.join(words)


def test_setup_packs_the_real_checkout(tmp_path):
  """In this git checkout the pack step lists files with git (so no venv, no caches)."""
  out = subprocess.run(['bash', os.path.join(LAUNCH, 'setup.sh'), *COMMON, '--dry-run'],
                       capture_output=True, text=True, env=clean_env(), timeout=60, check=True)
  pack = out.stdout.splitlines()[0]
  assert 'git ls-files -z --cached --others --exclude-standard' in pack


OVERRIDES = ['--config.batch_size=4096', "--config.note=it's a b", '--config.aug.ratio=(0.75, 1.33)']


def test_run_starts_the_trainer_on_all_workers_with_config_workdir_and_overrides(root):
  [ssh] = dry_run(root, 'run', '--config=configs/tiny.py', '--workdir=gs://my-bkt/mo/tiny',
                  '--data-dir=gs://my-bkt/tfds', '--', *OVERRIDES)
  assert flag(ssh, '--worker') == 'all' and flag(ssh, '--zone') == 'us-central2-b'
  words = remote(ssh)
  start = words.index('start')
  assert words[:start] == ['cd', '~/mambaout_jax', '&&', 'bash', 'launch/worker.sh']
  assert words[start + 1:] == [
      '--', 'venv/bin/python', '-m', 'mambaout_jax.main', '--config=configs/tiny.py',
      '--workdir=gs://my-bkt/mo/tiny', '--mode=train', '--config.dataset.data_dir=gs://my-bkt/tfds',
      *OVERRIDES]


def test_logs_and_stop(root):
  [ssh] = dry_run(root, 'logs', '--follow', '--lines=7')
  assert flag(ssh, '--worker') == '0'
  assert remote(ssh)[-3:] == ['logs', '--lines=7', '--follow']
  [ssh] = dry_run(root, 'logs', '--worker=all')
  assert flag(ssh, '--worker') == 'all'
  [ssh] = dry_run(root, 'stop', '--timeout=30')
  assert flag(ssh, '--worker') == 'all'
  assert remote(ssh)[-2:] == ['stop', '--timeout=30']


# ---------------------------------------------------------------------------------------------
# Without --dry-run: the same commands reach gcloud (a fake one that records its argv).


@pytest.fixture
def fake_gcloud(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  record = tmp_path / 'gcloud_calls.jsonl'
  (bin_dir / 'gcloud').write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import json, sys
      with open({str(record)!r}, 'a') as f:
        f.write(json.dumps(sys.argv[1:]) + '\\n')
      """))
  (bin_dir / 'gcloud').chmod(0o755)
  env = clean_env(PATH=f'{bin_dir}:{os.environ["PATH"]}')

  def calls():
    if not record.exists():
      return []
    return [['gcloud', *json.loads(l)] for l in record.read_text().splitlines()]
  return env, calls


@pytest.mark.parametrize('name,args', [
    ('create', ['--accelerator-type=v4-32', '--queued', '--spot']),
    ('run', ['--config=configs/tiny.py', '--workdir=gs://my-bkt/run', '--', *OVERRIDES]),
    ('stop', []),
    ('delete', ['--yes']),
])
def test_real_run_calls_gcloud_exactly_as_the_dry_run_prints(root, fake_gcloud, name, args):
  env, calls = fake_gcloud
  printed = dry_run(root, name, *args, env=env)
  assert calls() == []
  script(root, name, *COMMON, *args, env=env)
  assert calls() == printed


def test_setup_really_packs_the_code(root, fake_gcloud, tmp_path):
  env, calls = fake_gcloud
  env['TMPDIR'] = str(tmp_path)
  script(root, 'setup', *COMMON, env=env)
  archive = tmp_path / 'mambaout_jax_code_mo-pod.tar.gz'
  names = subprocess.run(['tar', '-tzf', str(archive)], capture_output=True, text=True,
                         check=True).stdout.split()
  assert {'./launch/run.sh', './configs/tiny.py', './requirements.txt'} <= set(names)
  assert [c[:5] for c in calls()] == [['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'],
                                      ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh']]


def test_without_gcloud_only_dry_run_works(root, tmp_path):
  bin_dir = tmp_path / 'bin'  # a PATH with the tools the script needs, but no gcloud
  bin_dir.mkdir()
  for tool in ('basename', 'dirname'):
    (bin_dir / tool).symlink_to(shutil.which(tool))
  env = clean_env(PATH=str(bin_dir))
  p = subprocess.run([shutil.which('bash'), str(root / 'launch' / 'delete.sh'), *COMMON],
                     capture_output=True, text=True, env=env, timeout=30)
  assert p.returncode == 2 and 'gcloud not found' in p.stderr and '--dry-run' in p.stderr
  p = subprocess.run([shutil.which('bash'), str(root / 'launch' / 'delete.sh'), *COMMON,
                      '--dry-run'], capture_output=True, text=True, env=env, timeout=30)
  assert p.returncode == 0 and p.stdout.startswith('gcloud compute tpus tpu-vm delete mo-pod')


# ---------------------------------------------------------------------------------------------
# The worker side, run for real: what `run.sh` starts is what the worker runs, detached.


def test_run_command_executes_on_a_worker(root, tmp_path):
  """Runs run.sh's --command in a shell the way sshd would, against a fake worker home."""
  home = tmp_path / 'home'
  code = home / 'mambaout_jax'
  shutil.copytree(root, code)
  (code / 'venv' / 'bin').mkdir(parents=True)
  argv_file = tmp_path / 'argv.json'
  (code / 'venv' / 'bin' / 'python').write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import json, os, sys
      json.dump({{'argv': sys.argv[1:], 'cwd': os.getcwd()}}, open({str(argv_file)!r}, 'w'))
      print('trainer says hi', flush=True)
      """))
  (code / 'venv' / 'bin' / 'python').chmod(0o755)
  [ssh] = dry_run(root, 'run', '--config=configs/tiny.py', '--workdir=gs://my-bkt/run',
                  '--', *OVERRIDES)
  env = clean_env(HOME=str(home))
  p = subprocess.run(['bash', '-c', flag(ssh, '--command')], capture_output=True, text=True,
                     env=env, cwd=home, timeout=30)
  assert p.returncode == 0, p.stderr
  assert 'started pid' in p.stdout
  for _ in range(100):
    if argv_file.exists() and 'hi' in (home / 'mambaout_jax_logs' / 'train.log').read_text():
      break
    time.sleep(0.1)
  got = json.loads(argv_file.read_text())
  assert got['cwd'] == str(code)
  assert got['argv'] == ['-m', 'mambaout_jax.main', '--config=configs/tiny.py',
                         '--workdir=gs://my-bkt/run', '--mode=train', *OVERRIDES]
  for _ in range(100):
    log = (home / 'mambaout_jax_logs' / 'train.log').read_text()
    if 'exited with status' in log:
      break
    time.sleep(0.1)
  assert 'start in' in log and 'trainer says hi' in log and 'exited with status 0' in log
  assert (home / 'mambaout_jax_logs' / 'train.exit').read_text().strip() == '0'


def assert_dead(pid, timeout=10):
  """The process is gone (a zombie waiting to be reaped by init counts as gone)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    try:
      with open(f'/proc/{pid}/stat') as f:
        if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
          return
    except FileNotFoundError:
      return
    time.sleep(0.05)
  raise AssertionError(f'process {pid} is still running')


TRAINER = textwrap.dedent("""\
    import signal, sys, time
    def on_term(*_):
      print('SIGTERM: saving checkpoint', flush=True)
      sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print('step 1', flush=True)
    time.sleep(120)
    """)


def test_worker_start_status_logs_stop_and_restart(root, tmp_path):
  logs = tmp_path / 'logs'
  env = clean_env(MAMBAOUT_LOG_DIR=str(logs))
  (root / 'trainer.py').write_text(TRAINER)

  def worker(*args, check=True):
    p = subprocess.run(['bash', str(root / 'launch' / 'worker.sh'), *args], capture_output=True,
                       text=True, env=env, timeout=60)
    if check:
      assert p.returncode == 0, p.stderr
    return p

  assert 'not running; last log line: (no log yet)' in worker('status').stdout
  worker('start', '--', sys.executable, 'trainer.py')
  pid = int((logs / 'train.pid').read_text())
  for _ in range(100):
    if 'step 1' in (logs / 'train.log').read_text():
      break
    time.sleep(0.1)
  assert f'running (pid {pid}); last log line: step 1' in worker('status').stdout
  again = worker('start', '--', sys.executable, 'trainer.py', check=False)
  assert again.returncode == 2 and f'already running (pid {pid})' in again.stderr
  out = worker('logs', '--lines=1').stdout
  assert out.startswith('[') and out.rstrip().endswith('] step 1')

  stopped = worker('stop', '--timeout=20').stdout
  assert f'stopped pid {pid}' in stopped  # it exited on SIGTERM, no SIGKILL needed
  assert_dead(pid)
  assert 'SIGTERM: saving checkpoint' in (logs / 'train.log').read_text()
  assert 'exited with status 0' in worker('status').stdout  # the handler's sys.exit(0)

  # A re-run (after a stop or a preemption) starts again and appends to the same log.
  worker('start', '--', sys.executable, 'trainer.py')
  worker('stop', '--timeout=20')
  assert (logs / 'train.log').read_text().count(' start in ') == 2


def test_worker_setup_builds_the_venv_with_jax_tpu(root, tmp_path):
  """`worker.sh setup` with a stand-in uv (records its calls, makes venv/bin/python)."""
  bin_dir = tmp_path / 'uv_bin'
  bin_dir.mkdir()
  calls = tmp_path / 'uv_calls.jsonl'
  (bin_dir / 'uv').write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import json, os, sys
      with open({str(calls)!r}, 'a') as f:
        f.write(json.dumps(sys.argv[1:]) + '\\n')
      if sys.argv[1] == 'venv':
        os.makedirs(sys.argv[-1] + '/bin')
        with open(sys.argv[-1] + '/bin/python', 'w') as f:
          f.write('#!/bin/sh\\nexec {sys.executable} "$@"\\n')
        os.chmod(sys.argv[-1] + '/bin/python', 0o755)
      """))
  (bin_dir / 'uv').chmod(0o755)
  (root / 'mambaout_jax').mkdir()
  (root / 'mambaout_jax' / '__init__.py').write_text('')
  env = clean_env(PATH=f'{bin_dir}:{os.environ["PATH"]}')
  p = subprocess.run(['bash', str(root / 'launch' / 'worker.sh'), 'setup', '--python=3.12'],
                     capture_output=True, text=True, env=env, timeout=120)
  assert p.returncode == 0, p.stderr
  jax_pin = [l for l in (root / 'requirements.txt').read_text().splitlines()
             if l.startswith('jax==')][0].split('==')[1]
  assert [json.loads(l) for l in calls.read_text().splitlines()] == [
      ['venv', '--quiet', '--python', '3.12', 'venv'],
      ['pip', 'install', '--quiet', '--python', 'venv/bin/python', '-r', 'requirements.txt',
       f'jax[tpu]=={jax_pin}']]
  assert f'jax {jax_pin} ready' in p.stdout
  # Run again (a re-setup after a code change): the venv is kept, requirements re-installed.
  subprocess.run(['bash', str(root / 'launch' / 'worker.sh'), 'setup'], env=env, check=True,
                 capture_output=True, timeout=120)
  assert [json.loads(l)[0] for l in calls.read_text().splitlines()] == ['venv', 'pip', 'pip']


def test_worker_stop_kills_a_trainer_that_ignores_sigterm(root, tmp_path):
  env = clean_env(MAMBAOUT_LOG_DIR=str(tmp_path / 'logs'))
  run = lambda *a: subprocess.run(['bash', str(root / 'launch' / 'worker.sh'), *a],
                                  capture_output=True, text=True, env=env, timeout=60, check=True)
  run('start', '--', 'bash', '-c', 'trap "" TERM; echo up; sleep 60')
  pid = int((tmp_path / 'logs' / 'train.pid').read_text())
  time.sleep(0.3)
  assert f'killed pid {pid}' in run('stop', '--timeout=1').stdout
  assert_dead(pid)
  assert 'not running' in run('status').stdout


def test_worker_status_reports_a_failed_run(root, tmp_path):
  env = clean_env(MAMBAOUT_LOG_DIR=str(tmp_path / 'logs'))
  run = lambda *a: subprocess.run(['bash', str(root / 'launch' / 'worker.sh'), *a],
                                  capture_output=True, text=True, env=env, timeout=60, check=True)
  run('start', '--', 'bash', '-c', 'echo "step 7: out of memory"; exit 5')
  for _ in range(100):
    if (tmp_path / 'logs' / 'train.exit').exists():
      break
    time.sleep(0.1)
  status = run('status').stdout
  assert 'exited with status 5' in status and 'last log line: ==== ' in status
  assert 'step 7: out of memory' in run('logs', '--lines=3').stdout


# ---------------------------------------------------------------------------------------------
# launch/local_multiprocess.sh: N processes wired with jax.distributed on CPU.

FAKE_MAIN = textwrap.dedent("""\
    \"\"\"Stands in for mambaout_jax.main: joins jax.distributed and all-gathers process ids.\"\"\"
    import argparse, json, os, sys, time
    p = argparse.ArgumentParser()
    for name in ('--coordinator_address', '--workdir'):
      p.add_argument(name)
    for name in ('--num_processes', '--process_id'):
      p.add_argument(name, type=int)
    p.add_argument('--fail_process', type=int, default=-1)
    p.add_argument('--sleep', type=float, default=0)
    p.add_argument('--ignore_sigterm', action='store_true')
    args, rest = p.parse_known_args()
    if args.ignore_sigterm:
      import signal
      signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, f'pid_{args.process_id}'), 'w') as f:
      f.write(str(os.getpid()))
    if args.process_id == args.fail_process:
      print('failing on purpose', flush=True)
      sys.exit(3)
    time.sleep(args.sleep)
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    gathered = multihost_utils.process_allgather(np.array([jax.process_index()]))
    out = dict(process_index=jax.process_index(), process_count=jax.process_count(),
               local_devices=jax.local_device_count(), devices=jax.device_count(),
               platform=jax.devices()[0].platform, gathered=np.asarray(gathered).ravel().tolist(),
               collectives=jax.config.jax_cpu_collectives_implementation, rest=rest)
    print(json.dumps(out), flush=True)
    """)


@pytest.fixture
def fake_main(tmp_path):
  mod = tmp_path / 'mod'
  mod.mkdir()
  (mod / 'fake_main.py').write_text(FAKE_MAIN)
  env = clean_env(PYTHONPATH=str(mod))
  env.pop('XLA_FLAGS', None)

  def start(*args, n='2', **popen_kw):
    cmd = [os.path.join(LAUNCH, 'local_multiprocess.sh'), n, f'--python={sys.executable}',
           '--module=fake_main', f'--log-dir={tmp_path / "logs"}', *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, **popen_kw)
  return start, tmp_path


def assert_all_dead(workdir, n):
  pids = [int((workdir / f'pid_{i}').read_text()) for i in range(n)
          if (workdir / f'pid_{i}').exists()]
  assert pids
  for pid in pids:
    assert_dead(pid)


def test_local_multiprocess_wires_processes_with_jax_distributed(fake_main):
  start, tmp = fake_main
  p = start('--devices=2', '--', f'--workdir={tmp / "wd"}', '--config.note=a b')
  out, err = p.communicate(timeout=120)
  assert p.returncode == 0, err
  for i in range(2):
    log = (tmp / 'logs' / f'process_{i}.log').read_text()
    result = json.loads([l for l in log.splitlines() if l.startswith('{')][-1])
    assert result == dict(process_index=i, process_count=2, local_devices=2, devices=4,
                          platform='cpu', gathered=[0, 1], collectives='gloo',
                          rest=['--config.note=a b'])
  assert '"process_index": 0' in out  # process 0 is shown on the terminal
  assert 'all 2 processes succeeded' in err


def test_local_multiprocess_stops_everything_when_one_fails(fake_main):
  """The survivors ignore SIGTERM (like a process stuck in a collective): SIGKILL gets them."""
  start, tmp = fake_main
  p = start('--', f'--workdir={tmp / "wd"}', '--fail_process=1', '--sleep=60', '--ignore_sigterm',
            n='3')
  _, err = p.communicate(timeout=60)
  assert p.returncode == 3
  assert 'process 1 exited with status 3' in err and 'failing on purpose' in err
  assert_all_dead(tmp / 'wd', 3)


def test_local_multiprocess_ctrl_c_stops_everything(fake_main):
  start, tmp = fake_main
  p = start('--', f'--workdir={tmp / "wd"}', '--sleep=60')
  for _ in range(300):
    if all((tmp / 'wd' / f'pid_{i}').exists() for i in range(2)):
      break
    time.sleep(0.1)
  p.send_signal(signal.SIGINT)
  _, err = p.communicate(timeout=30)
  assert p.returncode == 130 and 'interrupted' in err
  assert_all_dead(tmp / 'wd', 2)


@pytest.mark.parametrize('args,message', [
    (['--', '--workdir=/tmp/x'], 'how many processes?'),
    (['0', '--'], "bad process count '0'"),
    (['2', '--devices=none'], "bad --devices 'none'"),
    (['2', '--', '--process_id=1'], "'--process_id' is set by local_multiprocess.sh"),
    (['2', '--python=/no/such/python'], "no python '/no/such/python'"),
])
def test_local_multiprocess_bad_arguments(args, message):
  p = subprocess.run([os.path.join(LAUNCH, 'local_multiprocess.sh'), *args], capture_output=True,
                     text=True, env=clean_env(), timeout=30)
  assert p.returncode == 2 and message in p.stderr, p.stderr


# ---------------------------------------------------------------------------------------------
# launch/relaunch.sh: bring a preempted run back (a fake gcloud plays the slice and its workers).

RELAUNCH = ['--accelerator-type=v4-32', '--spot', '--config=configs/tiny.py',
            '--workdir=gs://my-bkt/run', '--', "--config.note=it's a b"]


@pytest.fixture
def fake_cloud(tmp_path):
  bin_dir = tmp_path / 'cloud_bin'
  bin_dir.mkdir()
  record = tmp_path / 'cloud_calls.jsonl'
  (bin_dir / 'gcloud').write_text(textwrap.dedent(f"""\
      #!{sys.executable}
      import json, os, sys
      args = sys.argv[1:]
      with open({str(record)!r}, 'a') as f:
        f.write(json.dumps(args) + '\\n')
      if 'describe' in args:
        with open({str(record)!r}) as f:
          describes = sum('describe' in json.loads(line) for line in f)
        if describes <= int(os.environ.get('FAKE_DESCRIBE_ERRORS', '0')):
          sys.exit(os.environ['FAKE_DESCRIBE_ERROR'])  # to stderr, status 1
        state = os.environ['FAKE_STATE']
        if 'queued-resources' in args:
          state = os.environ.get('FAKE_QR_STATE', state)
        if state == 'MISSING':
          sys.exit('ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND')
        print(state)
      elif 'ssh' in args and any(a.endswith('worker.sh status') for a in args):
        print(os.environ['FAKE_STATUS'].replace('|', '\\n'))
      """))
  (bin_dir / 'gcloud').chmod(0o755)

  def make_env(state, status='', **extra):
    return clean_env(PATH=f'{bin_dir}:{os.environ["PATH"]}', FAKE_STATE=state, FAKE_STATUS=status,
                     TMPDIR=str(tmp_path), **extra)

  def relaunch(root, state, status='', *extra, **env_extra):
    if record.exists():
      record.unlink()
    env = make_env(state, status, **env_extra)
    p = script(root, 'relaunch', *COMMON, *extra, *RELAUNCH, env=env, check=False)
    calls = [json.loads(l) for l in record.read_text().splitlines()] if record.exists() else []
    # Name each call by what it does: 'tpu-vm create', 'ssh worker.sh status', ...
    names = []
    for c in calls:
      if c[3] == 'ssh':
        cmd = flag(['gcloud', *c], '--command')
        names.append('ssh ' + ('setup' if 'worker.sh setup' in cmd else cmd.split()[5]))
      else:
        names.append(f'{c[2]} {c[3]}')
    return p, names, calls
  relaunch.env = make_env
  return relaunch


def test_relaunch_recreates_a_preempted_slice_and_resumes(root, fake_cloud):
  p, names, calls = fake_cloud(root, 'PREEMPTED')
  assert p.returncode == 0, p.stderr
  assert names == ['tpu-vm describe', 'tpu-vm delete', 'tpu-vm create', 'tpu-vm scp', 'ssh setup',
                   'ssh start']
  create = ['gcloud', *calls[2]]
  assert '--spot' in create and flag(create, '--accelerator-type') == 'v4-32'
  start = shlex.split(flag(['gcloud', *calls[-1]], '--command'))
  assert '--workdir=gs://my-bkt/run' in start and "--config.note=it's a b" in start


def test_relaunch_leaves_a_healthy_run_alone(root, fake_cloud):
  status = 'w0: running (pid 9); last log line: step 5|w1: running (pid 8); last log line: x'
  p, names, _ = fake_cloud(root, 'READY', status)
  assert p.returncode == 0, p.stderr
  assert names == ['tpu-vm describe', 'ssh status']


def test_relaunch_restarts_a_trainer_that_stopped_on_one_host(root, fake_cloud):
  status = 'w0: running (pid 9); last log line: step 5|w1: exited with status 143; last log line: x'
  p, names, _ = fake_cloud(root, 'READY', status)
  assert p.returncode == 0, p.stderr
  assert names == ['tpu-vm describe', 'ssh status', 'ssh stop', 'ssh start']


def test_relaunch_stops_when_training_finished(root, fake_cloud):
  status = 'w0: exited with status 0; last log line: done|w1: exited with status 0; last log line: x'
  p, names, _ = fake_cloud(root, 'READY', status, '--watch=5')
  assert p.returncode == 0 and 'finished on every host' in p.stderr
  assert names == ['tpu-vm describe', 'ssh status']


def test_relaunch_recreates_a_slice_that_is_not_found(root, fake_cloud):
  p, names, _ = fake_cloud(root, 'MISSING')
  assert p.returncode == 0, p.stderr
  assert names[:3] == ['tpu-vm describe', 'tpu-vm delete', 'tpu-vm create']


DESCRIBE_ERRORS = {  # gcloud's messages for errors that say nothing about the slice
    'expired credentials': 'ERROR: (gcloud.compute.tpus.tpu-vm.describe) There was a problem '
                           'refreshing your current auth tokens: Reauthentication failed.',
    'network': 'ERROR: gcloud crashed (ConnectionError): HTTPSConnectionPool(host='
               "'tpu.googleapis.com', port=443): Max retries exceeded",
    'API 5xx': 'ERROR: (gcloud.compute.tpus.tpu-vm.describe) UNAVAILABLE: The service is '
               'currently unavailable.',
}


@pytest.mark.parametrize('error', DESCRIBE_ERRORS, ids=list(DESCRIBE_ERRORS))
def test_relaunch_leaves_the_slice_alone_when_describe_fails(root, fake_cloud, error):
  """Only NOT_FOUND means the slice is gone; any other describe error touches nothing."""
  p, names, _ = fake_cloud(root, 'READY', '', FAKE_DESCRIBE_ERRORS='1',
                           FAKE_DESCRIBE_ERROR=DESCRIBE_ERRORS[error])
  assert p.returncode == 1
  assert names == ['tpu-vm describe']
  assert 'could not read the state of mo-pod' in p.stderr and 'leaving the slice alone' in p.stderr
  assert DESCRIBE_ERRORS[error][-20:] in p.stderr


def test_relaunch_watch_asks_again_after_a_describe_error(root, fake_cloud):
  status = 'w0: exited with status 0; last log line: done|w1: exited with status 0; last log line: x'
  p, names, _ = fake_cloud(root, 'READY', status, '--watch=1', FAKE_DESCRIBE_ERRORS='2',
                           FAKE_DESCRIBE_ERROR=DESCRIBE_ERRORS['expired credentials'])
  assert p.returncode == 0, p.stderr
  assert names == ['tpu-vm describe'] * 3 + ['ssh status']
  assert p.stderr.count('trying again in 1s') == 2


def test_relaunch_requeues_a_suspended_queued_resource(root, fake_cloud):
  p, names, calls = fake_cloud(root, 'SUSPENDED', '', '--queued')
  assert p.returncode == 0, p.stderr
  # Set up and run wait for the next check, when the new queued resource is ACTIVE.
  assert names == ['queued-resources describe', 'queued-resources delete',
                   'queued-resources create']
  assert '--force' in calls[1]


def test_relaunch_dry_run_and_validation(root):
  lines = [l for l in script(root, 'relaunch', *COMMON, '--dry-run', *RELAUNCH).stdout.splitlines()
           if not l.startswith('#')]
  assert [shlex.split(l)[3:5] for l in lines if l.startswith('gcloud')] == [
      ['tpu-vm', 'describe'], ['tpu-vm', 'ssh'], ['tpu-vm', 'ssh'], ['tpu-vm', 'ssh'],
      ['tpu-vm', 'delete'], ['tpu-vm', 'create'], ['tpu-vm', 'scp'], ['tpu-vm', 'ssh'],
      ['tpu-vm', 'ssh']]
  bad = script(root, 'relaunch', *COMMON, '--dry-run', *RELAUNCH[:-2], '--workdir=/local', check=False)
  assert bad.returncode == 2 and bad.stderr.startswith('relaunch.sh: error: --workdir')



def test_status_of_a_queued_resource_still_waiting(root, fake_cloud):
  """No TPU VM yet is normal for a queued resource: status says so and succeeds."""
  env = fake_cloud.env('MISSING', FAKE_QR_STATE='WAITING_FOR_RESOURCES')
  p = script(root, 'status', *COMMON, '--queued', env=env)
  assert p.stdout.strip() == 'WAITING_FOR_RESOURCES'
  assert "no TPU VM 'mo-pod' in us-central2-b yet" in p.stderr
  p = script(root, 'status', *COMMON, env=env, check=False)
  assert p.returncode == 1 and "no TPU VM 'mo-pod' in us-central2-b" in p.stderr
