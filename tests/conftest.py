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
  # pytest-xdist's file scheduling (`--dist loadfile`) hands out the files with the most tests
  # first unless told to keep the collection order; ours puts the longest-running files first.
  if hasattr(config.option, 'loadscopereorder'):
    config.option.loadscopereorder = False


# The longest-running files first (by their summed durations in a `--durations=0` run; the rest
# follow by name). pytest-xdist gives each worker one file, and the next one in this order when it
# is down to its last two tests: longest-first list scheduling, so no worker ends alone on a long
# file (with xdist's own order, files with many quick tests first, the one-test resume files ran
# last). Order within a file is unchanged.
LONGEST_FIRST = ('test_seg_task.py', 'test_train.py', 'test_resume_processes.py',
                 'test_finetune.py', 'test_seg_demo.py', 'test_train_resume.py', 'test_models.py',
                 'test_parity.py', 'test_mamba.py', 'test_checkpoint_structure.py',
                 'test_upernet.py', 'test_aot.py', 'test_segment.py', 'test_notebook.py',
                 'test_vit.py', 'test_seg_task_eval.py', 'test_seg_task_unit.py', 'test_ssm.py',
                 'test_multiprocess.py', 'test_pretrained.py', 'test_bad_input.py',
                 'test_convert.py', 'test_app.py', 'test_launch.py', 'test_profile_seg.py',
                 'test_data_pipeline.py', 'test_data_transforms.py')


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: (rank.get(item.path.name, len(rank)), item.path.name))
