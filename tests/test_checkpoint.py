"""Checkpoints on disk: what survives a NaN, restarts, damage, a full disk, a second run on
the workdir and a changed config. Real orbax checkpoints throughout; a small state shaped
like the TrainState (tower-first parameters, momentum, the plateau state's +inf)."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax import checkpoint, lock
from experiments import alexnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@flax.struct.dataclass
class State:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  plateau: optax.OptState


SGD = optax.sgd(0.01, momentum=0.9)


def make_state(step: int, *, width: int = 64, optimizer=SGD) -> State:
  # Random normal values: incompressible, as real weights are, so damage is not
  # always caught by the compressor and the checksums have to. Drawn by numpy: JAX's
  # normal() compiles for ~1.5 s per shape on a CPU, and the draws are not under test.
  rng = np.random.default_rng(step)
  params = {"conv1": {"kernel": jnp.asarray(rng.standard_normal((2, 5, 5, 3, 4), np.float32)),
                      "bias": jnp.ones((2, 4))},
            "fc8": {"kernel": jnp.asarray(rng.standard_normal((2, width, 10), np.float32))}}
  opt_state = optimizer.init(params)
  _, opt_state = optimizer.update(params, opt_state, params)  # a non-zero momentum
  return State(step=jnp.int32(step), params=params, opt_state=opt_state,
               plateau=optax.contrib.reduce_on_plateau().init(None))  # best_value = +inf


def target(state: State, mesh: Mesh | None = None):
  """The restore target: shapes, and tower-first leaves split over `model` on `mesh`."""
  def spec(path, x):
    towers = jax.tree_util.keystr(path[:1], simple=True) in ("params", "opt_state") and x.ndim
    return P("model") if towers else P()

  return jax.tree_util.tree_map_with_path(
      lambda path, x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=NamedSharding(mesh, spec(path, x)) if mesh else None),
      state)


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def poisoned(state: State, where: str) -> State:
  if where == "params":
    return state.replace(params={**state.params, "fc8": {"kernel": state.params["fc8"]["kernel"]
                                                         .at[1, 2, 3].set(jnp.nan)}})
  return state.replace(opt_state=jax.tree.map(lambda m: m.at[(0,) * m.ndim].set(jnp.inf)
                                              if m.ndim else m, state.opt_state))


@pytest.fixture
def config():
  return alexnet.get_config("smoke")


def warnings_in(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------ 1. non-finite states

def test_a_nonfinite_state_is_never_saved(tmp_path, config, caplog):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  assert ckpt.newest_finite_step() is None
  assert ckpt.save(make_state(1), config)  # the plateau state's +inf is not a reason
  for step, where in ((2, "params"), (3, "opt_state")):
    assert ckpt.save(poisoned(make_state(step), where), config) is False
  ckpt.close()
  assert ckpt.all_steps() == [1] and ckpt.newest_finite_step() == 1
  refusals = [w for w in warnings_in(caplog) if "NaN or Inf" in w]
  assert len(refusals) == 2 and "step 2" in refusals[0] and "(step 1) is kept" in refusals[0]


def test_the_newest_checkpoint_is_finite_across_refusals_and_restarts(tmp_path, config):
  workdir = str(tmp_path)
  ckpt = checkpoint.Checkpointer(workdir, keep=2)
  for step in (1, 2):
    ckpt.save(make_state(step), config)
  for step in (3, 4, 5):  # refused: the last finite one stays the newest and is kept
    assert ckpt.save(poisoned(make_state(step), "params"), config) is False
  ckpt.close()
  assert ckpt.all_steps() == [1, 2] and ckpt.newest_finite_step() == 2
  ckpt = checkpoint.Checkpointer(workdir, keep=2)  # a restart resumes from it
  assert ckpt.newest_finite_step() == 2
  assert_same(ckpt.restore(target(make_state(0))), make_state(2))
  assert ckpt.save(poisoned(make_state(6), "opt_state"), config) is False
  ckpt.save(make_state(3), config)
  ckpt.close()
  assert ckpt.all_steps() == [2, 3] and ckpt.newest_finite_step() == 3


def test_a_nonfinite_state_is_not_saved_even_with_the_best_evaluation(tmp_path, config):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.save(poisoned(make_state(1), "opt_state"), config,
                   eval_metrics={checkpoint.BEST_METRIC: 0.1}) is False
  ckpt.close()
  assert ckpt.all_steps() == [] and ckpt.newest_finite_step() is None


# ------------------------------------------------------------------ 2. the best across resumes

def test_the_best_checkpoint_survives_any_number_of_resumes(tmp_path, config):
  workdir = str(tmp_path)

  def run(errors: dict[int, float | None]) -> list[int]:
    ckpt = checkpoint.Checkpointer(workdir, keep=2)
    for step, error in errors.items():
      ckpt.save(make_state(step), config,
                eval_metrics=None if error is None else {checkpoint.BEST_METRIC: error})
    ckpt.close()
    return ckpt.all_steps()

  assert run({1: 0.5, 2: 0.2, 3: 0.4}) == [2, 3]
  assert run({4: None, 5: 0.3}) == [2, 4, 5]  # 2: the best, though not among the last 2
  assert run({6: None, 7: None}) == [2, 6, 7]
  reader = checkpoint.Checkpointer(workdir, read_only=True)
  assert reader.manager.best_step() == 2  # orbax ranks as the writer's policy kept
  assert_same(reader.restore(target(make_state(0)), step=2), make_state(2))


def test_without_evaluations_only_the_last_k_are_kept_quietly(tmp_path, config, caplog):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  for step in (1, 2, 3, 4):
    ckpt.save(make_state(step), config)
  ckpt.close()
  assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
  assert not warnings_in(caplog)  # orbax warns of a save without metrics: not ours
  # A checkpoint without orbax's metrics item (an older one) is one of the last K too.
  shutil.rmtree(tmp_path / "checkpoints" / "3" / "metrics")
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  for step in (5, 6):
    ckpt.save(make_state(step), config)
  ckpt.close()
  assert ckpt.all_steps() == [5, 6]


# ------------------------------------------------------------------ 3. damaged checkpoints

def _data_files(step_dir):
  data = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  return sorted((os.path.join(data, f) for f in os.listdir(data)), key=os.path.getsize)


def _truncate(step_dir):
  path = _data_files(step_dir)[-1]
  os.truncate(path, os.path.getsize(path) // 2)


def _random_bytes(step_dir):
  path = _data_files(step_dir)[-1]
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2 - 2048)
    f.write(np.random.default_rng(0).bytes(4096))


def _other_steps_data(step_dir):
  # Intact arrays, but not the ones this step saved (say, a copy gone wrong).
  shutil.rmtree(os.path.join(step_dir, "state"))
  shutil.copytree(os.path.join(os.path.dirname(step_dir), "1", "state"),
                  os.path.join(step_dir, "state"))


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.mkdir(step_dir)


DAMAGE = {  # kind: (damage, what the report says: one of these)
    "truncated data file": (_truncate, "the arrays cannot be read"),
    "missing data file": (lambda d: os.remove(_data_files(d)[-1]), "the arrays cannot be read"),
    "missing _METADATA": (lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
                          "state/_METADATA is missing"),
    "missing manifest": (lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
                         "state/manifest.ocdbt is missing"),
    "garbage meta": (lambda d: open(os.path.join(d, "meta", "metadata"), "w").write("{\x00"),
                     "meta/metadata is unreadable"),
    "empty step directory": (_empty, "empty directory"),
    # Caught by the decompressor where it lands in compressed framing (most runs), else by
    # the checksum: which one depends on where the arrays lie in the file.
    "4 KB of random bytes": (_random_bytes, ("the arrays cannot be read",
                                             "array data does not match its checksum")),
    "another step's arrays": (_other_steps_data, "array data does not match its checksum"),
}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("two"))
  ckpt = checkpoint.Checkpointer(workdir)
  for step in (1, 2):
    ckpt.save(make_state(step, width=4096), alexnet.get_config("smoke"))
  ckpt.close()
  return workdir


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_to_the_intact_one(
    kind, two_checkpoints, tmp_path, config, caplog):
  workdir = str(tmp_path / "run")
  shutil.copytree(two_checkpoints, workdir)
  damage, reasons = DAMAGE[kind]
  reasons = (reasons,) if isinstance(reasons, str) else reasons
  damage(os.path.join(workdir, "checkpoints", "2"))
  abstract = target(make_state(0, width=4096))

  reader = checkpoint.Checkpointer(workdir, read_only=True)
  with pytest.raises(checkpoint.CheckpointCorrupt) as err:  # asked for by step: why not
    reader.restore(abstract, step=2)
  assert "step 2" in str(err.value) and "\n" not in str(err.value)
  problem = err.value.problems[2]
  assert problem.startswith(reasons) and f"is damaged: {problem}" in str(err.value)
  caplog.clear()
  # Eval (which checks the network): the one before, with a warning saying why (which
  # array fails first may differ from one read to the next).
  assert_same(reader.restore(abstract, config=config), make_state(1, width=4096))
  assert [w for w in warnings_in(caplog)
          if "step 2" in w and any(f"not usable ({reason}" in w for reason in reasons)]
  assert reader.all_steps() == [1, 2]

  # Training: resumes from step 1 and saves step 2 again (no crash loop).
  ckpt = checkpoint.Checkpointer(workdir)
  assert_same(ckpt.restore(abstract, config=config), make_state(1, width=4096))
  assert os.listdir(os.path.join(workdir, checkpoint.DAMAGED_DIR)) == ["2"]
  ckpt.save(make_state(2, width=4096), config)
  ckpt.close()
  again = checkpoint.Checkpointer(workdir, read_only=True)
  assert_same(again.restore(abstract), make_state(2, width=4096))


def test_no_intact_checkpoint_is_one_clear_error_and_moves_nothing(two_checkpoints, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(two_checkpoints, workdir)
  for step in ("1", "2"):
    os.remove(os.path.join(workdir, "checkpoints", step, "state", "_METADATA"))
  ckpt = checkpoint.Checkpointer(workdir)
  with pytest.raises(checkpoint.CheckpointCorrupt) as err:
    ckpt.restore(target(make_state(0, width=4096)))
  ckpt.close()
  assert "no intact checkpoint" in str(err.value) and set(err.value.problems) == {1, 2}
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]
  assert not os.path.exists(os.path.join(workdir, checkpoint.DAMAGED_DIR))


# ------------------------------------------------------------------ 4. a full disk

@pytest.fixture
def tmpfs(tmp_path):
  """A real small filesystem (needs root, as in this sandbox; skipped elsewhere)."""
  path = str(tmp_path / "fs")
  os.makedirs(path)
  out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", path],
                       capture_output=True, text=True)
  if out.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")

  def shrink(**options):  # to what is used now plus a margin, in bytes or files
    st = os.statvfs(path)
    used = {"size": (st.f_blocks - st.f_bfree) * st.f_frsize, "nr_inodes": st.f_files - st.f_ffree}
    opts = ",".join(f"{k}={used[k] + v}" for k, v in options.items())
    subprocess.run(["mount", "-o", f"remount,{opts}", path], check=True)

  yield path, shrink
  subprocess.run(["umount", "-l", path], check=False)


def _assert_step_1_intact(workdir):
  reader = checkpoint.Checkpointer(workdir, read_only=True)
  assert reader.all_steps() == [1]
  assert_same(reader.restore(target(make_state(0, width=8192))), make_state(1, width=8192))


def test_disk_full_before_a_save_is_one_clear_error(tmpfs, config):
  workdir, shrink = tmpfs
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save(make_state(1, width=8192), config)  # ~1.3 MiB of arrays with their momentum
  ckpt.wait()
  shrink(size=512 * 1024)
  with pytest.raises(checkpoint.CheckpointWriteError) as err:
    ckpt.save(make_state(2, width=8192), config)
  message = str(err.value)
  assert "step 2" in message and os.path.join(workdir, "checkpoints") in message
  assert "needs about 1.3 MiB" in message and "MiB free" in message and "(step 1)" in message
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]
  ckpt.close()
  _assert_step_1_intact(workdir)


@pytest.mark.parametrize("files_left", [2, 8])  # fails making directories / writing files
def test_disk_full_during_a_write_is_one_clear_error(tmpfs, config, caplog, files_left):
  # Out of files (inodes) rather than bytes: the space check passes and the write
  # fails part way, as on a disk that someone else fills.
  workdir, shrink = tmpfs
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save(make_state(1, width=8192), config)
  ckpt.wait()
  shrink(nr_inodes=files_left)
  with pytest.raises(checkpoint.CheckpointWriteError) as err:
    ckpt.save(make_state(2, width=8192), config)
    ckpt.wait()
  message = str(err.value)
  assert "step 2" in message and "No space left on device" in message
  assert os.path.join(workdir, "checkpoints") in message and "(step 1) is intact" in message
  assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # said once, by us
  ckpt.close()
  _assert_step_1_intact(workdir)


def test_too_little_space_is_refused_before_writing_anywhere(tmp_path, config, monkeypatch):
  # Runs without root: the same check as above, on a filesystem said to be nearly full.
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  monkeypatch.setattr(checkpoint.disk, "free_bytes", lambda directory: 1000)
  with pytest.raises(checkpoint.CheckpointWriteError, match="needs about .* 0.0 MiB free"):
    ckpt.save(make_state(1), config)
  ckpt.close()
  assert ckpt.all_steps() == [] and os.listdir(ckpt.directory) == []


# ------------------------------------------------------------------ 5. one run per workdir

HOLDER = """
import sys
sys.path.insert(0, sys.argv[1])
from alexnet_jax import lock
lock.WorkdirLock(sys.argv[2]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_run_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, config, caplog):
  workdir = str(tmp_path)
  in_progress = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp"  # the first run's save
  in_progress.mkdir(parents=True)
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, ROOT, workdir], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(lock.WorkdirLocked) as err:
      checkpoint.Checkpointer(workdir)
    message = str(err.value)
    assert f"pid {holder.pid} on {socket.gethostname()}, since 20" in message
    assert "\n" not in message and in_progress.exists()
    assert checkpoint.Checkpointer(workdir, read_only=True).all_steps() == []  # eval may read
  finally:
    holder.kill()  # kill -9: no chance to release; the kernel drops the flock
    holder.wait()
  caplog.clear()
  ckpt = checkpoint.Checkpointer(workdir)
  assert [w for w in warnings_in(caplog) if f"took over the lock left by pid {holder.pid}" in w]
  assert lock.WorkdirLock(workdir).holder()["pid"] == os.getpid()
  ckpt.save(make_state(1), config)
  ckpt.close()
  assert lock.WorkdirLock(workdir).holder() == {}  # released cleanly: nothing to take over


def test_the_lock_is_reentrant_within_a_process_and_released_by_the_last_close(tmp_path):
  workdir = str(tmp_path)
  with lock.WorkdirLock(workdir):
    first = checkpoint.Checkpointer(workdir)
    second = checkpoint.Checkpointer(workdir)
    first.close()
    second.close()
    assert lock.WorkdirLock(workdir).holder()["pid"] == os.getpid()
  out = subprocess.run([sys.executable, "-c", HOLDER, ROOT, workdir], input="", text=True,
                       capture_output=True, timeout=60)
  assert out.returncode == 0 and out.stdout.strip() == "locked", out.stderr


# ------------------------------------------------------------------ 6. a changed config

@pytest.fixture
def saved(tmp_path, config):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(make_state(3), config)
  ckpt.close()
  return str(tmp_path)


def test_a_config_that_changes_the_run_is_refused_before_orbax_reads(saved, config):
  for path in _data_files(os.path.join(saved, "checkpoints", "3")):
    os.remove(path)  # any attempt to read the arrays would fail
  config.batch_size, config.seed, config.dataset.name = 16, 1, "image_folder"
  config.optim.optimizer, config.input.flip, config.model.dropout_rate = "adam", False, 0.3
  expected = ["batch_size: checkpoint 8 vs config 16", "dataset.name: checkpoint 'demo' vs "
              "config 'image_folder'", "input.flip: checkpoint True vs config False",
              "model.dropout_rate: checkpoint 0.5 vs config 0.3",
              "optim.optimizer: checkpoint 'sgd' vs config 'adam'",
              "seed: checkpoint 0 vs config 1"]
  ckpt = checkpoint.Checkpointer(saved)
  with pytest.raises(checkpoint.CheckpointMismatch) as err:
    ckpt.restore(target(make_state(0)), config=config)
  assert err.value.differences == expected and checkpoint.ALLOW_CHANGES_FLAG in str(err.value)
  ckpt.close()


def test_the_learning_rate_and_schedule_may_change_and_are_reported(saved, config, caplog):
  config.optim.learning_rate, config.optim.schedule = 0.001, "piecewise"
  config.num_train_steps = 100
  ckpt = checkpoint.Checkpointer(saved)
  expected = ["num_train_steps: checkpoint 2 vs config 100",
              "optim.learning_rate: checkpoint 0.01 vs config 0.001",
              "optim.schedule: checkpoint 'plateau' vs config 'piecewise'"]
  assert_same(ckpt.restore(target(make_state(0)), config=config), make_state(3))
  logged = [w for w in warnings_in(caplog) if "changed config" in w]
  assert [w.split(": ", 1)[1] for w in logged] == expected
  ckpt.close()


def test_changes_allowed_explicitly_are_accepted_and_reported(saved, config, caplog):
  config.batch_size = 16
  ckpt = checkpoint.Checkpointer(saved)
  assert_same(ckpt.restore(target(make_state(0)), config=config, allow_changes=True),
              make_state(3))
  assert [w.split(": ", 1)[1] for w in warnings_in(caplog) if "changed config" in w] == [
      "batch_size: checkpoint 8 vs config 16"]
  ckpt.close()


def test_another_optimizer_even_when_allowed_is_a_clear_refusal(saved, config):
  config.optim.optimizer = "adam"
  ckpt = checkpoint.Checkpointer(saved)
  with pytest.raises(checkpoint.CheckpointMismatch, match="other arrays than this config's"):
    ckpt.restore(target(make_state(0, optimizer=optax.adam(1e-3))), config=config,
                 allow_changes=True)
  ckpt.close()


def test_eval_checks_only_the_network(saved, config, caplog):
  reader = checkpoint.Checkpointer(saved, read_only=True)
  config.batch_size, config.seed, config.model.compute_dtype = 16, 5, "bfloat16"
  assert_same(reader.restore(target(make_state(0)), config=config), make_state(3))
  assert not [w for w in warnings_in(caplog) if "changed config" in w]  # not even reported
  config.model.fc_features = (64, 64)
  with pytest.raises(checkpoint.CheckpointMismatch, match="another network") as err:
    reader.restore(target(make_state(0)), config=config)
  assert err.value.differences == ["model.fc_features: checkpoint [32, 32] vs config [64, 64]"]


# ------------------------------------------------------------------ meshes, meta, quiet readers

def test_a_sharded_checkpoint_restores_verified_on_other_meshes(tmp_path, config):
  devices = np.array(jax.devices())
  mesh8 = Mesh(devices.reshape(4, 2), ("data", "model"))
  state = jax.device_put(make_state(5), jax.tree.map(lambda s: s.sharding,
                                                     target(make_state(5), mesh8)))
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(state, config)
  ckpt.close()
  reader = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  for mesh in (None, Mesh(devices[:2].reshape(1, 2), ("data", "model"))):
    assert_same(reader.restore(target(make_state(0), mesh)), make_state(5))
  with open(tmp_path / "checkpoints" / "5" / "meta" / "metadata") as f:
    meta = json.load(f)
  assert meta["step"] == 5 and meta["config"]["batch_size"] == 8 and "data_position" not in meta
  assert meta["leaves"]["params.fc8.kernel"]["shape"] == [2, 64, 10]


def test_readers_log_no_orbax_read_only_warnings(saved, caplog):
  caplog.clear()
  reader = checkpoint.Checkpointer(saved, read_only=True)
  reader.restore(target(make_state(0)))
  reader.close()
  assert not [w for w in warnings_in(caplog) if "read only" in w or "read_only" in w]
