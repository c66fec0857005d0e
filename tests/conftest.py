"""Test setup: 8 fake CPU devices (sharding tests), deterministic numerics, shared fixtures."""
import os
import signal

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

# PyTorch (the parity reference) loads its compiler stack (triton, with its own LLVM) when timm or
# torchvision is imported. Loaded after TensorFlow (which tfds and clu import) it crashes the process
# with a segmentation fault, so the test process loads it first.
try:
  import torch._dynamo  # noqa: E402,F401
except ImportError:  # the parity tests skip themselves without PyTorch
  pass


# pytest-xdist runs tests in worker processes that ignore SIGINT, and a child process inherits an
# ignored signal (Python then installs no KeyboardInterrupt handler and bash cannot trap it): the
# tests that stop a program with Ctrl-C need the default disposition back in the worker.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
  signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: large models or long runs (still run in CI)')


# The longest files first, dealt alternately to the workers (seconds each on 2 idle cores,
# roughly, in this order). Under `-n N --dist loadfile` pytest-xdist hands each worker an initial
# batch of max(files // 4 // N, 2) consecutive files, then one file at a time as workers free up:
# dealing the long files across those batches keeps one worker from starting with all of them and
# finishing alone. Order within a file is unchanged; without xdist this only reorders files.
LONGEST_FIRST = ('test_train.py', 'test_parity.py', 'test_seg_task.py', 'test_resume_processes.py',
                 'test_finetune.py', 'test_mamba.py', 'test_train_resume.py', 'test_models.py',
                 'test_upernet.py', 'test_checkpoint_structure.py', 'test_segment.py',
                 'test_aot.py', 'test_ssm.py', 'test_pretrained.py', 'test_multiprocess.py',
                 'test_vit.py', 'test_app.py', 'test_launch.py', 'test_notebook.py',
                 'test_bad_input.py')


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  files = sorted({item.path.name for item in items}, key=lambda n: (rank.get(n, len(rank)), n))
  workers = getattr(config, 'workerinput', {}).get('workercount', 1)
  batch = max(len(files) // 4 // workers, 2)
  dealt = [files[i::workers][:batch] for i in range(workers)] if workers > 1 else []
  order = [f for batch_files in dealt for f in batch_files]
  order += [f for f in files if f not in order]
  position = {name: i for i, name in enumerate(order)}
  items.sort(key=lambda item: position[item.path.name])
