"""The training loop: train, evaluate, checkpoint, resume.

`train_and_evaluate(config, workdir)` is the whole of `--mode=train`:

  1. set the run up (`setup.build`: every config field, the mesh and the dataset are
     checked before anything is compiled or written);
  2. restore the latest checkpoint in workdir (refusing one of another network) or
     initialise; record the run's class names, input statistics and config in workdir;
  3. step through the data stream from the state's step, which is a pure function of
     (seed, step): a resumed run sees exactly the batches and dropout masks of an
     uninterrupted one;
  4. log to TensorBoard (process 0 only), evaluate, feed the plateau schedule, save
     asynchronously (only finite states); on SIGTERM, Ctrl-C or SIGHUP finish the step, save and
     exit; at the end, the final centre-crop and ten-crop evaluations.

The loop's pieces: `_MetricsWindow` (the steps since the last read-back, their summary
and timing), `_rollback` (on_nonfinite="rollback"), `_itstime` (when a periodic action is
due) and `_evaluate_in_loop`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions
from flax import traverse_util
from jax.experimental import multihost_utils

from alexnet_jax import checkpoint as checkpoint_lib
from alexnet_jax import data, fileio, memory, optim, parallel, steps
from alexnet_jax.run import evaluate, setup

FINAL_METRICS = setup.FINAL_METRICS
# Signals that stop a run cleanly (finish the step, save, exit 0). SIGHUP is what a
# closed terminal or SSH session sends: without it, a run started by hand lost every
# step since its last checkpoint (up to checkpoint_every_steps).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class NonFiniteLossError(FloatingPointError):
  """The loss or the state became NaN or Inf; the last finite checkpoint is kept."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step  # the first step whose result was not finite


class _StopRequest:
  """Turns SIGTERM / SIGINT / SIGHUP into a stop every process takes at the same step.

  One process: a flag the loop reads between steps. Several: JAX's preemption sync
  (jax.distributed's SIGTERM notifier; cli turns SIGINT and SIGHUP into SIGTERM) names a
  step that every process reaches, so none enters the collective save while another
  steps on.
  """

  def __init__(self):
    self.signal_name = None
    self._previous = {}
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if not self._multi and threading.current_thread() is threading.main_thread():
      for sig in STOP_SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name

  def requested(self, step: int) -> bool:
    """Whether to stop after `step`; call once per step, on every process."""
    if self._multi and multihost_utils.reached_preemption_sync_point(step):
      self.signal_name = "SIGTERM (to one of the processes)"
    return self.signal_name is not None

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _itstime(step: int, every: int, total: int) -> bool:
  """Whether an action done every `every` steps is due after `step` (as big_vision's
  `itstime`): on its multiples and on the last step, which is always logged, evaluated
  and saved whatever the period."""
  return step % every == 0 or step == total


def _final_keys(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return ("top1_error",) + (("ten_crop_top1_error",) if config.eval_ten_crop else ())


def _finished(config: ml_collections.ConfigDict, workdir, step: int) -> dict | None:
  """The final metrics of a run already finished at `step`, if complete; else None."""
  path = fileio.path(workdir) / FINAL_METRICS
  if not path.exists():
    return None
  try:
    final = fileio.read_json(path)
  except ValueError as err:  # half-written by hand or by a copy: evaluated again
    logging.warning("%s is damaged (%s): evaluating the last checkpoint again", path, err)
    return None
  if (isinstance(final, dict) and final.get("step") == step
      and all(k in final for k in _final_keys(config))):
    return final
  return None


def _finished_read_only(run: setup.RunSetup, workdir: str, problem: str) -> dict:
  """A workdir training cannot write: a finished run's final metrics (a rerun changes
  nothing, so it needs no writing), else a WorkdirError saying what to do."""
  ckpt = checkpoint_lib.Checkpointer(workdir, read_only=True) if os.path.isdir(workdir) else None
  try:
    step = ckpt.latest_step() if ckpt is not None else None
  finally:
    if ckpt is not None:
      ckpt.close()
  final = None
  if step is not None and step >= run.num_train_steps:
    final = _finished(run.config, workdir, step)
  if final is not None:
    logging.info("Run already finished at step %d (%s; nothing to write): %s unchanged.",
                 step, problem, fileio.path(workdir) / FINAL_METRICS)
    return final
  if "not writable" not in problem:
    raise fileio.WorkdirError(f"--workdir: {problem}; give a directory's path (nothing was "
                              "written)")
  where = f"resume from step {step}" if step is not None else "start"
  raise fileio.WorkdirError(
      f"--workdir: {problem}, and training must write there to {where} (checkpoints, "
      "metrics, events). Make it writable, or copy the run (cp -r OLD NEW) and pass "
      "--workdir=NEW; --mode=eval and --mode=predict read it as it is")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       run: setup.RunSetup | None = None,
                       allow_config_changes: bool = False) -> dict[str, float]:
  """Trains (resuming from workdir), evaluates; returns the final evaluation.

  run: `setup.build(config, workdir)` if the caller has it. allow_config_changes: resume
  even where the config changes the run's meaning (see alexnet_jax/checkpoint/
  compatibility.py). A stopped run returns {"stopped_at_step": step}. Rerunning a
  finished run changes nothing and returns its final metrics.
  """
  run = run or setup.build(config, workdir, mode="train")
  is_lead = jax.process_index() == 0
  problem = fileio.unwritable_dir(workdir)
  if problem is not None:
    return _finished_read_only(run, workdir, problem)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.keep_checkpoints)
  try:
    if ckpt.latest_step() is not None:
      # The newest intact, finite step; a config that changes the run's meaning is
      # refused before anything in workdir is written.
      state = ckpt.restore(run.layout.abstract, config=config,
                           allow_changes=allow_config_changes)
      logging.info("Resumed from %s at step %d.", ckpt.directory, int(state.step))
    else:
      # The absolute path: a relative --workdir given from another directory is another
      # workdir, and this line is how the user sees it.
      logging.warning("No checkpoint in %s: starting at step 0.", ckpt.directory)
      state = steps.create_train_state(config, run.layout)
    start = int(jax.device_get(state.step))
    final_path = fileio.path(workdir) / FINAL_METRICS
    if start >= run.num_train_steps:
      final = _finished(config, workdir, start)
      if final is not None:
        logging.info("Run already finished at step %d: %s unchanged.", start, final_path)
        return final
    if start < run.num_train_steps:  # before anything is written or compiled
      memory.check_train_step_fits(config, run.layout)
    setup.record(run, workdir)
    if is_lead:
      # config.json = the config of the latest start; configs/<step>.json keeps each one.
      text = config.to_json_best_effort(indent=2)
      fileio.write_text(fileio.path(workdir) / "configs" / f"{start}.json", text)
      fileio.write_text(fileio.path(workdir) / "config.json", text)
    writer = metric_writers.create_default_writer(workdir, just_logging=not is_lead,
                                                  asynchronous=True)
    with metric_writers.ensure_flushes(writer):
      if start == 0:
        writer.write_hparams({k: str(v) if isinstance(v, (tuple, list)) else v for k, v in
                              traverse_util.flatten_dict(config.to_dict(), sep=".").items()})
      eval_step = steps.make_eval_step(config, run.layout)  # for the loop and the end
      if start < run.num_train_steps:
        state, result = _train(run, state, start, ckpt, writer, workdir, eval_step)
        if "stopped_at_step" in result:
          return result
      else:
        # Trained, but the final evaluation did not finish (killed during it): no
        # training stream (statistics, square cache) or train step is needed for it.
        logging.info("Training finished at step %d; completing the final evaluation.", start)
        result = {}
      result = _final_evaluation(run, state, result, writer, eval_step)
    writer.close()
    if is_lead:
      fileio.write_json(final_path, result)
    return result
  finally:
    ckpt.close()


class _MetricsWindow:
  """The training steps since the last read-back of their metrics.

  Device metrics wait here (no host sync per step) until `flush` reads them back at a
  logging, evaluation or checkpoint step: it raises on a non-finite step (before any
  save), then writes the window's mean to TensorBoard with its images/s and the fraction
  of the time spent waiting for data.

  After a rollback the loop replays steps it may already have written; TensorBoard keeps
  the first values of those steps (a curve never goes back in time), and the replay's
  summaries are logged only, until it passes the last step written.
  """

  def __init__(self, run: setup.RunSetup, writer, ckpt, bad_images: data.BadImageLog):
    self._run, self._writer, self._ckpt, self._bad_images = run, writer, ckpt, bad_images
    self._written_through = 0  # the last step whose train/* scalars were written
    self.reset()

  def reset(self) -> None:
    """Starts a new window (at a rollback: the discarded steps' metrics and time go)."""
    self._pending: list[tuple[int, Any]] = []  # (step, device metrics) not yet read back
    self._start, self._wait, self._steps = time.perf_counter(), 0.0, 0

  def add(self, step: int, metrics, data_wait: float) -> None:
    self._pending.append((step, metrics))
    self._steps += 1
    self._wait += data_wait

  def flush(self, step: int) -> None:
    """Reads back the pending metrics; raises NonFiniteLossError on a non-finite step."""
    if not self._pending:
      return
    host = jax.device_get([m for _, m in self._pending])
    for (s, _), m in zip(self._pending, host, strict=True):
      if not m["finite"]:
        self._pending.clear()
        raise self._nonfinite(s, m)
    self._pending.clear()
    elapsed = time.perf_counter() - self._start
    summary = {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0]
               if k != "finite"}
    summary["train/steps_per_second"] = self._steps / elapsed
    summary["train/images_per_second"] = self._steps * self._run.config.batch_size / elapsed
    summary["train/data_wait_fraction"] = self._wait / elapsed
    summary["train/bad_images"] = self._bad_images.count
    replay = step <= self._written_through
    if not replay:
      self._writer.write_scalars(step, summary)
      self._written_through = step
    logging.info("step %d/%d  loss %.4f  top-1 err %.3f  lr %.2g  %.1f img/s  data wait %.0f%%%s",
                 step, self._run.num_train_steps, summary["train/loss"],
                 summary["train/top1_error"], summary["train/learning_rate"],
                 summary["train/images_per_second"], 100 * summary["train/data_wait_fraction"],
                 "  (replayed after a rollback; TensorBoard keeps the first)" if replay else "")
    self._start, self._wait, self._steps = time.perf_counter(), 0.0, 0

  def _nonfinite(self, step: int, m: dict) -> NonFiniteLossError:
    self._ckpt.wait()  # the newest save is finite: only finite states are saved
    finite = self._ckpt.newest_finite_step()
    where = (f"the last finite checkpoint (step {finite}) in {self._ckpt.directory} is kept"
             if finite is not None else "no checkpoint was saved yet")
    return NonFiniteLossError(
        f"loss {m['loss']}, parameter norm {m['param_norm']} at step {step}: not "
        f"finite; {where}. Lower optim.learning_rate or check the data, then rerun to "
        "resume (or set on_nonfinite='rollback' to skip such batches).", step)


def _rollback(run: setup.RunSetup, ckpt, state, err: NonFiniteLossError, rollbacks: int):
  """The newest finite checkpoint, set to skip the batches that led to the bad step (the
  stream continues where the failed attempt stopped reading); re-raises `err` when
  rollbacks are off, none is left or there is nothing to roll back to."""
  config = run.config
  restored = ckpt.newest_finite_step()
  if (config.on_nonfinite != "rollback" or restored is None
      or rollbacks >= config.nonfinite_max_rollbacks):
    if config.on_nonfinite == "rollback":
      err.args = (f"{err.args[0]} Gave up after {rollbacks} rollbacks "
                  f"(nonfinite_max_rollbacks={config.nonfinite_max_rollbacks}).",)
    raise err
  skipped = err.step - restored  # this attempt's batches since the checkpoint
  skip = int(jax.device_get(state.data_skip)) + skipped
  state = ckpt.restore(run.layout.abstract, restored)
  state = state.replace(data_skip=jax.device_put(np.int32(skip), state.data_skip.sharding))
  logging.warning("non-finite result at step %d: rolled back to step %d and skipped its "
                  "%d batches (rollback %d of at most %d; data position now %d).", err.step,
                  restored, skipped, rollbacks + 1, config.nonfinite_max_rollbacks,
                  steps.data_position(state))
  return state


def _evaluate_in_loop(run: setup.RunSetup, state, step: int, eval_step, writer, timer,
                      bad_images: data.BadImageLog):
  """Evaluates, logs, feeds the plateau schedule; returns (state, eval metrics)."""
  with timer.timed("eval", wait_jax_async_dispatch=False):
    metrics = evaluate.evaluate(run, state, eval_step, ten_crop=False, bad_images=bad_images)
  writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
  logging.info("eval at step %d: top-1 error %.4f, top-5 error %.4f (%d images)", step,
               metrics["top1_error"], metrics["top5_error"], metrics["num_examples"])
  plateau = optim.plateau_update(run.config, state.plateau, metrics["top1_error"])
  return state.replace(plateau=plateau), metrics


def _make_hooks(run: setup.RunSetup, workdir: str) -> list:
  """Progress reports (and the profiler); new ones after a rollback, as clu's actions
  count steps forward only."""
  config = run.config
  # Reports only on logging steps, which are read back first (no time-based reports at
  # steps that may still be queued).
  hooks = [periodic_actions.ReportProgress(num_train_steps=run.num_train_steps,
                                           every_steps=config.log_every_steps,
                                           every_secs=None)]
  if config.profile_steps and jax.process_index() == 0:
    first, last = config.profile_steps
    hooks.append(periodic_actions.Profile(
        logdir=os.fspath(fileio.path(workdir) / "profile"), first_profile=first,
        num_profile_steps=last - first, profile_duration_ms=None, every_secs=None))
  return hooks


def _report_stop(ckpt, signal_name: str, step: int, saved: bool) -> None:
  ckpt.wait()  # the save is on disk before the process says so and exits
  logging.warning("%s received: %s. Resume with the same command (same --workdir and "
                  "--config).", signal_name,
                  f"saved step {step} to {ckpt.directory}" if saved else
                  f"step {step} was not finite and not saved; the newest finite checkpoint "
                  f"is step {ckpt.newest_finite_step()}")


def _train(run: setup.RunSetup, state, start: int, ckpt, writer, workdir: str, eval_step):
  """The loop from `start` to the last step. Returns (state, last evaluation or a stop)."""
  config, mesh, total = run.config, run.mesh, run.num_train_steps
  train_step = steps.make_train_step(config, run.layout, run.schedule)
  bad_images = data.BadImageLog(on_bad_image=config.input.on_bad_image)
  # Evaluation's skipped files are its own (eval/num_skipped), not train/bad_images; one
  # log for the loop's evaluations names each such file once.
  eval_bad_images = data.BadImageLog(on_bad_image=config.input.on_bad_image)

  def stream(state):
    return parallel.prefetch(mesh, data.train_batches(
        config, start_step=steps.data_position(state), bad_images=bad_images,
        **run.batch_args()), config.input.prefetch)

  logging.info("Training %s steps (%.2f epochs of %d steps) on a %s mesh from step %d.",
               total, total / run.steps_per_epoch, run.steps_per_epoch, dict(mesh.shape), start)
  batches, hooks = stream(state), _make_hooks(run, workdir)
  window = _MetricsWindow(run, writer, ckpt, bad_images)
  rollbacks, result, step = 0, {}, start
  with _StopRequest() as stop:
    while step < total:
      try:
        t0 = time.perf_counter()
        batch = next(batches)
        data_wait = time.perf_counter() - t0
        state, metrics = train_step(state, batch, steps.step_rng(state))
        step += 1
        window.add(step, metrics, data_wait)
        if _itstime(step, config.log_every_steps, total):
          window.flush(step)
        # After the read-back: with asynchronous dispatch a step is only queued when
        # train_step returns, and ReportProgress would time the queueing (it printed
        # "23 steps/s, ETA 0m" for 0.17 steps/s).
        for hook in hooks:
          hook(step)
        eval_metrics = None
        if _itstime(step, config.eval_every_steps, total):
          window.flush(step)
          state, eval_metrics = _evaluate_in_loop(run, state, step, eval_step, writer,
                                                  hooks[0], eval_bad_images)
          result = eval_metrics
        stopping = stop.requested(step)
        if _itstime(step, config.checkpoint_every_steps, total) or eval_metrics or stopping:
          window.flush(step)
          saved = ckpt.save(state, config, eval_metrics={
              checkpoint_lib.BEST_METRIC: eval_metrics["top1_error"]} if eval_metrics else None)
        if stopping and step < total:
          _report_stop(ckpt, stop.signal_name, step, saved)
          return state, {"stopped_at_step": step}
      except NonFiniteLossError as err:
        state = _rollback(run, ckpt, state, err, rollbacks)
        rollbacks += 1
        step = int(jax.device_get(state.step))
        batches, hooks = stream(state), _make_hooks(run, workdir)
        window.reset()
  if bad_images.count:
    logging.warning("%s", bad_images.summary())
  return state, {"step": step, **result}


def _final_evaluation(run: setup.RunSetup, state, result: dict[str, Any], writer, eval_step):
  """Completes the final metrics: centre crop (if the loop did not just compute it, e.g.
  a rerun after a kill during the final evaluation) and ten crops."""
  config = run.config
  step = int(jax.device_get(state.step))
  if "top1_error" not in result:
    result = {"step": step, **evaluate.evaluate(run, state, eval_step, ten_crop=False)}
  if config.eval_ten_crop:
    ten = evaluate.evaluate(run, state, eval_step, ten_crop=True)
    writer.write_scalars(step, {f"eval_ten_crop/{k}": v for k, v in ten.items()})
    logging.info("ten-crop eval at step %d: top-1 error %.4f, top-5 error %.4f", step,
                 ten["top1_error"], ten["top5_error"])
    result = {**result, **{f"ten_crop_{k}": v for k, v in ten.items()}}
  return result
