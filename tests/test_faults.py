"""Fault injection on the real program: each ordinary fault of a long run, survived.

Each test checks what a user would see (one clear line, the exit status) and what must
not be lost (checkpoints, final metrics, configs) on the tiny smoke config. Where the
process is the point (signals, a second process holding the workdir, flag parsing,
jax.distributed) the test runs `main.py` in a fresh process; elsewhere it calls the
same `cli.run` that main.py calls, in this process (no second import of TF and JAX).
Bad input files: tests/test_faults_data.py; checkpoint corruption, disk full and the
lock at the library level: tests/test_checkpoint.py.
"""

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from alexnet_jax import checkpoint, cli, parallel, steps
from conftest import ROOT, SMOKE_STEPS, smoke_config, smoke_flags

STEPS = SMOKE_STEPS


def _env(devices=8):
  # 8 fake devices as in this process (the device count is part of the compilation cache
  # key: the children then reuse this session's compiled steps).
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _main(workdir, flags, mode="train", extra=()):
  """main.py in a fresh process: where flag parsing or the process itself is tested."""
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}",
         f"--mode={mode}", *flags, *extra]
  return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


class _Out:
  """What a run showed the user: its exit status and its stderr (messages and logs)."""

  def __init__(self, returncode: int, stderr: str):
    self.returncode, self.stderr = returncode, stderr


@pytest.fixture
def run(smoke_cache, capsys, caplog):
  """cli.run (what main.py calls) in this process on the smoke config -> _Out."""
  caplog.set_level("INFO")

  def run(workdir, mode="train", *, allow_config_changes=False, step=None, images=(),
          **overrides):
    capsys.readouterr()
    caplog.clear()
    code = cli.run(mode, smoke_config(smoke_cache, **overrides), workdir, step=step,
                   images=images, allow_config_changes=allow_config_changes)
    return _Out(code, capsys.readouterr().err + caplog.text)

  return run


def _one_line_error(out) -> str:
  """The stderr of a user error: exit 2, no traceback, an 'error:' line."""
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, out.stderr[-3000:]
  return lines[0]


def _tree(workdir):
  """Every file under workdir with its size and mtime: to show nothing changed."""
  return {p: (os.path.getsize(p), os.path.getmtime(p))
          for p in glob.glob(f"{workdir}/**", recursive=True) if os.path.isfile(p)}


def _state(workdir, step=None):
  config = smoke_config(cache_dir="")  # the shared run's network and mesh (1 x 1)
  mesh = parallel.make_mesh(config, jax.devices()[:1])
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    return jax.device_get(ckpt.restore(steps.state_layout(config, mesh).abstract, step))
  finally:
    ckpt.close()


# ------------------------------------------------------------------ non-finite


def test_nonfinite_halts_naming_a_finite_checkpoint_and_rollback_skips_batches(run_copy, run):
  """A spike after step 4 (the rate raised 1e30-fold on resume, which is allowed): the
  halt names step 4, which really is finite, and nothing non-finite is ever saved."""
  spike = {"num_train_steps": 8, "optim.learning_rate": 1e28}
  line = _one_line_error(run(run_copy, **spike))
  assert "step 5: not finite" in line and "last finite checkpoint (step 4)" in line
  assert sorted(int(os.path.basename(p)) for p in glob.glob(f"{run_copy}/checkpoints/*")
                if os.path.basename(p).isdigit()) == [2, 4]
  out = run(run_copy, **spike, on_nonfinite="rollback", nonfinite_max_rollbacks=2)
  line = _one_line_error(out)
  assert "Gave up after 2 rollbacks" in line
  # Each rollback restored step 4 and skipped the batch of the bad step: positions 4, 5.
  assert out.stderr.count("rolled back to step 4") == 2
  assert "data position now 5" in out.stderr and "data position now 6" in out.stderr
  state = _state(run_copy)
  assert int(state.step) == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves((state.params, state.opt_state)))


def test_nonfinite_before_any_checkpoint_says_so(tmp_path, run, monkeypatch):
  """Also: a fresh start names the absolute checkpoint directory it found empty (a relative
  --workdir given from another directory is another workdir)."""
  monkeypatch.chdir(tmp_path)
  out = run("run", **{"optim.learning_rate": 1e28})
  line = _one_line_error(out)
  assert "step 1: not finite" in line and "no checkpoint was saved yet" in line
  assert f"No checkpoint in {tmp_path / 'run' / 'checkpoints'}: starting at step 0" in out.stderr


# ------------------------------------------------------------------ finishing twice


def test_rerunning_a_finished_run_changes_nothing(run_copy, run):
  before = _tree(run_copy)
  out = run(run_copy)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "already finished" in out.stderr
  assert _tree(run_copy) == before


def test_a_run_killed_during_its_final_evaluation_completes_it_on_rerun(run_copy, run):
  """Killed during the last evaluations, final_metrics.json was never written: the
  rerun evaluates the last checkpoint (no training step) and writes the same numbers."""
  path = os.path.join(run_copy, "final_metrics.json")
  want = json.load(open(path))
  os.remove(path)
  out = run(run_copy)
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.load(open(path))
  assert got["step"] == STEPS and "ten_crop_top1_error" in got
  for key in ("top1_error", "top5_error", "ten_crop_top1_error", "ten_crop_top5_error"):
    assert got[key] == pytest.approx(want[key]), key
  assert f"step {STEPS + 1}/" not in out.stderr and "loss" not in out.stderr.split("Resumed")[-1]


# ------------------------------------------------------------------ workdirs that cannot be written


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_a_workdir_that_cannot_be_a_directory_is_one_line(tmp_path, run, where):
  blocker = tmp_path / "results.txt"
  blocker.write_text("mine")
  workdir = blocker if where == "file" else blocker / "run"
  line = _one_line_error(run(str(workdir)))
  assert f"{blocker} is a file" in line and "nothing was written" in line
  assert blocker.read_text() == "mine" and os.listdir(tmp_path) == ["results.txt"]


def test_a_batch_larger_than_the_dataset_is_one_line(tmp_path, run):
  line = _one_line_error(run(str(tmp_path / "run"), batch_size=65536))
  assert "config.batch_size: 65536 exceeds the dataset's 80 training examples" in line
  assert not (tmp_path / "run").exists()


READ_ONLY_DRIVER = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from absl import logging
from alexnet_jax import cli
from conftest import smoke_config
logging.set_verbosity("info")  # as main.py's app.run does
for arg in sys.argv[2:]:
  workdir, steps, cache = arg.split(",")
  code = cli.run("train", smoke_config(cache, num_train_steps=int(steps)), workdir)
  print("EXIT", code, flush=True)
"""


@pytest.mark.slow
def test_a_read_only_workdir(run_copy, tmp_path, smoke_cache):
  """A workdir on a read-only mount (root ignores permission bits, so as root the test
  remounts the workdirs read-only in a private mount namespace; otherwise chmod a-w):
  rerunning a finished run reports it (nothing to write); resuming or starting is one
  line saying what to do; nothing is lost. A read-only dataset.cache_dir (e.g. under a
  read-only HOME) is named."""
  unfinished, fresh = str(tmp_path / "unfinished"), str(tmp_path / "fresh")
  cache = str(tmp_path / "cache")
  shutil.copytree(run_copy, unfinished)
  os.mkdir(fresh)
  os.mkdir(cache)
  dirs = [run_copy, unfinished, fresh, cache]
  before = {d: _tree(d) for d in dirs}
  cmd = [sys.executable, "-c", READ_ONLY_DRIVER, ROOT,
         f"{run_copy},{STEPS},{smoke_cache}", f"{unfinished},{STEPS + 2},{smoke_cache}",
         f"{fresh},{STEPS},{smoke_cache}", f"{tmp_path / 'elsewhere'},{STEPS},{cache}"]
  if os.geteuid() == 0:
    mounts = " && ".join(f"mount --bind {d} {d} && mount -o remount,ro,bind {d}" for d in dirs)
    cmd = ["unshare", "--mount", "sh", "-c",
           f'mount --make-rprivate / && {mounts} && exec "$@"', "sh", *cmd]
  else:
    for d in dirs:
      subprocess.run(["chmod", "-R", "a-w", d], check=True)
  out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
  if os.geteuid() != 0:
    for d in dirs:
      subprocess.run(["chmod", "-R", "u+w", d], check=True)
  codes = [int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("EXIT")]
  assert codes == [0, 2, 2, 2], out.stdout + out.stderr[-3000:]
  assert "Run already finished at step 4" in out.stderr
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 3 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert f"{unfinished} is not writable" in errors[0] and "resume from step 4" in errors[0]
  assert f"{fresh} is not writable" in errors[1] and "to start" in errors[1]
  assert all("--mode=eval" in e and "cp -r" in e for e in errors[:2])
  assert errors[2].startswith(f"error: config.dataset.cache_dir: '{cache}': {cache} is not "
                              "writable") and "--config.dataset.cache_dir=" in errors[2]
  assert {d: _tree(d) for d in dirs} == before


# ------------------------------------------------------------------ damaged side files


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("name", ["input_stats.npz", "dataset.json"])
def test_a_damaged_record_is_recomputed_on_resume(run_copy, run, name):
  """Derived files (the statistics and class names the run recorded): a half-written copy
  is one warning, recomputed from the dataset and written again; training goes on."""
  path = os.path.join(run_copy, name)
  want = (dict(np.load(path)) if name.endswith(".npz") else json.load(open(path)))
  _truncate(path)
  out = run(run_copy, num_train_steps=6)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"{name} is damaged" in out.stderr and "Traceback" not in out.stderr
  assert int(_state(run_copy).step) == 6
  if name.endswith(".npz"):
    got = dict(np.load(path))
    assert sorted(got) == sorted(want)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  else:
    assert json.load(open(path)) == want


def test_damaged_statistics_without_the_dataset_name_the_mend(run_copy, run, tmp_path):
  """Predict on a copied workdir (no training data) whose input_stats.npz is damaged:
  nothing to recompute it from, so one line says which file and how to mend it."""
  _truncate(os.path.join(run_copy, "input_stats.npz"))
  line = _one_line_error(run(run_copy, "predict", images=[__file__], **{
      "dataset.name": "image_folder", "dataset.image_folder": str(tmp_path / "gone")}))
  assert "input_stats.npz" in line and "damaged" in line and "copy" in line.lower()


def test_a_damaged_final_metrics_file_is_evaluated_again(run_copy, run):
  path = os.path.join(run_copy, "final_metrics.json")
  want = json.load(open(path))
  _truncate(path)
  out = run(run_copy)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "final_metrics.json is damaged" in out.stderr
  got = json.load(open(path))
  assert got["step"] == STEPS
  for key in ("top1_error", "top5_error", "ten_crop_top1_error", "ten_crop_top5_error"):
    assert got[key] == pytest.approx(want[key]), key


def test_a_damaged_statistics_cache_is_computed_again(tmp_path, caplog):
  from alexnet_jax import data
  from alexnet_jax.data import stats as stats_lib

  config = smoke_config(str(tmp_path / "cache"), **{"input.stats_max_images": 16})
  want = data.statistics(config)
  (cached,) = glob.glob(f"{tmp_path}/cache/stats/*.npz")
  _truncate(cached)
  with pytest.raises(stats_lib.Unreadable):
    stats_lib.load(cached)
  got = data.statistics(config)
  assert "is damaged" in caplog.text
  np.testing.assert_array_equal(got.mean_image, want.mean_image)
  np.testing.assert_array_equal(got.eigvecs, want.eigvecs)
  np.testing.assert_array_equal(stats_lib.load(cached).mean_rgb, want.mean_rgb)


# ------------------------------------------------------------------ config on resume


def test_a_changed_meaning_on_resume_is_refused_unless_allowed(run_copy, run):
  longer = dict(num_train_steps=6)
  before = _tree(run_copy)
  out = run(run_copy, batch_size=16, seed=3, **longer)
  _one_line_error(out)  # then one indented line per differing field
  message = out.stderr.split("error:")[1]
  assert "batch_size: checkpoint 8 vs config 16" in message and "seed:" in message
  assert "--allow_config_changes" in message
  assert _tree(run_copy) == before  # refused before anything was written
  # The rate may change (the paper lowered it by hand), logged; every config is kept.
  out = run(run_copy, **longer, **{"optim.learning_rate": 0.005})
  assert out.returncode == 0, out.stderr[-3000:]
  assert "optim.learning_rate" in out.stderr
  assert json.load(open(f"{run_copy}/configs/0.json"))["optim"]["learning_rate"] == 0.01
  assert json.load(open(f"{run_copy}/configs/4.json"))["optim"]["learning_rate"] == 0.005
  out = run(run_copy, allow_config_changes=True, batch_size=16, num_train_steps=7)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.load(open(f"{run_copy}/configs/6.json"))["batch_size"] == 16


# ------------------------------------------------------------------ two runs, one workdir


@pytest.mark.slow
def test_a_second_run_on_the_same_workdir_is_refused_and_a_dead_holder_is_taken_over(
    tmp_path, smoke_cache, run):
  workdir = str(tmp_path / "run")
  first = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}",
       *smoke_flags(smoke_cache, num_train_steps=100000, log_every_steps=1)],
      env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    for line in first.stderr:  # training has started: the lock is held
      if "step 1/" in line:
        break
    line = _one_line_error(run(workdir, num_train_steps=100000))
    assert f"pid {first.pid}" in line
    # Deleting .lock (the holder's details) does not let a second run in: the lock is
    # the directory's.
    os.remove(os.path.join(workdir, ".lock"))
    assert ".lock was deleted" in _one_line_error(run(workdir, num_train_steps=100000))
  finally:
    first.kill()  # like kill -9: no clean-up, the lock file stays behind
    first.wait()
  out = run(workdir, num_train_steps=2)
  assert out.returncode == 0, out.stderr[-3000:]


# ------------------------------------------------------------------ user errors, signals


@pytest.mark.parametrize("extra,needle", [
    (["--config.batch_sise=8"], "batch_sise"),
    (["--config=experiments/no_such_config.py"], "no_such_config.py"),
], ids=["misspelt_field", "missing_config"])
def test_flag_errors_are_one_line(finished_run, smoke_cache, extra, needle):
  """main.py's own flag parsing (before JAX is imported)."""
  before = _tree(finished_run)
  flags = smoke_flags(smoke_cache)
  if extra[0].startswith("--config="):  # another config file: it comes before its fields
    flags, extra = extra + flags[1:], []
  assert needle in _one_line_error(_main(finished_run, flags, extra=extra))
  assert _tree(finished_run) == before


@pytest.mark.parametrize("source,needles", [
    ("def get_config(:\n  pass\n", ["SyntaxError", "line 1"]),
    ("def get_config():\n  raise RuntimeError('no such preset')\n",
     ["RuntimeError: no such preset", "line 2"]),
    ("def get_config():\n  return {'seed': 0}\n", ["returned a dict", "ConfigDict"]),
], ids=["syntax_error", "get_config_raises", "plain_dict"])
def test_a_config_file_that_fails_is_one_line(tmp_path, source, needles):
  """main.py's own loading of the --config file: which file, where, what; nothing written."""
  path = tmp_path / "broken.py"
  path.write_text(source)
  line = _one_line_error(_main(tmp_path / "run", [f"--config={path}"]))
  for needle in needles:
    assert needle in line, line
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mode,kwargs,needle", [
    ("predict", {"images": ["/nonexistent.jpg"]}, "/nonexistent.jpg"),
    ("eval", {"step": 3}, "step 3"),
], ids=["missing_image", "missing_step"])
def test_user_errors_are_one_line(finished_run, run, mode, kwargs, needle):
  before = _tree(finished_run)
  assert needle in _one_line_error(run(finished_run, mode, **kwargs))
  assert _tree(finished_run) == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_before_training_starts_is_one_line(tmp_path, smoke_cache, sig):
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={tmp_path / 'run'}",
       *smoke_flags(smoke_cache)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)
  time.sleep(1.0)  # importing: long before the training loop
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + sig, err[-3000:]
  assert "Traceback" not in err and f"stopped by {sig.name}" in err


def test_sighup_in_the_loop_saves_like_sigterm(tmp_path, run, monkeypatch):
  """A closed terminal or SSH session (SIGHUP) mid-training: the step finishes, is saved,
  and the run exits 0 telling how to resume; rerun, it continues from that step."""
  from alexnet_jax.run import train

  workdir = str(tmp_path / "run")
  real_step = train.steps.step_rng

  def hang_up_at_step_3(state):  # called once per step, in the main thread
    if int(jax.device_get(state.step)) == 2:
      os.kill(os.getpid(), signal.SIGHUP)
    return real_step(state)

  monkeypatch.setattr(train.steps, "step_rng", hang_up_at_step_3)
  out = run(workdir, num_train_steps=100, checkpoint_every_steps=100, eval_every_steps=100)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "SIGHUP received: saved step 3" in out.stderr
  monkeypatch.undo()
  out = run(workdir, num_train_steps=4, checkpoint_every_steps=100, eval_every_steps=100)
  assert out.returncode == 0 and "at step 3" in out.stderr, out.stderr[-3000:]


def test_a_stop_during_the_final_ten_crop_evaluation_is_one_line(run_copy, run, monkeypatch):
  """SIGTERM while TensorFlow traces the ten-crop input (the last minutes of a run): TF
  wraps the stop in its own StagingError; the user still gets one line and 128 + 15, and
  the rerun completes the final metrics (test above)."""
  from alexnet_jax import cli
  from alexnet_jax.data import pipeline

  def stopped(*args, **kwargs):
    raise cli.Stopped(signal.SIGTERM)

  os.remove(os.path.join(run_copy, "final_metrics.json"))
  monkeypatch.setattr(pipeline, "ten_crops", stopped)
  out = run(run_copy)
  assert out.returncode == 128 + signal.SIGTERM, out.stderr[-3000:]
  assert "Traceback" not in out.stderr and "stopped by SIGTERM" in out.stderr
  assert "checkpoints in" in out.stderr and "intact" in out.stderr


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, smoke_cache):
  workdir = str(tmp_path / "run")
  port = _free_port()
  flags = smoke_flags(smoke_cache, num_train_steps=100000, log_every_steps=1,
                      checkpoint_every_steps=100000, eval_every_steps=100000,
                      **{"mesh.data": 2, "mesh.model": 1})
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
       *flags], env=_env(devices=1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  try:
    for line in procs[0].stderr:  # process 0 logs the steps
      if "step 3/" in line:
        break
    procs[1].send_signal(signal.SIGTERM)  # only process 1 is told
    logs = [p.stderr.read() for p in procs]
    codes = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert codes == [0, 0], logs[0][-2000:] + logs[1][-2000:]
  saved = [int(s) for log in logs for s in re.findall(r"received: saved step (\d+)", log)]
  assert len(saved) == 2 and saved[0] == saved[1], logs
  assert os.path.isdir(f"{workdir}/checkpoints/{saved[0]}")
