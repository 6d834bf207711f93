"""The Checkpointer: a run's TrainState in `workdir/checkpoints`, saved and restored by orbax.

A checkpoint (directory `checkpoints/<step>`) holds the TrainState as item "state" (the
data position included) and, as item "meta", the run's config and, per array, its shape,
dtype and checksum. Orbax's "metrics" item holds the step's evaluation, if any; orbax's
preservation policy keeps the last K and the best from them, after any restart.

What it guarantees is listed in the package's docstring (alexnet_jax/checkpoint/__init__.py).
The workdir is a local path or a URI that etils.epath reaches (gs://bucket/run); a remote
one has no lock and no free-space check.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging as std_logging
import math
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from alexnet_jax import fileio
from alexnet_jax import lock as lock_lib
from alexnet_jax.checkpoint import compatibility, disk, errors, integrity
from alexnet_jax.checkpoint.errors import (CheckpointCorrupt, CheckpointGone,
                                           CheckpointNotFound, CheckpointWriteError)

BEST_METRIC = "top1_error"
FORMAT = 2  # meta["format"]; checkpoints without it (format 1) carry no checksums
DAMAGED_DIR = "damaged_checkpoints"  # under workdir: newer steps set aside on a fallback
_ITEMS = ("state", "meta")
# A live writer deletes an old step file by file after saving a newer one, so a reader can
# find it half deleted yet still listed. A reader waits this long for such a step (older
# than the newest) to leave the listing before calling it damaged: local deletes take
# milliseconds, an object store's a few seconds at most.
DELETION_WAIT_SECONDS = 5.0
_DELETION_POLL_SECONDS = 0.1
_LISTING_TRIES = 5  # a step deleted while orbax lists it fails that listing: list again


def _error(metrics) -> float:
  # An unevaluated checkpoint ranks below every evaluated one.
  return metrics.get(BEST_METRIC, math.inf)


def _agree(value: bool) -> bool:
  """Process 0's value on every process: decisions that all processes must take alike."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.int32(value)))


class Checkpointer:
  """Saves and restores a run's TrainState in `workdir/checkpoints`.

  Writable (the default): takes the workdir lock first (process 0, local workdirs; see
  lock.py), released by close(); resumes the run, so its config is compared whole.
  read_only: for eval and predict; takes no lock, writes nothing, compares the network.
  """

  def __init__(self, workdir: fileio.PathLike, *, keep: int = 3, read_only: bool = False):
    self._workdir = fileio.path(workdir)
    self._dir = self._workdir / "checkpoints"
    self.directory = str(self._dir)
    self.read_only = read_only
    self._lock = None
    self._quiet_writes = None
    self._quiet_vanished = None
    self._pending: tuple[int, int] | None = None  # (step, bytes) of the save in flight
    if read_only:
      self._quiet_vanished = errors.DropOrbaxVanishedStepNotices()
      std_logging.getLogger("absl").addFilter(self._quiet_vanished)
      # best_fn as a writer's, so that orbax's best_step() names the step the writer keeps.
      options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                             save_interval_steps=0, best_fn=_error,
                                             best_mode="min")
      with errors.quiet_read_only_notice():
        self.manager = _listed(lambda: ocp.CheckpointManager(self._dir, options=options,
                                                             item_names=_ITEMS))
      return
    if fileio.is_local(self._workdir):
      self._lock = self._take_lock()
    else:
      logging.warning("%s is not a local path: no workdir lock, so a second run writing it "
                      "would not be detected.", self._workdir)
    self._quiet_writes = errors.DropOrbaxWriteFailures()
    std_logging.getLogger("absl").addFilter(self._quiet_writes)
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(keep),
            # reverse: sorted by falling error, the last one (the lowest) is kept. Older
            # checkpoints without metrics are the last K's to keep, not BestN's.
            policies.BestN(get_metric_fn=_error, reverse=True, n=1,
                           keep_checkpoints_without_metrics=False)]),
        # best_fn makes orbax store each save's metrics and reload them after a restart:
        # BestN decides from them.
        best_fn=_error, best_mode="min",
        enable_async_checkpointing=True, cleanup_tmp_directories=True, create=True,
        # Directories made in save() itself: made in a thread, a failed mkdir (disk full)
        # leaves orbax's writer threads waiting 20 minutes for a signal that never comes.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    try:
      self.manager = ocp.CheckpointManager(self._dir, options=options, item_names=_ITEMS)
    except BaseException:
      self._release()
      raise

  def _take_lock(self) -> lock_lib.WorkdirLock | None:
    held, refusal = None, None
    if jax.process_index() == 0:
      try:
        held = lock_lib.WorkdirLock(str(self._workdir)).acquire()
      except lock_lib.WorkdirLocked as err:
        refusal = err
    if not _agree(refusal is None):
      raise refusal or lock_lib.WorkdirLocked(
          f"{self._workdir} is in use by another run (process 0 says who). Nothing was written.")
    return held

  def _release(self) -> None:
    if self._lock is not None:
      self._lock.release()
      self._lock = None
    for name in ("_quiet_writes", "_quiet_vanished"):
      if getattr(self, name) is not None:
        std_logging.getLogger("absl").removeFilter(getattr(self, name))
        setattr(self, name, None)

  # ---------------------------------------------------------------- steps

  def latest_step(self) -> int | None:
    """The newest step on disk (not verified: restore() checks it)."""
    return self.manager.latest_step()

  # save() refuses non-finite states, so the newest step is the newest finite one;
  # the name says so where the training loop recovers from a NaN.
  newest_finite_step = latest_step

  def all_steps(self) -> list[int]:
    """The steps listed when the manager last read the directory (see refresh)."""
    return sorted(self.manager.all_steps())

  def refresh(self) -> list[int]:
    """The steps on disk now: a reader beside a live run re-lists, as its writer saves new
    steps and deletes old ones. Steps still being written (orbax's tmp directories) are
    never listed."""
    _listed(self.manager.reload)
    return self.all_steps()

  def _being_written(self) -> str:
    """' (step N is being written ...)' where orbax's tmp directory of a save is there."""
    try:
      tmp = sorted(p.name.split(".")[0] for p in self._dir.glob("*.orbax-checkpoint-tmp*"))
    except OSError:
      return ""
    return (f" (step {', '.join(tmp)} is being written, or was when its run stopped: "
            "rerun once it is saved)" if tmp else "")

  # ---------------------------------------------------------------- save

  def save(self, state, config: ml_collections.ConfigDict, *,
           eval_metrics: dict[str, float] | None = None) -> bool:
    """Starts an asynchronous save of `state`; returns once its arrays are on the host.

    Returns False, with a warning, if the parameters or optimizer state hold a NaN or
    Inf: nothing is written. Raises CheckpointWriteError if the disk lacks the space
    (before writing) or a write fails (this save or the previous one, whose error
    surfaces here).
    """
    if self.read_only:
      raise ValueError(f"{self.directory} was opened read_only")
    step = int(jax.device_get(state.step))
    finite, checksums = integrity.fingerprint(state)
    if not finite:
      logging.warning("step %d: parameters or optimizer state hold NaN or Inf; not saved. "
                      "The newest finite checkpoint (step %s) is kept.", step,
                      self.latest_step())
      return False
    nbytes = disk.needed_bytes(state)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    self.wait()  # the previous save's failure, if any, is reported as its own
    self._check_space(step, nbytes)
    meta = {
        "format": FORMAT, "step": step,
        "saved_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "config": json.loads(config.to_json()),
        "leaves": {name: {"shape": list(np.shape(x)), "dtype": str(x.dtype), "checksum": value}
                   for (_, x), (name, value) in zip(leaves, checksums.items(), strict=True)},
    }
    # {} rather than None when unevaluated: orbax warns of every save without metrics.
    metrics = {k: float(v) for k, v in (eval_metrics or {}).items()}
    self._pending = (step, nbytes)
    with self._write_errors():
      saved = self.manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(meta)),
          metrics=metrics, force=True)
    if not saved:
      self._pending = None
    return saved

  def _check_space(self, step: int, nbytes: int) -> None:
    free = disk.free_bytes(self._dir)
    if free is None:
      return  # the write itself will tell
    if not _agree(free >= nbytes):
      raise CheckpointWriteError(
          f"not enough space to save step {step} in {self.directory}: needs about "
          f"{disk.mb(nbytes)}, {disk.mb(free)} free. Nothing was written; the previous checkpoint "
          f"(step {self.latest_step()}) is intact. Free space (or lower keep_checkpoints) "
          "and rerun to resume.")

  @contextlib.contextmanager
  def _write_errors(self):
    """Turns a failed write of the pending save into one CheckpointWriteError."""
    try:
      yield
    except Exception as err:
      reason = errors.write_failure(err)
      if reason is None or self._pending is None:
        raise
      step, nbytes = self._pending
      self._pending = None
      errors.drop_orbax_leftovers()
      if jax.process_index() == 0:
        disk.discard_partial(self._dir, step)
      self.manager.reload()
      raise CheckpointWriteError(
          f"could not write checkpoint step {step} to {self.directory}: {reason} "
          f"(needs about {disk.mb(nbytes)}; {disk.free_report(self._dir)} now). The previous "
          f"checkpoint (step {self.latest_step()}) is intact; fix this and rerun to resume "
          "from it.") from err

  def wait(self) -> None:
    """Blocks until the save in flight is on disk; raises CheckpointWriteError if it failed."""
    with self._write_errors():
      self.manager.wait_until_finished()
    self._pending = None

  def close(self) -> None:
    try:
      self.wait()
      self.manager.close()
    finally:
      self._release()

  # ---------------------------------------------------------------- restore

  def restore(self, abstract_state, step: int | None = None, *,
              config: ml_collections.ConfigDict | None = None, allow_changes: bool = False):
    """The verified state at `step`, placed as `abstract_state`'s shardings.

    step None: the newest intact checkpoint. A damaged one is reported in one warning
    and the next older one tried; for a writer, the newer steps that were passed over
    are moved to workdir/damaged_checkpoints/ so the run can save those steps again.
    With an explicit step, CheckpointCorrupt names what is wrong. A step that fails to
    read is listed again first: one a live writer deleted meanwhile (a reader beside a
    training run) is gone, not damaged: one INFO line and the newest one left is tried
    (for an explicit step, CheckpointGone).
    config: compared first (compatibility.compare: the whole run for a writer, the
    network for a reader; refusals before any array is read); the allowed differences
    are logged. Raises CheckpointNotFound (CheckpointGone), CheckpointMismatch,
    CheckpointCorrupt.
    """
    steps = self.all_steps()
    if not steps:
      raise CheckpointNotFound(f"no checkpoint in {self.directory}{self._being_written()}")
    if step is not None:
      if step not in steps:
        raise CheckpointNotFound(f"no checkpoint for step {step} in {self.directory}; "
                                 f"available: {steps}{self._being_written()}")
      try:
        return self._restore_step(step, abstract_state, config, allow_changes)
      except CheckpointCorrupt:
        if not self._went_away(step):
          raise
        raise CheckpointGone(
            f"checkpoint step {step} in {self.directory} went away while it was read: the "
            "run writing it deleted it after saving a newer one (keep_checkpoints); "
            f"available now: {self.all_steps()}", step) from None
    problems: dict[int, str] = {}
    gone: list[int] = []
    while left := [s for s in steps if s not in problems and s not in gone]:
      s = left[-1]
      try:
        state = self._restore_step(s, abstract_state, config, allow_changes)
      except CheckpointCorrupt as err:
        if self._went_away(s):
          gone.append(s)
          logging.info("checkpoint step %d in %s went away while it was read (the run "
                       "writing it deleted it after saving a newer one): using the newest "
                       "one left.", s, self.directory)
        else:
          problems[s] = err.problems[s]
          logging.warning("checkpoint step %d in %s is not usable (%s); trying the one "
                          "before.", s, self.directory, problems[s])
        steps = self.all_steps()  # a reader's _went_away listed them again: newer ones too
        continue
      if problems and not self.read_only:
        self._set_aside(sorted(problems))
      return state
    if not problems:
      raise CheckpointNotFound(
          f"no checkpoint in {self.directory}: step {', '.join(map(str, gone))} went away "
          "while it was read (deleted by the run writing it)")
    found = "; ".join(f"step {s}: {p}" for s, p in sorted(problems.items()))
    if self.read_only:
      # A reader may be beside a live run: whatever it found, the checkpoints are the
      # writer's to mend (a resumed run sets damaged steps aside itself).
      raise CheckpointCorrupt(
          f"no intact checkpoint in {self.directory}: {found}. Nothing was changed. If a "
          "run is training there, rerun this once it has saved its next checkpoint; "
          "resuming the training sets damaged steps aside.", problems)
    raise CheckpointCorrupt(
        f"no intact checkpoint in {self.directory}: {found}. Nothing was changed; move them "
        "away (or use a new --workdir) to start afresh.", problems)

  def _went_away(self, step: int) -> bool:
    """Whether `step`, which a reader failed to read, is a step a live writer deleted (or
    is deleting), not a damaged one: it has left the listing, or leaves it within
    DELETION_WAIT_SECONDS while a newer step is there. Never for a writer: it holds the
    workdir lock, so no other run deletes its steps."""
    if not self.read_only:
      return False
    steps = self.refresh()
    if step not in steps:
      return True
    if step >= steps[-1]:
      return False  # the newest step is never the one a writer deletes
    deadline = time.monotonic() + DELETION_WAIT_SECONDS
    while time.monotonic() < deadline:
      time.sleep(_DELETION_POLL_SECONDS)
      if step not in self.refresh():
        return True
    return False

  def _restore_step(self, step: int, abstract_state, config, allow_changes: bool):
    def corrupt(problem: str) -> CheckpointCorrupt:
      return CheckpointCorrupt(
          f"checkpoint step {step} in {self.directory} is damaged: {problem}", {step: problem})

    meta = integrity.read_meta(self.manager, self._dir, step)
    if config is not None:
      for line in compatibility.compare(meta["config"], config, model_only=self.read_only,
                                        allow_changes=allow_changes,
                                        directory=self.directory, step=step):
        logging.warning("resuming step %d with a changed config: %s", step, line)
    stored = meta.get("leaves")
    if stored is not None:
      integrity.check_structure(stored, abstract_state, directory=self.directory, step=step)
    try:
      state = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]
    except Exception as err:
      errors.drop_orbax_leftovers()
      raise corrupt(f"the arrays cannot be read ({errors.one_line(err)})") from err
    if stored is None:
      logging.info("checkpoint step %d has no checksums (an older format): not verified", step)
      return state
    problem = integrity.checksum_problem(stored, state)
    if problem is not None:
      raise corrupt(problem)
    return state

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unusable newer steps out of the way (kept for inspection, not deleted)."""
    target = self._workdir / DAMAGED_DIR
    if jax.process_index() == 0:
      target.mkdir(parents=True, exist_ok=True)
      for step in steps:
        dest, n = target / str(step), 1
        while dest.exists():
          dest, n = target / f"{step}.{n}", n + 1
        (self._dir / str(step)).rename(dest)
      logging.warning("moved the unusable checkpoints %s to %s (delete them when done)",
                      steps, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("alexnet_jax checkpoint set aside")
    self.manager.reload()


def _listed(read):
  """read() (a manager's listing of the steps), tried again where a step was deleted
  while orbax read its metadata: the listing itself then fails (FileNotFoundError, or
  NotADirectoryError from orbax's metadata check)."""
  for attempt in range(_LISTING_TRIES):
    try:
      return read()
    except OSError:
      if attempt == _LISTING_TRIES - 1:
        raise
      time.sleep(_DELETION_POLL_SECONDS)
