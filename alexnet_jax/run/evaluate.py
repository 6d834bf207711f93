"""Evaluation (centre crop and the paper's ten crops) and prediction for image files.

Every validation example is counted exactly once whatever the batch size, mesh and
process count: the pipeline pads the last batch and masks the padding, each process
reads the share of each batch that its devices' place on the mesh selects, and the eval
step sums over unmasked examples only.

`run_eval` evaluates one checkpoint (--mode=eval); `follow` evaluates each new checkpoint
of a run training beside it, once, until the run's last step (--mode=eval --follow: the
separate evaluator of big_vision/flax set-ups); both write DIR/eval/<step>.json, and only
warn where the workdir is read-only. `predict` classifies image files in batches of
eval_batch_size: its memory does not grow with the number of files.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers

from alexnet_jax import checkpoint as checkpoint_lib
from alexnet_jax import config_checks, data, fileio, parallel, steps
from alexnet_jax.run import setup

EVAL_DIR = "eval"  # under the workdir: <step>.json, and the follower's TensorBoard events

RESOURCES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "resources")


def evaluate(run: setup.RunSetup, state, eval_step, *, ten_crop: bool,
             bad_images=None) -> dict[str, float]:
  """Top-1/top-5 error and loss over the whole evaluation split.

  Unusable files are skipped (named with the reason in `bad_images` and the log):
  num_skipped says how many, so an exact evaluation is never silently inexact.
  """
  totals = None
  for batch in data.eval_batches(run.config, ten_crop=ten_crop, bad_images=bad_images,
                                 **run.batch_args()):
    sums = eval_step(state, parallel.global_batch(run.mesh, batch))
    if totals is not None:
      # At most two steps in flight: each holds its batch on the device, and with JAX's
      # asynchronous dispatch a loop faster than the step queued every batch of the set
      # (measured: 7.2 GB peak RSS on 1,000 images vs 2.4 GB on 100, ten crops of 100).
      jax.block_until_ready(totals)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  # Every good example is counted exactly once over all processes: the rest were skipped.
  skipped = run.info.num_eval - int(count)
  if count == 0:
    raise data.BadImageError(f"none of the {skipped} evaluation images could be used; see "
                             "the log for each file and why")
  return {"top1_error": float(totals["top1_errors"]) / count,
          "top5_error": float(totals["top5_errors"]) / count,
          "loss": float(totals["loss"]) / count, "num_examples": int(count),
          "num_skipped": skipped}


def restore(run: setup.RunSetup, workdir: str, step: int | None = None):
  """The checkpointed state at `step` (default latest), placed on the run's mesh."""
  ckpt = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:  # checks the network first; step None: the newest intact, finite checkpoint
    return ckpt.restore(run.layout.abstract, step, config=run.config)
  finally:
    ckpt.close()


def run_eval(config: ml_collections.ConfigDict, workdir: str,
             step: int | None = None) -> dict:
  """--mode=eval: centre-crop and ten-crop errors of a checkpoint -> DIR/eval/<step>.json
  (a workdir that cannot be written: one warning; the result is printed all the same)."""
  run = setup.build(config, workdir, mode="eval")
  state = restore(run, workdir, step)
  bad_images = data.BadImageLog(on_bad_image=config.input.on_bad_image)
  return _report(run, state, steps.make_eval_step(config, run.layout), workdir, bad_images)


def _report(run: setup.RunSetup, state, eval_step, workdir: str,
            bad_images: data.BadImageLog, writer=None) -> dict:
  """Evaluates `state` (centre crop, ten crops), writes DIR/eval/<step>.json (and the
  scalars to `writer`), prints one line; returns the report."""
  config = run.config
  step = int(jax.device_get(state.step))
  centre = evaluate(run, state, eval_step, ten_crop=False, bad_images=bad_images)
  ten = evaluate(run, state, eval_step, ten_crop=True, bad_images=bad_images)
  report = {
      "step": step, "split": config.dataset.eval_split, "num_examples": centre["num_examples"],
      # This process's skipped files; num_skipped counts those of all processes.
      "num_skipped": centre["num_skipped"], "skipped_files": bad_images.report(),
      "center_crop": {k: centre[k] for k in ("top1_error", "top5_error", "loss")},
      "ten_crop": {k: ten[k] for k in ("top1_error", "top5_error", "loss")},
  }
  if writer is not None:
    # The training loop's names: in TensorBoard the follower's curves ("eval" run) lie on
    # the trainer's ("." run). Flushed before the report, which marks the step done: a
    # stop in between repeats the scalars on restart, never loses them.
    writer.write_scalars(step, {**{f"eval/{k}": v for k, v in centre.items()},
                                **{f"eval_ten_crop/{k}": v for k, v in ten.items()}})
    writer.flush()
  if jax.process_index() == 0:
    _write_report(workdir, step, report)
  if centre["num_skipped"]:
    logging.warning("evaluation skipped %d unusable images: %s", centre["num_skipped"],
                    bad_images.summary())
  skipped = f" ({centre['num_skipped']} skipped)" if centre["num_skipped"] else ""
  print(f"step {step}, {report['num_examples']} {report['split']} images{skipped}: "
        f"centre crop top-1/top-5 error {centre['top1_error']:.4f}/{centre['top5_error']:.4f}, "
        f"ten crops {ten['top1_error']:.4f}/{ten['top5_error']:.4f}", flush=True)
  return report


def _write_report(workdir: str, step: int, report: dict) -> None:
  """DIR/eval/<step>.json; where the workdir cannot be written (read-only, permissions,
  full), one warning: the result is printed all the same."""
  path = fileio.path(workdir) / EVAL_DIR / f"{step}.json"
  try:
    fileio.write_json(path, report)
  except OSError as err:
    logging.warning("could not write %s (%s): the result is only printed below", path,
                    err.strerror or err)
    return
  logging.info("wrote %s", path)


def reported_steps(workdir: str) -> list[int]:
  """The steps with a DIR/eval/<step>.json, sorted: what a follower already reported."""
  directory = fileio.path(workdir) / EVAL_DIR
  if not directory.is_dir():
    return []
  return sorted(int(p.stem) for p in directory.iterdir()
                if re.fullmatch(r"\d+\.json", p.name))


# ------------------------------------------------------------------ follow

def follow(config: ml_collections.ConfigDict, workdir: str) -> list[int]:
  """--mode=eval --follow: evaluates each new checkpoint of the run training in `workdir`
  once (as run_eval: centre and ten crops, DIR/eval/<step>.json, one printed line), plus
  TensorBoard scalars in DIR/eval/; returns the steps it evaluated.

  Polls every config.eval_follow_poll_seconds; evaluates the listed steps after the last
  one reported (so a restart re-evaluates nothing), oldest first. A step the trainer
  deletes before or while it is read (its keep policy) is skipped in one INFO line; a
  damaged one in one warning. Ends after the run's last step (config.num_train_steps, or
  num_epochs of the dataset), or once the trainer writes final_metrics.json and no step
  is left. SIGTERM / Ctrl-C stop it between any two lines (cli: one line).
  """
  poll = config.eval_follow_poll_seconds
  if not poll > 0:
    raise config_checks.ConfigError("eval_follow_poll_seconds", f"{poll}: must be > 0")
  ckpt = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:
    _wait_for(ckpt, -1, poll)
    run = setup.build(config, workdir, mode="eval")  # the record the trainer wrote first
    end = _RunEnd(run, workdir)
    after = max(reported_steps(workdir), default=-1)
    if after >= 0:
      logging.info("resuming after step %d, the last one reported in %s", after,
                   fileio.path(workdir) / EVAL_DIR)
    eval_step = steps.make_eval_step(config, run.layout)
    bad_images = data.BadImageLog(on_bad_image=config.input.on_bad_image)
    writer = metric_writers.create_default_writer(
        workdir, just_logging=jax.process_index() != 0 or not _writable(workdir),
        asynchronous=False, collection=EVAL_DIR)
    evaluated = []
    with metric_writers.ensure_flushes(writer):
      while (step := _wait_for(ckpt, after, poll, end)) is not None:
        after = step
        state = _restore_new(run, ckpt, step)
        if state is not None:
          _report(run, state, eval_step, workdir, bad_images, writer)
          evaluated.append(step)
    writer.close()
    logging.info("the run in %s has ended (step %d): evaluated %s", workdir, after,
                 evaluated or "nothing new")
    return evaluated
  finally:
    ckpt.close()


_NONE, _END = -1, -2  # _wait_for's choices besides a step


def _wait_for(ckpt: checkpoint_lib.Checkpointer, after: int, poll: float,
              end: _RunEnd | None = None) -> int | None:
  """The oldest listed step after `after`, once there is one; None once `end` says the
  run has ended. Every process gets process 0's answer."""
  waiting = False
  while True:
    listed = ckpt.refresh()
    new = [s for s in listed if s > after]
    if end is not None and end.reached(listed, after):
      choice = _END
    else:
      choice = new[0] if new else _NONE
    choice = _agreed(choice)
    if choice != _NONE:
      return None if choice == _END else choice
    if not waiting:
      logging.info("waiting for a checkpoint %s in %s (every %gs)",
                   f"after step {after}" if after >= 0 else "of the run", ckpt.directory,
                   poll)
      waiting = True
    time.sleep(poll)


def _restore_new(run: setup.RunSetup, ckpt: checkpoint_lib.Checkpointer, step: int):
  """The state at `step`, or None (said in one line) if the trainer deleted it first or it
  is damaged: a follower never stops for one step."""
  problem = None
  try:
    state = ckpt.restore(run.layout.abstract, step, config=run.config)
  except checkpoint_lib.CheckpointNotFound:  # listed, then deleted (CheckpointGone included)
    problem = "gone"
  except checkpoint_lib.CheckpointCorrupt as err:
    problem = str(err)
  if _all_agree(problem is None):  # every process evaluates it, or none does
    return state
  if problem is None:
    logging.info("step %d could not be read on every process: skipped", step)
  elif problem == "gone":
    logging.info("step %d was deleted by the run (its keep policy) before it was "
                 "evaluated: skipped", step)
  else:
    logging.warning("%s: skipped", problem)
  return None


class _RunEnd:
  """When the run a follower evaluates has ended: its last step is past, or the trainer
  wrote final_metrics.json (while the follower ran, or for the last step) and no listed
  step is left.

  The last step is the one training computes (setup.build for training: num_train_steps,
  else num_epochs of full batches); None where the dataset here cannot say (no training
  split): final_metrics.json then decides.
  """

  def __init__(self, run: setup.RunSetup, workdir: str):
    config = run.config
    self.last_step = config.num_train_steps if config.num_train_steps > 0 else None
    if self.last_step is None:
      try:
        self.last_step = max(1, round(config.num_epochs * data.steps_per_epoch(config,
                                                                              run.info)))
      except config_checks.ConfigError:
        pass
    self._final = fileio.path(workdir) / setup.FINAL_METRICS
    # An older run's final metrics (a finished run resumed to train longer) end nothing.
    self._before = self._read()

  def _read(self) -> str | None:
    try:
      return self._final.read_text()
    except OSError:
      return None

  def reached(self, listed: list[int], after: int) -> bool:
    if self.last_step is not None and after >= self.last_step:
      return True
    if any(s > after for s in listed):
      return False
    text = self._read()
    try:
      final_step = json.loads(text).get("step") if text is not None else None
    except (ValueError, AttributeError):
      return False  # half-written or damaged: the trainer writes it again
    if not isinstance(final_step, int) or final_step > after:
      return False
    return (text != self._before or self.last_step is None
            or final_step >= self.last_step)


def _writable(workdir: str) -> bool:
  """Whether DIR/eval can take TensorBoard events (a read-only workdir: logged only)."""
  directory = fileio.path(workdir) / EVAL_DIR
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".probe-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as err:
    logging.warning("cannot write %s (%s): scalars are logged only", directory,
                    err.strerror or err)
    return False
  return True


def _agreed(step: int) -> int:
  """Process 0's `step` on every process: all evaluate the same checkpoint."""
  if jax.process_count() == 1:
    return step
  from jax.experimental import multihost_utils

  return int(multihost_utils.broadcast_one_to_all(np.int32(step)))


def _all_agree(ok: bool) -> bool:
  """True on every process if `ok` is true on all of them."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def readable_names(class_names: Sequence[str]) -> list[str]:
  """ImageNet's words for ILSVRC-2012 wnids (any subset of them), other names unchanged."""
  with open(os.path.join(RESOURCES, "ilsvrc2012_classes.tsv")) as f:
    words = dict(line.rstrip("\n").split("\t") for line in f if not line.startswith("#"))
  return [words.get(n, n) for n in class_names]


def predict(config: ml_collections.ConfigDict, workdir: str, paths: Sequence[str],
            step: int | None = None, top_k: int = 5) -> list[list[tuple[str, float]]]:
  """--mode=predict: the top-k classes with probabilities for each image file.

  Needs only the workdir (checkpoint, class names, input statistics), not the dataset.
  Decodes and classifies config.eval_batch_size files at a time, printing as it goes:
  memory does not grow with the number of files.
  """
  # A path that names nothing is a typo; an existing file that cannot be used (unreadable,
  # a dangling link, corrupt, too large) is skipped and named below.
  missing = [p for p in paths if not os.path.lexists(p)]
  if missing:
    raise FileNotFoundError(f"--images: no such file: {', '.join(missing)}")
  run = setup.build(config, workdir, mode="predict")
  state = restore(run, workdir, step)
  names = readable_names(run.class_names)
  bad_images = data.BadImageLog(on_bad_image=config.input.on_bad_image)
  predict_step = steps.make_predict_step(config, run.layout)  # compiled once for all chunks
  results, held = [], []  # held: skipped files' lines, until a file is usable
  for start in range(0, len(paths), config.eval_batch_size):
    chunk = paths[start:start + config.eval_batch_size]
    images = data.preprocess_image_files(config, chunk, stats=run.stats, bad_images=bad_images)
    probs, _ = features_and_probabilities(run, state.params, images, predict_step=predict_step)
    for path, p in zip(chunk, probs, strict=True):
      if path in bad_images.reasons:
        results.append([])
        held.append(f"{path}\n  skipped: {bad_images.reasons[path]}")
        continue
      top = np.argsort(-p)[:top_k]
      results.append([(names[i], float(p[i])) for i in top])
      # Every file is printed in order; those skipped before the first usable one wait, so
      # that a list of only unusable files is one error and nothing else, as before.
      print("\n".join([*held, path] + [f"  {p[i]:7.2%}  {names[i]}" for i in top]),
            flush=True)
      held = []
  if len(bad_images.paths) == len(set(paths)):
    raise data.BadImageError(f"no usable image in --images: {bad_images.summary()}")
  if held:
    print("\n".join(held), flush=True)
  return results


def features_and_probabilities(run: setup.RunSetup, params, images: np.ndarray,
                               batch_size: int | None = None, predict_step=None):
  """Softmax [n, classes] and the last hidden layer (fc7, after ReLU) [n, fc7 width].

  Batched and jitted; the last batch is padded to the data axis and trimmed. Pass the
  same `predict_step` (`steps.make_predict_step(config, run.layout)`) to repeated calls:
  a new one compiles again.
  """
  predict_step = predict_step or steps.make_predict_step(run.config, run.layout)
  mesh = run.mesh
  size = mesh.shape[parallel.DATA]
  batch_size = batch_size or run.config.eval_batch_size
  probs, feats = [], []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    padded = -(-len(chunk) // size) * size
    chunk = np.concatenate([chunk, np.zeros((padded - len(chunk), *chunk.shape[1:]),
                                            chunk.dtype)])
    p, f = jax.device_get(predict_step(params, jax.device_put(
        chunk, parallel.batch_sharding(mesh))))
    n = min(batch_size, len(images) - start)
    probs.append(p[:n])
    feats.append(f[:n])
  return np.concatenate(probs), np.concatenate(feats)
