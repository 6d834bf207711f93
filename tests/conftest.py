"""Test set-up: 8 fake CPU devices, so sharding is tested for real, and quiet TF."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One XLA compilation cache for the whole session, this process and every main.py it
# starts (they inherit the environment): the end-to-end tests run the same smoke config
# in ~30 fresh processes, and each compiled the same train and eval steps again.
# A fresh directory per session: nothing carries over between runs of the suite.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="alexnet_jax_tests_xla_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_platforms", "cpu")

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "..", "shared", "data")


@pytest.fixture(scope="session")
def shared_data():
  """../shared/data (real ImageNet photos); tests that need it skip without it."""
  path = os.path.abspath(SHARED_DATA)
  if not os.path.isdir(path):
    pytest.skip(f"no shared data at {path}: real-JPEG checks skipped")
  return path
