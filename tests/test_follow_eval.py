"""An evaluator beside a live training run: --mode=eval --follow, and readers racing the
trainer's deletion of old checkpoints; --mode=eval and predict on a read-only workdir.

  .venv/bin/python -m pytest -q tests/test_follow_eval.py
"""

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from alexnet_jax import checkpoint, cli
from alexnet_jax.checkpoint import store
from alexnet_jax.data import demo
from alexnet_jax.run import evaluate, setup
from conftest import ROOT, smoke_config, smoke_flags

_REPORTED = re.compile(r"^step (\d+), \d+ \w+ images", re.M)


def _evaluated(out: str) -> list[int]:
  """The steps an evaluator's output reports, in order (one line each)."""
  return [int(s) for s in _REPORTED.findall(out)]


def _no_damage_said(text: str) -> None:
  for words in ("damaged", "not usable", "move them", "Traceback"):
    assert words not in text, f"{words!r} in:\n{text[-3000:]}"


def _restore_target(workdir: str, cache: str):
  config = smoke_config(cache)
  return config, setup.build(config, workdir, mode="predict").layout.abstract


# ------------------------------------------------------------------ the race, in store.py

def test_a_step_deleted_after_listing_is_gone_not_damaged(run_copy, smoke_cache, caplog,
                                                          monkeypatch):
  """A reader lists steps 2 and 4; the trainer (here: rmtree, as orbax deletes) removes a
  step before or while it is read. The reader says "went away" (INFO), falls back to the
  newest step left or raises CheckpointGone for an explicit step, and never calls it
  damaged, warns, moves anything or advises moving."""
  config, abstract = _restore_target(run_copy, smoke_cache)
  steps_dir = os.path.join(run_copy, "checkpoints")
  readers = [checkpoint.Checkpointer(run_copy, read_only=True) for _ in range(2)]
  assert [r.all_steps() for r in readers] == [[2, 4], [2, 4]]
  shutil.rmtree(os.path.join(steps_dir, "4"))  # both listings are now stale
  caplog.set_level(logging.INFO)

  with pytest.raises(checkpoint.CheckpointGone) as err:
    readers[0].restore(abstract, 4, config=config)
  assert "went away while it was read" in str(err.value) and "available now: [2]" in str(
      err.value)
  state = readers[1].restore(abstract, config=config)  # the newest one left
  assert int(state.step) == 2
  assert [r.getMessage() for r in caplog.records if "went away" in r.getMessage()
          and r.levelno == logging.INFO]

  # Half deleted and still listed (a newer step is there): the reader waits for it to
  # leave the listing. Step 2 loses a file now and the rest a moment later.
  readers.append(checkpoint.Checkpointer(run_copy, read_only=True))
  shutil.copytree(os.path.join(steps_dir, "2"), os.path.join(steps_dir, "6"))
  readers[2].refresh()
  os.remove(os.path.join(steps_dir, "2", "state", "manifest.ocdbt"))
  remover = threading.Timer(0.3, shutil.rmtree, [os.path.join(steps_dir, "2")])
  remover.start()
  with pytest.raises(checkpoint.CheckpointGone):
    readers[2].restore(abstract, 2, config=config)
  remover.join()
  assert all(r.levelno < logging.WARNING for r in caplog.records), [
      r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

  # Damage that stays (no writer deletes it) is damage, after the wait.
  monkeypatch.setattr(store, "DELETION_WAIT_SECONDS", 0.3)
  shutil.copytree(os.path.join(steps_dir, "6"), os.path.join(steps_dir, "5"))
  os.remove(os.path.join(steps_dir, "5", "state", "manifest.ocdbt"))
  readers[2].refresh()
  with pytest.raises(checkpoint.CheckpointCorrupt, match="step 5 .* is damaged"):
    readers[2].restore(abstract, 5, config=config)
  for r in readers:
    r.close()
  assert not os.path.exists(os.path.join(run_copy, checkpoint.DAMAGED_DIR))


def test_a_reader_finding_no_intact_step_never_advises_moving_them(run_copy, smoke_cache,
                                                                  monkeypatch):
  """What a reader says when every step is damaged: nothing about moving a (possibly live)
  run's checkpoints (a writer, which holds the lock, still says it:
  test_checkpoint.py::test_no_intact_checkpoint_is_one_clear_error_and_moves_nothing)."""
  monkeypatch.setattr(store, "DELETION_WAIT_SECONDS", 0.3)  # step 2 is not the newest
  config, abstract = _restore_target(run_copy, smoke_cache)
  os.remove(os.path.join(run_copy, "checkpoints", "4", "state", "manifest.ocdbt"))
  os.remove(os.path.join(run_copy, "checkpoints", "2", "state", "_METADATA"))
  reader = checkpoint.Checkpointer(run_copy, read_only=True)
  with pytest.raises(checkpoint.CheckpointCorrupt) as err:
    reader.restore(abstract, config=config)
  reader.close()
  assert "no intact checkpoint" in str(err.value) and "move" not in str(err.value)
  assert set(err.value.problems) == {2, 4}


# ------------------------------------------------------------------ follow mode

@contextlib.contextmanager
def _sigterm_once(path: str):
  """Sends this process one SIGTERM as soon as `path` exists (cli.stop_signals turns it
  into a stop): a follower stopped between two steps, as by a user or a scheduler."""
  done = threading.Event()

  def watch():
    while not done.is_set():
      if os.path.exists(path):
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.01)

  watcher = threading.Thread(target=watch, daemon=True)
  watcher.start()
  try:
    with cli.stop_signals():
      yield
  finally:
    done.set()
    watcher.join()


def test_a_stopped_follower_resumes_without_evaluating_again(run_copy, smoke_cache, capsys):
  """The shared finished run (steps 2 and 4, final metrics): a follower stopped by SIGTERM
  once it reported step 2 says so in one line (exit 143); restarted, it resumes after the
  last step it reported and ends by itself after the run's last step (4). Each step is
  evaluated once over both runs, with TensorBoard scalars in DIR/eval/."""
  config = smoke_config(smoke_cache, eval_follow_poll_seconds=0.1)
  first_report = os.path.join(run_copy, "eval", "2.json")
  with _sigterm_once(first_report):
    status = cli.run("eval", config, run_copy, follow=True)
  first = capsys.readouterr()
  assert status == 128 + signal.SIGTERM, first.err[-3000:]
  assert "stopped by SIGTERM" in first.err
  reported_at = os.path.getmtime(first_report)

  assert cli.run("eval", config, run_copy, follow=True) == 0
  second = capsys.readouterr()
  # The stop came once 2.json was written (its line may or may not have been printed).
  assert set(_evaluated(first.out)) <= {2} and _evaluated(second.out) == [4]
  assert os.path.getmtime(first_report) == reported_at
  assert evaluate.reported_steps(run_copy) == [2, 4]
  with open(os.path.join(run_copy, "eval", "4.json")) as f:
    assert json.load(f)["step"] == 4
  acc = event_accumulator.EventAccumulator(os.path.join(run_copy, "eval"),
                                           size_guidance={"tensors": 0})
  acc.Reload()
  for tag in ("eval/top1_error", "eval_ten_crop/top1_error"):
    assert sorted({e.step for e in acc.Tensors(tag)}) == [2, 4], tag  # a stop may repeat one
    assert all(0 <= float(tf.make_ndarray(e.tensor_proto)) <= 1 for e in acc.Tensors(tag))
  _no_damage_said(first.err + second.err)

  # A finished run whose steps are all reported: nothing to do, exit 0 at once.
  assert cli.run("eval", config, run_copy, follow=True) == 0
  assert _evaluated(capsys.readouterr().out) == []
  # --follow with --step is a contradiction: one line.
  assert cli.run("eval", config, run_copy, step=2, follow=True) == 2


@pytest.mark.slow
# pytest swaps sys.unraisablehook during a test, so the hook that drops what orbax's
# abandoned reads print in main.py (checkpoint.errors.drop_orbax_leftovers) is not the
# one that sees them here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_follow_beside_a_live_trainer_evaluates_each_step_once(finished_run, smoke_cache,
                                                               tmp_path, capsys, caplog):
  """A real trainer (main.py, its own process) and a follower (--mode=eval --follow,
  in-process: the trainer's process boundary is the point) side by side on one workdir,
  started together: the trainer saves every step and keeps one (keep_checkpoints=1: it
  deletes each step right after saving the next, so the follower's reads race its
  deletions). The follower waits for the first checkpoint, evaluates each step it gets
  exactly once, skips those deleted first without calling them damaged, sets nothing
  aside and returns 0 by itself after the last step. (finished_run: the same steps,
  compiled once per session and cached for the trainer's process.)"""
  del finished_run
  workdir = str(tmp_path / "run")
  last = 20
  overrides = {"num_train_steps": last, "checkpoint_every_steps": 1, "eval_every_steps": last,
               "eval_ten_crop": False, "keep_checkpoints": 1, "eval_follow_poll_seconds": 0.2}
  trainer = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}",
       *smoke_flags(smoke_cache, **overrides)], cwd=ROOT, env={**os.environ,
                                                               "JAX_PLATFORMS": "cpu"},
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  caplog.set_level(logging.INFO)
  try:
    status = cli.run("eval", smoke_config(smoke_cache, **overrides), workdir, follow=True)
    trainer_out, _ = trainer.communicate(timeout=120)
  finally:
    if trainer.poll() is None:
      trainer.kill()
  assert trainer.returncode == 0, trainer_out[-3000:]
  out = capsys.readouterr()
  log = "\n".join(r.getMessage() for r in caplog.records)
  assert status == 0, out.err[-3000:]
  steps = _evaluated(out.out)
  assert steps and steps == sorted(set(steps)), out.out  # each once, in order
  assert steps[-1] == last
  assert evaluate.reported_steps(workdir) == steps
  _no_damage_said(out.out + out.err + log + trainer_out)
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
  assert not os.path.exists(os.path.join(workdir, checkpoint.DAMAGED_DIR))
  print(f"follower evaluated {steps}; skipped as deleted: {log.count('before it was')}, "
        f"went away while read: {log.count('went away')}")


# ------------------------------------------------------------------ a read-only workdir

@contextlib.contextmanager
def _read_only(path: str):
  """`path` made read-only for real. As root (this sandbox) permission bits are ignored,
  so it is bind-mounted read-only onto itself (writes fail with EROFS, as on a read-only
  disk or snapshot); otherwise its write bits are cleared (EACCES)."""
  if os.geteuid() == 0:
    for cmd in (["mount", "--bind", path, path], ["mount", "-o", "remount,ro,bind", path]):
      out = subprocess.run(cmd, capture_output=True, text=True)
      if out.returncode:
        subprocess.run(["umount", path], capture_output=True)
        pytest.skip(f"cannot make a read-only bind mount here: {out.stderr.strip()}")
    try:
      yield
    finally:
      subprocess.run(["umount", path], check=True)
    return
  modes = {}
  for d, _, files in os.walk(path):
    for p in [d, *(os.path.join(d, f) for f in files)]:
      modes[p] = os.stat(p).st_mode
      os.chmod(p, modes[p] & ~0o222)
  try:
    yield
  finally:
    for p, mode in modes.items():
      os.chmod(p, mode)


def test_eval_and_predict_on_a_read_only_workdir(run_copy, smoke_cache, capsys, caplog):
  """--mode=eval evaluates and prints its result, with one warning that eval/<step>.json
  could not be written and why; predict is unchanged. Nothing is written."""
  config = smoke_config(smoke_cache)
  before = sorted(os.listdir(run_copy))
  image = sorted(glob.glob(os.path.join(demo.ensure_demo_tree(config), "val", "*",
                                        "*.JPEG")))[0]
  with _read_only(run_copy):
    with pytest.raises(OSError):  # it is read-only for real
      open(os.path.join(run_copy, "probe"), "w")
    assert cli.run("eval", config, run_copy) == 0
    eval_out = capsys.readouterr().out
    assert cli.run("predict", config, run_copy, images=[image]) == 0
    predict_out = capsys.readouterr().out
  assert _evaluated(eval_out) == [4]
  warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warned) == 1 and "could not write" in warned[0] and "4.json" in warned[0], warned
  assert re.search(r"\((Read-only file system|Permission denied)\)", warned[0]), warned
  assert predict_out.startswith(image + "\n") and predict_out.count("%") == 5
  assert sorted(os.listdir(run_copy)) == before
