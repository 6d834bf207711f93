"""The training loop: train, evaluate, checkpoint, resume.

`train_and_evaluate(config, workdir)` is the whole of `--mode=train`:

  1. check the config and the data source (errors name the field; nothing is
     compiled or written before these pass);
  2. build the mesh, restore the latest checkpoint in workdir (refusing one of
     another network) or initialise;
  3. step through the data stream from the state's step, which is a pure
     function of (seed, step): a resumed run sees exactly the batches and
     dropout masks of an uninterrupted one;
  4. log to TensorBoard (process 0 only), evaluate, feed the plateau schedule,
     save asynchronously; on SIGTERM or Ctrl-C finish the step, save and exit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers

from alexnet_jax import checkpoint as checkpoint_lib
from alexnet_jax import config_checks, evaluate, input_pipeline, optim, parallel, steps


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the last good checkpoint is kept."""


@dataclasses.dataclass
class RunSetup:
  """What every mode needs: a validated config on a mesh, with its data source."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  info: Any  # input_pipeline.DatasetInfo
  steps_per_epoch: int
  num_train_steps: int


def setup(config: ml_collections.ConfigDict) -> RunSetup:
  """Validates config and data (fast, compiles nothing) and builds the mesh."""
  config_checks.check(config, jax.device_count())
  info = input_pipeline.dataset_info(config)
  if info.num_classes != config.model.num_classes:
    raise config_checks.ConfigError(
        "model.num_classes", f"{config.model.num_classes}, but dataset {config.dataset.name!r} "
        f"has {info.num_classes} classes")
  spe = input_pipeline.steps_per_epoch(config, info)
  total = (config.num_train_steps if config.num_train_steps > 0
           else max(1, round(config.num_epochs * spe)))
  return RunSetup(config, parallel.make_mesh(config), info, spe, total)


def abstract_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
  """The state's shapes with the shardings of `mesh`: a restore target."""
  shapes = jax.eval_shape(lambda: steps.init_state(config))
  shardings = steps.state_shardings(mesh, shapes, optim.make_optimizer(config))
  return checkpoint_lib.abstract_state(shapes, shardings)


class _StopRequest:
  """Turns SIGTERM / SIGINT into a flag the loop reads between steps."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _format_duration(seconds: float) -> str:
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (resuming from workdir), evaluates; returns the final evaluation."""
  run = setup(config)
  mesh, is_lead = run.mesh, jax.process_index() == 0
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                                     every_steps=config.checkpoint_every_steps)
  if ckpt.latest_step() is not None:
    ckpt.check_compatible(config)  # before anything in workdir is written
    state = ckpt.restore(abstract_train_state(config, mesh))
    logging.info("Resumed from %s at step %d.", ckpt.directory, int(state.step))
  else:
    state = steps.create_train_state(config, mesh)
  start = int(jax.device_get(state.step))

  if is_lead:
    _write_config(config, workdir)
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_lead,
                                                asynchronous=True)
  if start == 0:
    writer.write_hparams({k: str(v) if isinstance(v, (tuple, list)) else v
                          for k, v in _flat_config(config).items()})
  train_step = steps.make_train_step(config, mesh, run.steps_per_epoch)
  eval_step = steps.make_eval_step(config, mesh)
  bad_images = input_pipeline.BadImageLog(on_bad_image=config.input.on_bad_image)
  batches = parallel.prefetch(mesh, input_pipeline.train_batches(
      config, start_step=start, process_index=jax.process_index(),
      process_count=jax.process_count(), bad_images=bad_images), config.input.prefetch)

  logging.info("Training %s steps (%.2f epochs of %d steps) on a %s mesh from step %d.",
               run.num_train_steps, run.num_train_steps / run.steps_per_epoch,
               run.steps_per_epoch, dict(mesh.shape), start)
  pending: list[tuple[int, Any]] = []  # (step, device metrics) not yet read back
  window = {"start": time.perf_counter(), "wait": 0.0, "steps": 0}
  result: dict[str, float] = {}
  profile = tuple(config.profile_steps)
  started = time.perf_counter()

  def flush_metrics(step: int) -> None:
    """Reads back pending metrics; raises on a non-finite loss (before any save)."""
    if not pending:
      return
    host = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, host, strict=True):
      if config.halt_on_nonfinite and not np.isfinite(m["loss"]):
        raise NonFiniteLossError(
            f"loss is {m['loss']} at step {s + 1}; stopped. The last good checkpoint "
            f"(step {ckpt.latest_step()}) in {ckpt.directory} is kept; lower "
            "optim.learning_rate or check the data, then rerun to resume from it.")
    pending.clear()
    elapsed = time.perf_counter() - window["start"]
    summary = {f"train/{k}": float(np.mean([m[k] for m in host])) for k in host[0]}
    summary["train/steps_per_second"] = window["steps"] / elapsed
    summary["train/images_per_second"] = window["steps"] * config.batch_size / elapsed
    summary["train/data_wait_fraction"] = window["wait"] / elapsed
    summary["train/bad_images"] = bad_images.count
    writer.write_scalars(step, summary)
    done = step - start
    eta = (time.perf_counter() - started) / max(done, 1) * (run.num_train_steps - step)
    logging.info("step %d/%d  loss %.4f  top-1 err %.3f  lr %.2g  %.1f img/s  "
                 "data wait %.0f%%  ETA %s", step, run.num_train_steps, summary["train/loss"],
                 summary["train/top1_error"], summary["train/learning_rate"],
                 summary["train/images_per_second"], 100 * summary["train/data_wait_fraction"],
                 _format_duration(eta))
    window.update(start=time.perf_counter(), wait=0.0, steps=0)

  with _StopRequest() as stop:
    step = start
    while step < run.num_train_steps:
      if profile and step == profile[0] and is_lead:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
      t0 = time.perf_counter()
      batch = next(batches)
      window["wait"] += time.perf_counter() - t0
      state, metrics = train_step(state, batch, steps.step_rng(state))
      step += 1
      window["steps"] += 1
      pending.append((step - 1, metrics))
      if profile and step == profile[1] and is_lead:
        jax.block_until_ready(state)
        jax.profiler.stop_trace()

      last = step == run.num_train_steps
      if step % config.log_every_steps == 0 or last:
        flush_metrics(step)
      eval_metrics = None
      if step % config.eval_every_steps == 0 or last:
        flush_metrics(step)
        eval_metrics = evaluate.evaluate(config, state, mesh, eval_step, ten_crop=False,
                                         bad_images=bad_images)
        writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
        logging.info("eval at step %d: top-1 error %.4f, top-5 error %.4f (%d images)", step,
                     eval_metrics["top1_error"], eval_metrics["top5_error"],
                     eval_metrics["num_examples"])
        state = state.replace(plateau=optim.plateau_update(
            config, state.plateau, eval_metrics["top1_error"]))
        result = eval_metrics
      stopping = stop.signal_name is not None
      if step % config.checkpoint_every_steps == 0 or eval_metrics or last or stopping:
        flush_metrics(step)
        ckpt.save(state, config, force=True,
                  eval_metrics={checkpoint_lib.BEST_METRIC: eval_metrics["top1_error"]}
                  if eval_metrics else None)
      if stopping:
        ckpt.close()
        writer.flush()
        logging.warning("%s received: saved step %d to %s. Resume with the same command "
                        "(same --workdir and --config).", stop.signal_name, step, ckpt.directory)
        return {"stopped_at_step": step}

  if config.eval_ten_crop:
    ten = evaluate.evaluate(config, state, mesh, eval_step, ten_crop=True, bad_images=bad_images)
    writer.write_scalars(step, {f"eval_ten_crop/{k}": v for k, v in ten.items()})
    logging.info("ten-crop eval at step %d: top-1 error %.4f, top-5 error %.4f", step,
                 ten["top1_error"], ten["top5_error"])
    result = {**result, **{f"ten_crop_{k}": v for k, v in ten.items()}}
  if bad_images.count:
    logging.warning("%d unreadable images were skipped: %s", bad_images.count,
                    ", ".join(bad_images.paths[:20]))
  ckpt.close()
  writer.flush()
  writer.close()
  if is_lead:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump({"step": step, **result}, f, indent=2)
  if config.figures.enabled and jax.process_count() == 1:
    from alexnet_jax import figures  # matplotlib only when figures are drawn

    paths = figures.write_all(config, workdir, state=state)
    logging.info("figures: %s", ", ".join(paths))
  return result


def _flat_config(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat_config(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out

