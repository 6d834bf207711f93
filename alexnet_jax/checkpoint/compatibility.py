"""Which config changes a checkpoint may be resumed or read under.

Guarantees: a writer (resuming a run) is refused a checkpoint whose config differs in any
field that changes what a step computes from the data, naming every such field, unless
the user allows changes (ALLOW_CHANGES_FLAG); the fields in RESUMABLE, and fields that
only one side knows (a code change, whose default keeps the old behaviour), are returned
to be logged. A reader (eval, predict) is refused only another network.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections
from flax import traverse_util

from alexnet_jax.checkpoint.errors import CheckpointMismatch

# The CLI flag that passes `allow_changes=True`, named in refusals.
ALLOW_CHANGES_FLAG = "--allow_config_changes"

# Config fields that may differ when a run is resumed: they change how long, how
# often, where or how fast the run goes, or its learning rate (the paper lowered
# its rate by hand), not what a step computes from the data. Differences are
# returned and logged. Every other field (batch size, seed, dataset, optimizer,
# augmentation, model, and any field not listed here) is refused unless the
# caller allows changes. A name ending in "." covers the section.
RESUMABLE = (
    "optim.learning_rate", "optim.schedule", "optim.boundaries_epochs", "optim.decay_factor",
    "optim.plateau_patience", "optim.plateau_max_reductions", "optim.plateau_min_delta",
    "optim.warmup_epochs", "optim.layer_lr_multipliers", "optim.bias_lr_multiplier",
    "num_epochs", "num_train_steps", "eval_every_steps", "eval_ten_crop", "eval_batch_size",
    "eval_follow_poll_seconds",
    "checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "profile_steps",
    "on_nonfinite", "nonfinite_max_rollbacks", "mesh.", "microbatch_size", "model.compute_dtype",
    "model.conv_impl", "memory_check",
    "dataset.data_dir", "dataset.manual_dir", "dataset.cache_dir", "dataset.image_folder",
    "input.square_cache", "input.num_parallel_calls", "input.prefetch", "input.on_bad_image",
    "figures.",
)
# Evaluating or predicting needs the same network only; how it was trained may differ.
# (model.conv_impl: whose kernels compute the same convolution, XLA's or oneDNN's.)
MODEL_FREE = ("model.compute_dtype", "model.conv_impl")


def _flat_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return traverse_util.flatten_dict(json.loads(config.to_json()), sep=".")


def _matches(field: str, names: tuple[str, ...]) -> bool:
  return any(field == n or (n.endswith(".") and field.startswith(n)) for n in names)


def compare(saved_config: dict, config: ml_collections.ConfigDict, *, model_only: bool,
            allow_changes: bool, directory: str, step: int) -> list[str]:
  """The allowed differences ("field: checkpoint X vs config Y"), for the caller to log.

  saved_config: the checkpoint's config, as its meta item holds it; model_only: compare
  the network's fields only (a reader); directory and step: named in a refusal.
  Raises CheckpointMismatch naming every refused field.
  """
  saved = traverse_util.flatten_dict(saved_config, sep=".")
  ours = _flat_json(config)
  absent = "(absent)"
  refused, changes = [], []
  for key in sorted(set(saved) | set(ours)):
    before, after = saved.get(key, absent), ours.get(key, absent)
    if before == after:
      continue
    line = f"{key}: checkpoint {before!r} vs config {after!r}"
    if model_only:
      if key.startswith("model.") and not _matches(key, MODEL_FREE):
        refused.append(line)
    elif absent in (before, after) or _matches(key, RESUMABLE):
      # A field only one side knows came with a code change; its default keeps
      # the old behaviour, so it is reported, not refused.
      changes.append(line)
    else:
      refused.append(line)
  if refused and not allow_changes:
    if all(line.startswith("model.") for line in refused):
      what = "another network"
      fix = "Use a new --workdir, or the config the checkpoint was trained with."
    else:
      what = "a run with another configuration; resuming would change what the run means"
      fix = (f"Use the checkpoint's values or a new --workdir, or pass {ALLOW_CHANGES_FLAG} "
             "to continue with the new values.")
    raise CheckpointMismatch(
        f"{directory} holds a checkpoint of {what} (step {step}):\n  " + "\n  ".join(refused)
        + f"\n{fix} Nothing was written.", refused)
  return changes + (refused if allow_changes else [])
