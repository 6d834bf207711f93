"""The training driver end to end: the real main, resume, signals, eval, predict, processes."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from alexnet_jax import checkpoint, cli, parallel, steps
from alexnet_jax.run import evaluate, setup, train
from experiments import alexnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


def _config(cache_dir, **overrides):
  config = alexnet.get_config("smoke")
  config.dataset.cache_dir = cache_dir
  config.eval_ten_crop = False
  config.update_from_flattened_dict(overrides)
  return config


def _flags(cache_dir, **overrides):
  flags = [f"--config={ROOT}/experiments/alexnet.py:smoke",
           f"--config.dataset.cache_dir={cache_dir}"]
  return flags + [f"--config.{k}={v}" for k, v in overrides.items()]


def _main(workdir, flags, devices=1, mode="train", extra_env=None, **kwargs):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", **(extra_env or {}))
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}",
         f"--mode={mode}", *flags]
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, **kwargs)


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


def test_main_trains_logs_checkpoints_and_evaluates(tmp_path, cache_dir):
  workdir = str(tmp_path / "run")
  out = _main(workdir, _flags(cache_dir, num_train_steps=3, eval_every_steps=3,
                              checkpoint_every_steps=2, **{"figures.enabled": True}))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Done. Results in" in out.stdout
  losses = _scalars(workdir, "train/loss")
  assert sorted(losses) == [1, 2, 3] and all(np.isfinite(list(losses.values())))
  assert set(_scalars(workdir, "eval/top1_error")) == {3}
  for tag in ("train/learning_rate", "train/images_per_second", "train/data_wait_fraction"):
    assert _scalars(workdir, tag), tag
  assert sorted(int(os.path.basename(p)) for p in glob.glob(f"{workdir}/checkpoints/*")) == [2, 3]
  final = json.load(open(f"{workdir}/final_metrics.json"))
  assert final["step"] == 3 and 0.0 <= final["top1_error"] <= 1.0
  assert json.load(open(f"{workdir}/config.json"))["num_train_steps"] == 3
  for name in ("conv1_kernels.png", "neighbours.png", "training_curves.png"):
    assert os.path.getsize(f"{workdir}/figures/{name}") > 1000, name


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


def test_sigterm_saves_and_the_restart_continues(tmp_path, cache_dir):
  workdir = str(tmp_path / "run")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={workdir}",
         *_flags(cache_dir, num_train_steps=100000, checkpoint_every_steps=100000,
                 eval_every_steps=100000)]
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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
  out = _main(workdir, _flags(cache_dir, num_train_steps=saved + 1))
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"Resumed from {workdir}/checkpoints at step {saved}" in out.stderr
  assert sorted(_scalars(workdir, "train/loss"))[-1] == saved + 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
  """A smoke model trained on 8 devices (data 4 x model 2)."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  config = _config(cache_dir, num_train_steps=2, **{"mesh.data": 4, "mesh.model": 2})
  train.train_and_evaluate(config, workdir)
  return workdir


def test_eval_mode_on_another_device_count_writes_the_report(trained, cache_dir):
  out = _main(trained, _flags(cache_dir), devices=2, mode="eval")
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.load(open(f"{trained}/eval/2.json"))
  assert report["step"] == 2 and report["split"] == "validation"
  assert report["num_examples"] == 40  # smoke demo: 10 classes x 4, every one counted
  for view in ("center_crop", "ten_crop"):
    assert set(report[view]) == {"top1_error", "top5_error", "loss"}
    assert 0.0 <= report[view]["top5_error"] <= report[view]["top1_error"] <= 1.0
  # The same numbers as an evaluation on this process's 8 devices.
  config = _config(cache_dir)
  run = setup.build(config, trained, mode="eval")
  state = evaluate.restore(run, trained)
  centre = evaluate.evaluate(run, state, steps.make_eval_step(config, run.layout),
                             ten_crop=False)
  assert centre["top1_error"] == pytest.approx(report["center_crop"]["top1_error"])


def test_predict_prints_top5_for_real_images(trained, cache_dir, shared_data):
  images = sorted(glob.glob(f"{shared_data}/imagenet-tiny/val/*/*.JPEG"))[:2]
  out = _main(trained, _flags(cache_dir) + [f"--images={','.join(images)}"], mode="predict")
  assert out.returncode == 0, out.stderr[-3000:]
  for path in images:
    block = out.stdout.split(path)[1].strip().splitlines()[:5]
    probs = [float(line.split("%")[0]) for line in block]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True)


def test_imagenet_class_words_for_a_subset_of_ilsvrc_wnids():
  # An image folder of some ILSVRC classes (e.g. Imagenette) gets words; other names stay
  # (the 1000-class order is checked in test_evaluate against TFDS's labels).
  assert evaluate.readable_names(["n01440764", "circle"]) == ["tench, Tinca tinca", "circle"]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("data,model", [(2, 2), (1, 2)], ids=["replica_per_process",
                                                              "tower_per_process"])
def test_two_processes_equal_one(tmp_path, cache_dir, data, model):
  """Two processes train as one; with (1, 2) the towers of one replica sit in different
  processes, which must then read the same examples (shares follow the mesh)."""
  overrides = dict(num_train_steps=2, eval_every_steps=2, checkpoint_every_steps=2,
                   **{"mesh.data": data, "mesh.model": model})
  single = str(tmp_path / "single")
  out = _main(single, _flags(cache_dir, **overrides), devices=data * model)
  assert out.returncode == 0, out.stderr[-3000:]
  multi = str(tmp_path / "multi")
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={data * model // 2}",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "main.py"), f"--workdir={multi}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
       *_flags(cache_dir, **overrides)], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
  config = _config(cache_dir, **overrides)
  a, b = _params(single, config), _params(multi, config)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  final = [json.load(open(f"{d}/final_metrics.json")) for d in (single, multi)]
  assert final[0]["num_examples"] == final[1]["num_examples"] == 40  # each image once
  assert final[1]["top1_error"] == pytest.approx(final[0]["top1_error"])


def test_mismatched_checkpoint_is_refused_and_nothing_overwritten(trained, cache_dir):
  before = {p: os.path.getmtime(p) for p in glob.glob(f"{trained}/**", recursive=True)}
  out = _main(trained, _flags(cache_dir, **{"model.fc_features": "(64,64)",
                                            "num_train_steps": 4}))
  assert out.returncode == 2
  assert "another network" in out.stderr and "model.fc_features" in out.stderr
  after = {p: os.path.getmtime(p) for p in glob.glob(f"{trained}/**", recursive=True)}
  assert after == before


def test_unknown_config_field_is_an_error(tmp_path, cache_dir):
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


def test_a_copied_workdir_predicts_and_evaluates_without_the_dataset(tmp_path):
  """A workdir carries its class names and input statistics: copied elsewhere, with the
  dataset and the statistics cache gone, predict gives the same top-5 and eval works."""
  import shutil

  cache = tmp_path / "cache"
  workdir = tmp_path / "run"
  flags = _flags(str(cache), num_train_steps=2)
  assert _main(str(workdir), flags).returncode == 0
  demo_val = sorted(glob.glob(f"{cache}/demo*/val/*/*.*"))
  assert demo_val, os.listdir(cache)
  images = []
  for i, path in enumerate(demo_val[::10][:2]):  # outside the dataset, which goes away
    images.append(str(tmp_path / f"query{i}{os.path.splitext(path)[1]}"))
    shutil.copy(path, images[-1])
  val_copy = tmp_path / "val_only" / "val"
  shutil.copytree(os.path.dirname(os.path.dirname(demo_val[0])), val_copy)
  before = _main(str(workdir), flags + [f"--images={','.join(images)}"], mode="predict")
  assert before.returncode == 0, before.stderr[-3000:]

  moved = tmp_path / "elsewhere" / "run"
  shutil.copytree(workdir, moved)
  shutil.rmtree(workdir)
  shutil.rmtree(cache)
  after = _main(str(moved), flags + [f"--images={','.join(images)}"], mode="predict")
  assert after.returncode == 0, after.stderr[-3000:]
  assert after.stdout == before.stdout and "%" in after.stdout
  assert not cache.exists()  # nothing regenerated: the workdir was enough

  # Evaluation needs validation images, not the training set: a folder of val/ only.
  out = _main(str(moved), flags + ["--config.dataset.name=image_folder",
                                   f"--config.dataset.image_folder={val_copy.parent}"],
              mode="eval")
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.load(open(moved / "eval" / "2.json"))["num_examples"] == 40
