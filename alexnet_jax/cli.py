"""One library call per --mode, with user errors turned into one clear message.

A mistake in the config, a missing dataset or a workdir of another network
is not a crash: it prints what is wrong and how to fix it, and exits 2
without a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import jax
import ml_collections

from alexnet_jax import checkpoint, config_checks, input_pipeline, model


def _user_errors() -> tuple[type[BaseException], ...]:
  from alexnet_jax import train

  return (config_checks.ConfigError, input_pipeline.DatasetNotFoundError,
          checkpoint.CheckpointMismatch, train.NonFiniteLossError, input_pipeline.BadImageError,
          FileNotFoundError)


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
    return record.levelno >= logging.WARNING or "site-packages" not in record.pathname


def quiet_library_logs() -> None:
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_OnlyOurInfo())


def run(mode: str, config: ml_collections.ConfigDict, workdir: str | None, *,
        step: int | None = None, images: Sequence[str] = ()) -> int:
  """Runs one mode; returns the process exit status."""
  from alexnet_jax import evaluate, train

  quiet_library_logs()
  try:
    if mode == "summary":
      print(summary(config))
    elif mode == "train":
      result = train.train_and_evaluate(config, workdir)
      if "stopped_at_step" not in result:
        print(f"Done. Results in {workdir}: final_metrics.json, TensorBoard events "
              f"(tensorboard --logdir={workdir}), checkpoints/, figures/.")
    elif mode == "eval":
      evaluate.run_eval(config, workdir, step)
    elif mode == "predict":
      if not images:
        print("error: --mode=predict needs --images=a.jpg,b.jpg", file=sys.stderr)
        return 2
      evaluate.predict(config, workdir, images, step)
    else:
      raise ValueError(f"unknown mode {mode!r}")
  except _user_errors() as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  return 0
