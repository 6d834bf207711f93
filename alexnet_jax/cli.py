"""One library call per --mode, with user errors turned into one clear message.

A mistake in the config, a missing dataset or a workdir of another network
is not a crash: it prints what is wrong and how to fix it, and exits 2
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

import jax
import ml_collections

from alexnet_jax import checkpoint, config_checks, data, fileio, model, parallel
from alexnet_jax.run import evaluate, setup, train

# Mistakes a user can fix: printed in one line, exit 2, no traceback.
USER_ERRORS = (config_checks.ConfigError, data.DatasetNotFoundError, *checkpoint.USER_ERRORS,
               train.NonFiniteLossError, data.BadImageError, FileNotFoundError,
               fileio.WorkdirError)


def summary(config: ml_collections.ConfigDict) -> str:
  """The per-layer table of the configured model (shapes only: nothing is allocated)."""
  config_checks.check_model(config.model)
  net = model.AlexNet(config.model)
  params = jax.eval_shape(net.init, jax.random.key(0))
  return model.format_summary(net, params)


class _OnlyOurInfo(logging.Filter):
  """Keeps INFO lines of this project (and everything at WARNING or above).

  orbax and JAX log every save and backend probe at INFO, which buries the
  progress lines a person watches.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    # clu's progress notes (steps/s, ETA, time in eval) are ours too.
    return (record.levelno >= logging.WARNING or "site-packages" not in record.pathname
            or "clu/platform" in record.pathname)


def quiet_library_logs() -> None:
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_OnlyOurInfo())


class Stopped(Exception):
  """A stop signal outside the training loop (which handles them itself)."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


@contextlib.contextmanager
def stop_signals():
  """train.STOP_SIGNALS become `Stopped`, so a signal at any moment ends in one line.

  With several processes, SIGTERM is left to JAX's preemption notifier (installed by
  jax.distributed), which makes every process stop at the same step; SIGINT and SIGHUP
  are turned into a SIGTERM to this process for the same agreement.
  """
  def raise_stopped(signum, frame):
    del frame
    raise Stopped(signum)

  def forward_as_sigterm(signum, frame):
    del signum, frame
    os.kill(os.getpid(), signal.SIGTERM)

  previous = {}
  if jax.process_count() > 1:
    for sig in set(train.STOP_SIGNALS) - {signal.SIGTERM}:
      previous[sig] = signal.signal(sig, forward_as_sigterm)
  else:
    for sig in train.STOP_SIGNALS:
      previous[sig] = signal.signal(sig, raise_stopped)
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def main(mode: str, config: ml_collections.ConfigDict, workdir: str | None, *,
         coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, **kwargs) -> int:
  """The program behind main.py: jax.distributed, then one mode; the exit status."""
  # JAX logs each accelerator backend it does not find; that is not news.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  parallel.initialize_distributed(coordinator_address, num_processes, process_id)
  with stop_signals():
    return run(mode, config, workdir, **kwargs)


def run(mode: str, config: ml_collections.ConfigDict, workdir: str | None, *,
        step: int | None = None, images: Sequence[str] = (), follow: bool = False,
        allow_config_changes: bool = False) -> int:
  """Runs one mode; returns the process exit status."""
  quiet_library_logs()
  try:
    if mode == "summary":
      print(summary(config))
    elif mode == "train":
      run_setup = setup.build(config, workdir, mode="train")
      result = train.train_and_evaluate(config, workdir, run=run_setup,
                                        allow_config_changes=allow_config_changes)
      if "stopped_at_step" in result:
        return 0
      written = ["final_metrics.json", f"TensorBoard events (tensorboard --logdir={workdir})",
                 "checkpoints/"]
      if config.figures.enabled and jax.process_count() == 1:
        from alexnet_jax.tools import figures  # matplotlib only when figures are drawn

        paths = figures.write_all(config, workdir, run=run_setup)
        logging.info("figures: %s", ", ".join(paths))
        written.append("figures/")
      print(f"Done. Results in {workdir}: {', '.join(written)}.")
    elif mode == "eval" and follow:
      if step is not None:
        print("error: --follow evaluates every new checkpoint; --step picks one: give one "
              "of them", file=sys.stderr)
        return 2
      evaluate.follow(config, workdir)
    elif mode == "eval":
      evaluate.run_eval(config, workdir, step)
    elif mode == "predict":
      if jax.process_count() > 1:
        # Each process would print the whole output, and with the mesh's data axis across
        # processes fetching the predictions fails (arrays spanning non-addressable
        # devices). A few images gain nothing from more hosts: one process it is.
        print(f"error: --mode=predict runs in one process, not {jax.process_count()}: start "
              "it once, without --coordinator_address/--num_processes (or the JAX_* "
              "variables); it needs only the workdir", file=sys.stderr)
        return 2
      if not images:
        print("error: --mode=predict needs --images=a.jpg,b.jpg", file=sys.stderr)
        return 2
      evaluate.predict(config, workdir, images, step)
    else:
      raise ValueError(f"unknown mode {mode!r}")
  except USER_ERRORS as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  except Exception as err:
    # A stop outside the training loop (which saves and exits 0): nothing to save beyond
    # the checkpoints already written; the conventional status says it was stopped. A
    # signal that lands inside TensorFlow's input code (e.g. the final ten-crop
    # evaluation) comes back wrapped in TF's own error: find it in the chain.
    stop = _stop_in(err)
    if stop is None:
      raise
    kept = f"; the checkpoints in {workdir} are intact" if mode == "train" else ""
    print(f"stopped by {stop}{kept}: rerun the same command to continue", file=sys.stderr)
    return 128 + stop.signum
  return 0


def _stop_in(err: BaseException) -> Stopped | None:
  """The Stopped that caused `err` (itself, or anywhere in what it came from), if any."""
  return next((e for e in checkpoint.errors.errors_in(err) if isinstance(e, Stopped)), None)
