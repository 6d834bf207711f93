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
# JAX's default threefry ("partitionable") compiles each jax.random.normal shape for ~1.5 s
# on CPU: the jitted init of a train state took 22.6 s against 2.8 s without it (measured
# on a loaded machine). The tests draw their initial weights with the classic threefry
# instead (children inherit it): the values differ from a user's run, and no test depends
# on which, since every comparison is made against a reference computed in the same run.
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_platforms", "cpu")

SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "..", "shared", "data")


def pytest_collection_modifyitems(items):
  """The long tests (fresh processes, whole runs: marked slow) first: with `pytest -n 2`
  the two workers then end together instead of one waiting on a long test dealt last."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def shared_data():
  """../shared/data (real ImageNet photos); tests that need it skip without it."""
  path = os.path.abspath(SHARED_DATA)
  if not os.path.isdir(path):
    pytest.skip(f"no shared data at {path}: real-JPEG checks skipped")
  return path


# ------------------------------------------------------------------ shared tiny runs
# Most end-to-end tests need the same few things: the smoke demo data (and its input
# statistics) and one finished tiny run to resume, evaluate, damage or rerun. They are
# made once per session (per xdist worker) and tests copy the run before changing it.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_STEPS = 4  # the shared run: evaluated and checkpointed at steps 2 and 4
# The smallest input the smoke stack takes (pool5 1 x 1): a step costs ~12x less than at
# 224. Tests where the geometry is under test (test_model, test_input_pipeline) set theirs.
SMOKE_GEOMETRY = {"model.input_size": 64, "input.resize_size": 64}


def smoke_config(cache_dir: str, **overrides):
  """experiments/alexnet.py:smoke on one device, as the shared run was trained."""
  from experiments import alexnet

  config = alexnet.get_config("smoke")
  config.update_from_flattened_dict({
      "dataset.cache_dir": cache_dir, "num_train_steps": SMOKE_STEPS, "eval_every_steps": 2,
      "checkpoint_every_steps": 2, "keep_checkpoints": 3, "mesh.data": 1, "mesh.model": 1,
      **SMOKE_GEOMETRY, **overrides})
  return config


def smoke_flags(cache_dir: str, **overrides) -> list[str]:
  """The same run as main.py flags (a fresh process fakes as many devices as it is told)."""
  base = {"dataset.cache_dir": cache_dir, "num_train_steps": SMOKE_STEPS,
          "eval_every_steps": 2, "checkpoint_every_steps": 2, "keep_checkpoints": 3,
          "mesh.data": 1, "mesh.model": 1, **SMOKE_GEOMETRY}
  return ([f"--config={ROOT}/experiments/alexnet.py:smoke"]
          + [f"--config.{k}={v}" for k, v in {**base, **overrides}.items()])


@pytest.fixture(scope="session")
def smoke_cache(tmp_path_factory) -> str:
  """A dataset cache shared by the session: the demo data and statistics are made once."""
  return str(tmp_path_factory.mktemp("smoke_cache"))


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, smoke_cache) -> str:
  """A finished smoke run (4 steps, checkpoints and centre-crop evaluations at 2 and 4,
  ten-crop final metrics), trained in this process. Read it, or copy it (`run_copy`)
  before changing anything."""
  from alexnet_jax import cli

  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  assert cli.run("train", smoke_config(smoke_cache), workdir) == 0
  return workdir


@pytest.fixture
def run_copy(finished_run, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  return workdir
