"""Checkpoints with orbax: asynchronous, atomic, the last K plus the best kept.

A checkpoint holds everything needed to continue exactly: the TrainState
(parameters, optimizer and plateau state, step, RNG) as item "state", and
as item "meta" the step (= the data stream's position: the stream is a pure
function of seed and step), the run's config and the model's config, which
a later run compares against its own before touching anything.

Restoring takes an abstract target whose shardings come from the current
mesh, so a checkpoint written on 8 devices restores onto 1 (and back).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

BEST_METRIC = "top1_error"


class CheckpointMismatch(ValueError):
  """The workdir holds a checkpoint of another network than the config describes."""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


class Checkpointer:
  """Saves and restores a run's TrainState in `workdir/checkpoints`."""

  def __init__(self, workdir: str, *, keep: int = 3, every_steps: int = 1,
               read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    policy = checkpoint_managers.preservation_policy.AnyPreservationPolicy([
        checkpoint_managers.preservation_policy.LatestN(n=keep),
        # Lowest validation error; checkpoints saved without an evaluation
        # are left to LatestN.
        checkpoint_managers.preservation_policy.BestN(
            get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1,
            keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every_steps, preservation_policy=policy,
        enable_async_checkpointing=True, cleanup_tmp_directories=True,
        read_only=read_only, create=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def save(self, state, config: ml_collections.ConfigDict, *,
           eval_metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` (returns once arrays are on host)."""
    step = int(jax.device_get(state.step))
    meta = {"step": step, "data_position": step,
            "model": json.loads(config.model.to_json()), "config": json.loads(config.to_json())}
    return self.manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        metrics=eval_metrics, force=force)

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored["meta"]

  def check_compatible(self, config: ml_collections.ConfigDict, step: int | None = None) -> None:
    """Raises CheckpointMismatch naming every model field that differs."""
    saved = _flatten(self.read_meta(step)["model"])
    ours = _flatten(json.loads(config.model.to_json()))
    # Fields that do not change the parameters or their meaning may differ.
    free = {"compute_dtype"}
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r} vs config {ours.get(k)!r}"
             for k in sorted(set(saved) | set(ours))
             if k not in free and saved.get(k) != ours.get(k)]
    if diffs:
      raise CheckpointMismatch(
          f"{self.directory} holds a checkpoint of another network (step "
          f"{step if step is not None else self.latest_step()}):\n  " + "\n  ".join(diffs)
          + "\nUse a new --workdir, or the config the checkpoint was trained with. "
          "Nothing was written.")

  def restore(self, abstract_state, step: int | None = None):
    """The state at `step` (default: latest), placed as `abstract_state`'s shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available: {self.all_steps()}")
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_state(state_shape, shardings):
  """ShapeDtypeStructs carrying the target shardings, for `Checkpointer.restore`."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      state_shape, shardings)
