"""The training driver end to end: train, resume, rollback, signals, eval, predict, processes.

Runs are in-process (`cli.run`, `train.train_and_evaluate`, on conftest's 8 fake CPU
devices) wherever the process boundary is not what is tested: SIGTERM, the two-process
jax.distributed runs and main.py's flag parsing start real processes. One trained
workdir is shared by the module; a test copies it before changing anything. The network
sees 64-pixel inputs (the smallest the smoke stack takes) unless the geometry is the point.
"""

import contextlib
import glob
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from alexnet_jax import checkpoint, cli, data, model, parallel, steps
from alexnet_jax.run import evaluate, setup, train
from conftest import ROOT, SMOKE_GEOMETRY
from experiments import alexnet

SMALL = SMOKE_GEOMETRY
TRAINED = dict(num_train_steps=3, eval_every_steps=3, checkpoint_every_steps=2,
               **{"mesh.data": 4, "mesh.model": 2})


@pytest.fixture(scope="module")
def cache_dir(smoke_cache):
  return smoke_cache  # the session's demo data and statistics


def _config(cache_dir, **overrides):
  config = alexnet.get_config("smoke")
  config.dataset.cache_dir = cache_dir
  config.eval_ten_crop = False
  config.update_from_flattened_dict({**SMALL, **overrides})
  return config


def _flags(cache_dir, **overrides):
  flags = [f"--config={ROOT}/experiments/alexnet.py:smoke",
           f"--config.dataset.cache_dir={cache_dir}", "--config.eval_ten_crop=false"]
  return flags + [f"--config.{k}={v}" for k, v in {**SMALL, **overrides}.items()]


def _env(devices=1):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu")


def _main(workdir, flags, devices=1, mode="train"):
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}",
         f"--mode={mode}", *flags]
  return subprocess.run(cmd, env=_env(devices), capture_output=True, text=True, timeout=300)


def _params(workdir, config, step=None):
  """The checkpointed state, restored onto one device whatever mesh wrote it."""
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.model = 1, 1
  mesh = parallel.make_mesh(config, jax.devices()[:1])
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  state = ckpt.restore(steps.state_layout(config, mesh).abstract, step)
  ckpt.close()
  return jax.device_get(state)


def _scalars(workdir, tag):
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  acc.Reload()
  return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


def _written(workdir, tag):
  """[(step, value)] of `tag` in the order written, repeats included (EventAccumulator
  would purge a step written again)."""
  out = []
  for path in sorted(glob.glob(f"{workdir}/events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag == tag:
          out.append((event.step, float(tf.make_ndarray(v.tensor))))
  return out


def _run(mode, config, workdir, **kwargs):
  """cli.run in this process: (exit status, its stdout)."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    status = cli.run(mode, config, workdir, **kwargs)
  return status, out.getvalue()


def _copy(workdir, tmp_path, name="run"):
  shutil.copytree(workdir, tmp_path / name)
  return str(tmp_path / name)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
  """A smoke run trained by --mode=train on 8 devices (data 4 x model 2), figures drawn:
  (workdir, what it printed). Tests copy it before changing it."""
  workdir = str(tmp_path_factory.mktemp("trained") / "run")
  status, out = _run("train", _config(cache_dir, **TRAINED, **{"figures.enabled": True}),
                     workdir)
  assert status == 0, out
  return workdir, out


# ------------------------------------------------------------------ training


def test_train_mode_logs_checkpoints_evaluates_and_draws(trained):
  workdir, out = trained
  assert "Done. Results in" in out
  losses = _scalars(workdir, "train/loss")
  assert sorted(losses) == [1, 2, 3] and all(np.isfinite(list(losses.values())))
  assert set(_scalars(workdir, "eval/top1_error")) == {3}
  for tag in ("train/learning_rate", "train/images_per_second", "train/data_wait_fraction"):
    assert _scalars(workdir, tag), tag
  assert sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/*")) == [2, 3]
  final = json.load(open(f"{workdir}/final_metrics.json"))
  assert final["step"] == 3 and 0.0 <= final["top1_error"] <= 1.0
  assert json.load(open(f"{workdir}/config.json"))["num_train_steps"] == 3
  assert json.load(open(f"{workdir}/configs/0.json"))["num_train_steps"] == 3
  for name in ("conv1_kernels.png", "neighbours.png", "training_curves.png"):
    assert os.path.getsize(f"{workdir}/figures/{name}") > 1000, name


def test_itstime_on_multiples_and_the_last_step():
  assert [s for s in range(1, 11) if train._itstime(s, 4, 10)] == [4, 8, 10]
  assert [s for s in range(1, 4) if train._itstime(s, 100, 3)] == [3]


def test_resume_equals_an_uninterrupted_run(tmp_path, cache_dir):
  # dropout on, plateau schedule fed every 2 steps: all of it must resume exactly.
  common = dict(eval_every_steps=2, checkpoint_every_steps=2, log_every_steps=1)
  whole = str(tmp_path / "whole")
  train.train_and_evaluate(_config(cache_dir, num_train_steps=4, **common), whole)
  parts = str(tmp_path / "parts")
  train.train_and_evaluate(_config(cache_dir, num_train_steps=2, **common), parts)
  train.train_and_evaluate(_config(cache_dir, num_train_steps=4, **common), parts)
  config = _config(cache_dir, num_train_steps=4)
  a, b = _params(whole, config), _params(parts, config)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  for tag in ("train/loss", "train/top1_error", "eval/top1_error"):
    want, got = _scalars(whole, tag), _scalars(parts, tag)
    for step in (3, 4):
      if step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6), (tag, step)


def test_rollback_writes_each_step_once_and_times_only_the_replay(tmp_path, cache_dir,
                                                                   monkeypatch, caplog):
  """Two transient non-finite results (steps 6 and 11, each on its first attempt only),
  rolled back to steps 4 and 8. TensorBoard's curves never go back in time: a step
  written before a rollback (10) is not written again by the replay. The first summary
  after a rollback times the replayed steps only, not the discarded attempt."""
  clock = [0.0]  # fake seconds: each training step takes 1, the faulty ones 11
  monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
  real_make_train_step, faulted = steps.make_train_step, set()

  def make_faulty_train_step(*args):
    train_step = real_make_train_step(*args)

    def faulty(state, batch, rng):
      step = int(jax.device_get(state.step)) + 1
      state, metrics = train_step(state, batch, rng)
      clock[0] += 1.0
      if step in (6, 11) and step not in faulted:
        faulted.add(step)
        clock[0] += 10.0
        metrics = {**metrics, "finite": jnp.array(False), "loss": jnp.array(np.nan)}
      return state, metrics
    return faulty

  monkeypatch.setattr(steps, "make_train_step", make_faulty_train_step)
  caplog.set_level(logging.INFO)
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(_config(
      cache_dir, num_train_steps=12, log_every_steps=2, checkpoint_every_steps=4,
      eval_every_steps=12, on_nonfinite="rollback", nonfinite_max_rollbacks=2), workdir)
  assert final["step"] == 12 and faulted == {6, 11}
  assert "rolled back to step 4" in caplog.text and "rolled back to step 8" in caplog.text
  for tag in ("train/loss", "train/steps_per_second", "train/bad_images"):
    assert [s for s, _ in _written(workdir, tag)] == [2, 4, 6, 8, 10, 12], tag
  # Without a new window at the rollback, step 6 would count 4 steps in 14 s (0.29/s).
  assert [v for _, v in _written(workdir, "train/steps_per_second")] == [1.0] * 6
  assert all(np.isfinite(v) for _, v in _written(workdir, "train/loss"))


def _jpeg(path, seed):
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
  Image.fromarray(small).resize((80, 72), Image.BILINEAR).save(path, "JPEG", quality=90)


def test_evaluation_skips_are_evaluations_not_training_bad_images(tmp_path):
  """A bad file in val/ only: evaluation counts it (num_skipped); train/bad_images stays 0."""
  root = tmp_path / "images"
  for split in ("train", "val"):
    for c in range(10):  # the smoke network's 10 classes: its compiled steps are reused
      (root / split / f"c{c}").mkdir(parents=True)
      _jpeg(root / split / f"c{c}" / "0.JPEG", c + (50 if split == "val" else 0))
  (root / "val" / "c1" / "empty.JPEG").write_bytes(b"")
  config = _config(str(tmp_path / "cache"), num_train_steps=4, eval_every_steps=2,
                   checkpoint_every_steps=2, **{"dataset.name": "image_folder",
                                                "dataset.image_folder": str(root)})
  workdir = str(tmp_path / "run")
  final = train.train_and_evaluate(config, workdir)
  assert final["num_skipped"] == 1 and final["num_examples"] == 10
  assert _scalars(workdir, "eval/num_skipped") == {2: 1.0, 4: 1.0}
  assert _scalars(workdir, "train/bad_images") == {1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0}


def test_a_rerun_after_a_kill_in_the_final_evaluation_builds_no_training(
    trained, cache_dir, tmp_path, monkeypatch):
  """final_metrics.json missing (killed during the last evaluation): the rerun evaluates
  the last checkpoint without a training stream (statistics, square cache) or train step."""
  workdir = _copy(trained[0], tmp_path)
  want = json.load(open(f"{workdir}/final_metrics.json"))
  os.remove(f"{workdir}/final_metrics.json")

  def not_needed(*args, **kwargs):
    raise AssertionError("the rerun built training")

  monkeypatch.setattr(data, "train_batches", not_needed)
  monkeypatch.setattr(steps, "make_train_step", not_needed)
  got = train.train_and_evaluate(_config(cache_dir, **TRAINED), workdir)
  assert got == json.load(open(f"{workdir}/final_metrics.json"))
  assert got["step"] == 3
  for key in ("top1_error", "top5_error", "loss", "num_examples"):
    assert got[key] == pytest.approx(want[key]), key


@pytest.mark.slow
def test_sigterm_saves_and_the_restart_continues(tmp_path, cache_dir, caplog):
  workdir = str(tmp_path / "run")
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}",
         *_flags(cache_dir, num_train_steps=100000, checkpoint_every_steps=100000,
                 eval_every_steps=100000)]
  proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  lines = []
  for line in proc.stdout:  # wait until it is really training
    lines.append(line)
    if " step 3/" in line:
      break
  proc.send_signal(signal.SIGTERM)
  rest, _ = proc.communicate(timeout=120)
  log = "".join(lines) + rest
  assert proc.returncode == 0, log[-3000:]
  assert "SIGTERM received: saved step" in log and "Resume with the same command" in log
  saved = checkpoint.Checkpointer(workdir, read_only=True).latest_step()
  assert saved >= 3
  # The restart, in this process (on its 8 devices: a resume may change the mesh).
  caplog.set_level(logging.INFO)
  status, _ = _run("train", _config(cache_dir, num_train_steps=saved + 1), workdir)
  assert status == 0
  assert f"Resumed from {workdir}/checkpoints at step {saved}" in caplog.text
  assert sorted(_scalars(workdir, "train/loss"))[-1] == saved + 1


# ------------------------------------------------------------------ eval and predict


def test_eval_mode_on_another_mesh_writes_the_report(trained, cache_dir, tmp_path):
  workdir = _copy(trained[0], tmp_path)
  status, _ = _run("eval", _config(cache_dir, **{"mesh.data": 2, "mesh.model": 1}), workdir)
  assert status == 0
  report = json.load(open(f"{workdir}/eval/3.json"))
  assert report["step"] == 3 and report["split"] == "validation"
  assert report["num_examples"] == 40  # smoke demo: 10 classes x 4, every one counted
  for view in ("center_crop", "ten_crop"):
    assert set(report[view]) == {"top1_error", "top5_error", "loss"}
    assert 0.0 <= report[view]["top5_error"] <= report[view]["top1_error"] <= 1.0
  # The same numbers as an evaluation on all 8 devices (data 4 x model 2).
  config = _config(cache_dir)
  run = setup.build(config, workdir, mode="eval")
  state = evaluate.restore(run, workdir)
  centre = evaluate.evaluate(run, state, steps.make_eval_step(config, run.layout),
                             ten_crop=False)
  assert centre["top1_error"] == pytest.approx(report["center_crop"]["top1_error"])
  assert centre["loss"] == pytest.approx(report["center_crop"]["loss"], rel=1e-5)


def _printed_top5(stdout, paths):
  """{path: [(probability, class words)]} from predict's output."""
  out = {}
  for path in paths:
    block = stdout.split(path + "\n")[1].splitlines()[:5]
    rows = [re.fullmatch(r"\s+([\d.]+)%\s+(.+)", line) for line in block]
    assert all(rows), block
    out[path] = [(float(r[1]) / 100, r[2]) for r in rows]
  return out


def test_predict_prints_the_models_top5_for_real_images(trained, cache_dir, shared_data):
  """The printed classes and probabilities are the network's own: a softmax of its
  logits computed here on one device from the checkpoint, independently of predict."""
  workdir = trained[0]
  images = sorted(glob.glob(f"{shared_data}/imagenet-tiny/val/*/*.JPEG"))[:2]
  config = _config(cache_dir)
  status, out = _run("predict", config, workdir, images=images)
  assert status == 0
  printed = _printed_top5(out, images)
  run = setup.build(config, workdir, mode="predict")
  x = data.preprocess_image_files(config, images, stats=run.stats)
  params = _params(workdir, config).params
  probs = np.asarray(jax.nn.softmax(model.AlexNet(config.model).apply(params, x, train=False)))
  names = evaluate.readable_names(run.class_names)
  for path, p in zip(images, probs, strict=True):
    top = printed[path]
    assert len(top) == 5 and [q for q, _ in top] == sorted((q for q, _ in top), reverse=True)
    for q, name in top:  # each printed probability is that class's, to the 2 decimals shown
      assert q == pytest.approx(p[names.index(name)], abs=6e-5), (path, name)
    shown = {names.index(name) for _, name in top}
    assert min(p[i] for i in shown) >= max(p[i] for i in range(len(p)) if i not in shown) - 1e-6


def test_imagenet_class_words_for_a_subset_of_ilsvrc_wnids():
  # An image folder of some ILSVRC classes (e.g. Imagenette) gets words; other names stay
  # (the 1000-class order is checked in test_evaluate against TFDS's labels).
  assert evaluate.readable_names(["n01440764", "circle"]) == ["tench, Tinca tinca", "circle"]


def test_a_copied_workdir_predicts_and_evaluates_without_the_dataset(trained, cache_dir,
                                                                     tmp_path):
  """A workdir carries its class names and input statistics: moved elsewhere, with the
  dataset and the statistics cache out of reach (a cache_dir that does not exist),
  predict gives the same top-5 and eval works on a folder of validation images only."""
  workdir = _copy(trained[0], tmp_path)
  demo_val = sorted(glob.glob(f"{cache_dir}/demo*/val/*/*.*"))
  assert demo_val, os.listdir(cache_dir)
  images = []
  for i, path in enumerate(demo_val[::10][:2]):  # outside the dataset
    images.append(str(tmp_path / f"query{i}{os.path.splitext(path)[1]}"))
    shutil.copy(path, images[-1])
  val_copy = tmp_path / "val_only" / "val"
  shutil.copytree(os.path.dirname(os.path.dirname(demo_val[0])), val_copy)
  status, before = _run("predict", _config(cache_dir), workdir, images=images)
  assert status == 0

  moved = tmp_path / "elsewhere" / "run"
  shutil.move(workdir, moved)
  gone = tmp_path / "gone_cache"
  status, after = _run("predict", _config(str(gone)), str(moved), images=images)
  assert status == 0
  assert after == before and "%" in after
  assert not gone.exists()  # nothing regenerated: the workdir was enough

  # Evaluation needs validation images, not the training set: a folder of val/ only.
  config = _config(str(gone), **{"dataset.name": "image_folder",
                                 "dataset.image_folder": str(val_copy.parent)})
  status, _ = _run("eval", config, str(moved))
  assert status == 0
  assert json.load(open(moved / "eval" / "3.json"))["num_examples"] == 40


# ------------------------------------------------------------------ user errors


def test_mismatched_checkpoint_is_refused_and_nothing_overwritten(trained, cache_dir, capsys,
                                                                   tmp_path):
  workdir = _copy(trained[0], tmp_path)
  before = {p: os.path.getmtime(p) for p in glob.glob(f"{workdir}/**", recursive=True)}
  config = _config(cache_dir, **{"model.fc_features": (64, 64), "num_train_steps": 4})
  assert cli.run("train", config, workdir) == 2
  err = capsys.readouterr().err
  assert "another network" in err and "model.fc_features" in err
  after = {p: os.path.getmtime(p) for p in glob.glob(f"{workdir}/**", recursive=True)}
  assert after == before


def test_unknown_config_field_is_an_error(tmp_path, cache_dir):
  # main.py's flag parsing is the point: a real process (it fails before importing JAX).
  out = _main(str(tmp_path), _flags(cache_dir, **{"model.widht": 3}))
  assert out.returncode != 0 and "widht" in out.stderr
  assert not os.listdir(tmp_path)


def test_bad_value_is_rejected_before_compiling(tmp_path, cache_dir, monkeypatch, capsys):
  def compiled(*args, **kwargs):
    raise AssertionError("a step was built before the config was checked")

  for name in ("state_layout", "create_train_state", "make_train_step"):
    monkeypatch.setattr(steps, name, compiled)
  assert cli.run("train", _config(cache_dir, batch_size=-4), str(tmp_path / "w")) == 2
  assert "config.batch_size" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "w")  # nothing written either


def test_missing_dataset_is_a_clear_error(tmp_path, cache_dir, capsys):
  config = _config(cache_dir, **{"dataset.name": "image_folder",
                                 "dataset.image_folder": str(tmp_path / "nowhere")})
  assert cli.run("train", config, str(tmp_path / "w")) == 2
  err = capsys.readouterr().err
  assert "dataset.image_folder" in err and "nowhere" in err
  assert not os.path.exists(tmp_path / "w")


# ------------------------------------------------------------------ processes


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("data_axis,model_axis", [(2, 2), (1, 2)],
                         ids=["replica_per_process", "tower_per_process"])
@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, cache_dir, data_axis, model_axis):
  """Two processes train as one (here, on the first data x model of this process's
  devices); with (1, 2) the towers of one replica sit in different processes, which must
  then read the same examples (shares follow the mesh)."""
  overrides = dict(num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=2,
                   **{"mesh.data": data_axis, "mesh.model": model_axis})
  config = _config(cache_dir, **overrides)
  single = str(tmp_path / "single")
  train.train_and_evaluate(config, single)
  multi = str(tmp_path / "multi")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={multi}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
       *_flags(cache_dir, **overrides)], env=_env(data_axis * model_axis // 2),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  a, b = _params(single, config), _params(multi, config)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  final = [json.load(open(f"{d}/final_metrics.json")) for d in (single, multi)]
  assert final[0]["num_examples"] == final[1]["num_examples"] == 40  # each image once
  assert final[1]["top1_error"] == pytest.approx(final[0]["top1_error"])
