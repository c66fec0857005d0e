"""Test setup: 8 fake CPU devices (sharding tests), deterministic numerics, shared fixtures."""
import os

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


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: large models or long runs (still run in CI)')
