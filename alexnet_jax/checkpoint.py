"""Checkpoints with orbax: asynchronous, atomic, verified; the last K, the best and the newest
finite one kept.

A checkpoint (directory `workdir/checkpoints/<step>`) holds the TrainState as item
"state" (the data position included) and, as item "meta", the run's config and,
per array, its shape, dtype and a checksum of its bytes. Orbax's "metrics" item holds the evaluation
metrics and whether the parameters were finite, so that the keep policy still
knows the best and the newest finite checkpoint after any number of restarts.

What this module guarantees (tests/test_checkpoint.py checks each):
  * nothing non-finite is saved (params and optimizer state are checked on the
    device before each save, in the same pass that computes the checksums);
  * the newest finite checkpoint and the best evaluated one are never deleted;
  * restore verifies the checksums; a damaged or incomplete newest checkpoint is
    reported in one warning and the newest intact one is used instead;
  * a failed write (disk full) is one CheckpointWriteError; the previous
    checkpoint stays intact;
  * a writer holds the workdir lock (alexnet_jax/lock.py) before orbax touches
    the directory, so a second run cannot delete the first one's save;
  * resuming under a config that changes the run's meaning is refused, naming
    the fields, before anything is read with orbax.

Restoring takes an abstract target whose shardings come from the current mesh,
so a checkpoint written on 8 devices restores onto 1 (and back); the checksums
do not depend on the sharding.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging as std_logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from alexnet_jax import lock as lock_lib

BEST_METRIC = "top1_error"
FINITE_METRIC = "finite"  # stored with every checkpoint's metrics: 1.0 or 0.0
FORMAT = 2  # meta["format"]; checkpoints without it (format 1) carry no checksums
# The CLI flag that passes `allow_changes=True`, named in refusals.
ALLOW_CHANGES_FLAG = "--allow_config_changes"
DAMAGED_DIR = "damaged_checkpoints"  # under workdir: newer steps set aside on a fallback

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
    "checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "profile_steps",
    "on_nonfinite", "nonfinite_max_rollbacks", "mesh.", "microbatch_size", "model.compute_dtype",
    "dataset.data_dir", "dataset.manual_dir", "dataset.cache_dir", "dataset.image_folder",
    "input.square_cache", "input.num_parallel_calls", "input.prefetch", "input.on_bad_image",
    "figures.",
)
# Evaluating or predicting needs the same network only; how it was trained may differ.
MODEL_FREE = ("model.compute_dtype",)


class CheckpointError(Exception):
  """A checkpoint problem the user can act on: the CLI prints it in one line."""


class CheckpointMismatch(CheckpointError, ValueError):
  """The checkpoint was written under a config that differs where it matters.

  `differences`: one "field: checkpoint X vs config Y" line each.
  """

  def __init__(self, message: str, differences: list[str]):
    super().__init__(message)
    self.differences = differences


class CheckpointNotFound(CheckpointError, FileNotFoundError):
  """No checkpoint at all, or none for the step asked for."""


class CheckpointCorrupt(CheckpointError):
  """A checkpoint is damaged or incomplete; `problems` maps each bad step to why."""

  def __init__(self, message: str, problems: dict[int, str]):
    super().__init__(message)
    self.problems = problems


class CheckpointWriteError(CheckpointError):
  """A save could not be written (disk full, permissions); the previous ones are intact."""


# What the CLI should print in one line without a traceback.
USER_ERRORS = (CheckpointError, lock_lib.WorkdirLocked)


# ------------------------------------------------------------------ checksums

def _fmix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's finaliser: a bijection of uint32 that mixes every bit."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _as_uint32(x: jax.Array) -> jax.Array:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = x.dtype.itemsize
  if size == 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  if size in (1, 2):
    unsigned = jnp.uint8 if size == 1 else jnp.uint16
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # a trailing axis of 2 words
  raise TypeError(f"cannot checksum dtype {x.dtype}")


def _leaf_hash(x: jax.Array) -> jax.Array:
  """Two 32-bit sums of a hash of (value, position) over the array: uint32 [2].

  Each element's hash is a bijection of its bits for a fixed position, so any
  one changed element changes both sums; several changed elements go unnoticed
  with a probability of about 2^-64. Modular sums do not depend on the order of
  the reduction, so the result is the same on any mesh.
  """
  words = _as_uint32(jnp.asarray(x))
  shape = words.shape
  position = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    position = position + (jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
                           * jnp.uint32(stride % 2**32))
    stride *= shape[axis]
  lanes = []
  for seed in (0x9E3779B9, 0x7F4A7C15):
    key = _fmix32(position * jnp.uint32(0x61C88647) + jnp.uint32(seed))
    lanes.append(jnp.sum(_fmix32(words ^ key), dtype=jnp.uint32))
  return jnp.stack(lanes)


def _checked_for_finite(path: tuple) -> bool:
  # The plateau schedule's state holds +inf by design (no best value yet).
  first = jax.tree_util.keystr(path[:1], simple=True, separator=".")
  return first not in ("plateau", "step", "rng")


@jax.jit
def _fingerprint(tree) -> tuple[jax.Array, jax.Array]:
  """(all params and optimizer state finite, uint32 [leaves, 2] checksums): one pass."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  hashes = (jnp.stack([_leaf_hash(x) for _, x in leaves]) if leaves
            else jnp.zeros((0, 2), jnp.uint32))
  finite = jnp.array(True)
  for path, x in leaves:
    if _checked_for_finite(path) and jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact):
      finite = finite & jnp.all(jnp.isfinite(x))
  return finite, hashes


def _leaf_names(tree) -> list[str]:
  return [jax.tree_util.keystr(path, simple=True, separator=".")
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def fingerprint(tree) -> tuple[bool, dict[str, str]]:
  """(finite, {leaf name: 16 hex digits}) of a pytree of (possibly sharded) arrays."""
  finite, hashes = _fingerprint(tree)
  hashes = np.asarray(hashes)
  return bool(finite), {name: f"{int(a):08x}{int(b):08x}"
                        for name, (a, b) in zip(_leaf_names(tree), hashes, strict=True)}


# ------------------------------------------------------------------ helpers

def _flat_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return traverse_util.flatten_dict(json.loads(config.to_json()), sep=".")


def _matches(field: str, names: tuple[str, ...]) -> bool:
  return any(field == n or (n.endswith(".") and field.startswith(n)) for n in names)


def _one_line(err: BaseException) -> str:
  """The first line of the innermost error: orbax wraps tensorstore's clear status
  ("Truncated Zstd-compressed stream") in a message that dumps the whole spec."""
  while (err.__cause__ or err.__context__) is not None:
    err = err.__cause__ or err.__context__
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0] if text else ''}"[:400]


def _errors_in(err: BaseException) -> Iterator[BaseException]:
  seen = set()
  todo = [err]
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO, errno.EFBIG)
_WRITE_WORDS = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                "Permission denied", "File too large", "Input/output error")


def _write_failure(err: BaseException) -> str | None:
  """The OS's reason if `err` (or one it came from) is a failed write, else None.

  tensorstore reports a failed write as a ValueError holding the OS's message,
  not as an OSError, hence the message test.
  """
  for e in _errors_in(err):
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
      return os.strerror(e.errno)
    for words in _WRITE_WORDS:
      if words in str(e):
        return words
  return None


def _mb(nbytes: float) -> str:
  return f"{nbytes / 2**20:.1f} MiB"


def _free_bytes(directory: str) -> int | None:
  try:
    st = os.statvfs(directory)
  except OSError:
    return None  # e.g. not a local filesystem
  return st.f_bavail * st.f_frsize


def _free_report(directory: str) -> str:
  """What is free: bytes, and files when those run out (a full inode table is ENOSPC too)."""
  try:
    st = os.statvfs(directory)
  except OSError:
    return "free space unknown"
  text = f"{_mb(st.f_bavail * st.f_frsize)} free"
  if st.f_files and st.f_favail < 1000:
    text += f" and room for {st.f_favail} more files"
  return text


def _agree(value: bool) -> bool:
  """Process 0's value on every process: decisions that all processes must take alike."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return bool(multihost_utils.broadcast_one_to_all(np.int32(value)))


class _DropOrbaxWriteFailures(std_logging.Filter):
  """orbax logs a failed write once per thread, each with its traceback (31 for one full
  disk); Checkpointer reports it once, as a CheckpointWriteError."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno < std_logging.ERROR or "orbax" not in record.pathname:
      return True
    err = record.exc_info[1] if record.exc_info else None
    return not ((err is not None and _write_failure(err))
                or any(words in record.getMessage() for words in _WRITE_WORDS))


def _drop_orbax_leftovers() -> None:
  """From now on, drops what orbax's abandoned operations print.

  A failed restore or save leaves orbax's other coroutines to die unawaited (or to
  call into their closed event loop), on their own threads and at their own time,
  and Python prints each one's traceback when it is collected: raw tracebacks after
  the one-line report. Installed once, on the first failure; it drops only those.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_orbax_leftovers", False):
    return

  def hook(unraisable):
    text = str(unraisable.exc_value)
    if "while reading array index" not in text and text != "Event loop is closed":
      previous(unraisable)

  hook.drops_orbax_leftovers = True
  sys.unraisablehook = hook


class _DropOrbaxReadOnlyNotice(std_logging.Filter):
  """orbax logs 'Given directory is read only' unconditionally for a reader."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


@contextlib.contextmanager
def _quiet_read_only_notice():
  logger = std_logging.getLogger("absl")
  notice = _DropOrbaxReadOnlyNotice()
  logger.addFilter(notice)
  try:
    yield
  finally:
    logger.removeFilter(notice)


class _KeepPolicy:
  """Keeps the last `keep`, the best evaluated and the newest finite checkpoint.

  Reads only the metrics orbax stores with each checkpoint, so it decides the
  same after a restart. Checkpoints without metrics (written before metrics were
  stored) count as finite and unevaluated.
  """

  def __init__(self, keep: int):
    self.keep = keep

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    n = len(checkpoints)
    keep = [i >= n - self.keep for i in range(n)]
    finite = [i for i, c in enumerate(checkpoints) if _is_finite(c.metrics)]
    if finite:
      keep[finite[-1]] = True
    scored = [(c.metrics[BEST_METRIC], i) for i, c in enumerate(checkpoints)
              if i in finite and c.metrics and BEST_METRIC in c.metrics]
    if scored:
      keep[min(scored)[1]] = True
    return keep


def _is_finite(metrics: dict | None) -> bool:
  return not metrics or bool(metrics.get(FINITE_METRIC, 1.0))


# ------------------------------------------------------------------ the checkpointer

class Checkpointer:
  """Saves and restores a run's TrainState in `workdir/checkpoints`.

  Writable (the default): takes the workdir lock first (process 0; see lock.py),
  released by close(). read_only: for eval and predict; takes no lock, writes
  nothing.
  """

  def __init__(self, workdir: str, *, keep: int = 3, read_only: bool = False,
               lock: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.read_only = read_only
    self._lock = None
    self._quiet_writes = None
    self._pending: tuple[int, int] | None = None  # (step, bytes) of the save in flight
    if not read_only and lock:
      self._lock = self._take_lock()
    if read_only:
      options = ocp.CheckpointManagerOptions(
          read_only=True, create=False, save_interval_steps=0,
          best_fn=lambda m: m.get(BEST_METRIC, math.inf), best_mode="min")
      with _quiet_read_only_notice():
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))
      return
    self._quiet_writes = _DropOrbaxWriteFailures()
    std_logging.getLogger("absl").addFilter(self._quiet_writes)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=_KeepPolicy(keep),
        # best_fn makes orbax store and reload the metrics the policy reads; the
        # policy, not best_fn, decides what is kept.
        best_fn=lambda m: m.get(BEST_METRIC, math.inf), best_mode="min",
        enable_async_checkpointing=True, cleanup_tmp_directories=True, create=True,
        # Directories made in save() itself: made in a thread, a failed mkdir (disk full)
        # leaves orbax's writer threads waiting 20 minutes for a signal that never comes.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("state", "meta"))
    except BaseException:
      self._release()
      raise

  def _take_lock(self) -> lock_lib.WorkdirLock | None:
    held, refusal = None, None
    if jax.process_index() == 0:
      try:
        held = lock_lib.WorkdirLock(self.workdir).acquire()
      except lock_lib.WorkdirLocked as err:
        refusal = err
    if not _agree(refusal is None):
      raise refusal or lock_lib.WorkdirLocked(
          f"{self.workdir} is in use by another run (process 0 says who). Nothing was written.")
    return held

  def _release(self) -> None:
    if self._lock is not None:
      self._lock.release()
      self._lock = None
    if self._quiet_writes is not None:
      std_logging.getLogger("absl").removeFilter(self._quiet_writes)
      self._quiet_writes = None

  # ---------------------------------------------------------------- steps

  def latest_step(self) -> int | None:
    """The newest step on disk (not verified: restore() checks it)."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def _metrics(self, step: int) -> dict | None:
    try:
      return self.manager.metrics(step)
    except Exception:  # a damaged metrics file: nothing known about this step
      return None

  def best_step(self) -> int | None:
    """The finite checkpoint with the lowest top-1 error; None if none was evaluated."""
    scored = []
    for step in self.all_steps():
      m = self._metrics(step)
      if m and BEST_METRIC in m and _is_finite(m):
        scored.append((m[BEST_METRIC], step))
    return min(scored)[1] if scored else None

  def newest_finite_step(self) -> int | None:
    """The newest checkpoint whose parameters and optimizer state were finite when saved.

    Checkpoints written before this was recorded count as finite.
    """
    finite = [s for s in self.all_steps() if _is_finite(self._metrics(s))]
    return finite[-1] if finite else None

  # ---------------------------------------------------------------- save

  def save(self, state, config: ml_collections.ConfigDict, *,
           eval_metrics: dict[str, float] | None = None, save_nonfinite: bool = False) -> bool:
    """Starts an asynchronous save of `state`; returns once its arrays are on the host.

    Returns False, with a warning, if the parameters or optimizer state hold a NaN or
    Inf: nothing is written (save_nonfinite=True writes it anyway, for inspection;
    it is marked, never restored by default, and the newest finite one is kept).
    Raises CheckpointWriteError if the disk lacks the space (before writing) or a
    write fails (this save or the previous one, whose error surfaces here).
    """
    if self.read_only:
      raise ValueError(f"{self.directory} was opened read_only")
    step = int(jax.device_get(state.step))
    finite, checksums = fingerprint(state)
    if not finite and not save_nonfinite:
      logging.warning("step %d: parameters or optimizer state hold NaN or Inf; not saved. "
                      "The newest finite checkpoint (step %s) is kept.", step,
                      self.newest_finite_step())
      return False
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    # The arrays' raw size (orbax compresses random-looking floats by a few per cent) and
    # the metadata files around them.
    nbytes = (sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for _, x in leaves)
              + 64 * 1024 + 1024 * len(leaves))
    self.wait()  # the previous save's failure, if any, is reported as its own
    self._check_space(step, nbytes)
    meta = {
        "format": FORMAT, "step": step, "finite": finite,
        "saved_at": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "config": json.loads(config.to_json()),
        "leaves": {name: {"shape": list(np.shape(x)), "dtype": str(x.dtype), "checksum": value}
                   for (_, x), (name, value) in zip(leaves, checksums.items(), strict=True)},
    }
    metrics = {FINITE_METRIC: float(finite),
               **{k: float(v) for k, v in (eval_metrics or {}).items()}}
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
    free = _free_bytes(self.directory)
    if free is None:
      return  # the write itself will tell
    if not _agree(free >= nbytes):
      raise CheckpointWriteError(
          f"not enough space to save step {step} in {self.directory}: needs about "
          f"{_mb(nbytes)}, {_mb(free)} free. Nothing was written; the previous checkpoint "
          f"(step {self.latest_step()}) is intact. Free space (or lower keep_checkpoints) "
          "and rerun to resume.")

  @contextlib.contextmanager
  def _write_errors(self):
    """Turns a failed write of the pending save into one CheckpointWriteError."""
    try:
      yield
    except Exception as err:
      reason = _write_failure(err)
      if reason is None or self._pending is None:
        raise
      step, nbytes = self._pending
      self._pending = None
      _drop_orbax_leftovers()
      self._discard_partial(step)
      raise CheckpointWriteError(
          f"could not write checkpoint step {step} to {self.directory}: {reason} "
          f"(needs about {_mb(nbytes)}; {_free_report(self.directory)} now). The previous "
          f"checkpoint (step {self.latest_step()}) is intact; fix this and rerun to resume "
          "from it.") from err

  def _discard_partial(self, step: int) -> None:
    """Removes what the failed save left (frees the space), then rereads the steps.

    Best effort: orbax's other writer threads may still create a directory or two
    after the failure surfaced (retried briefly); the next writer's start-up removes
    any leftover, and a leftover is never taken for a checkpoint.
    """
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      for _ in range(5):
        partial = [os.path.join(self.directory, name) for name in os.listdir(self.directory)
                   if name.startswith(f"{step}.orbax-checkpoint-tmp")]
        if not partial:
          break
        for path in partial:
          shutil.rmtree(path, ignore_errors=True)
        time.sleep(0.1)
    self.manager.reload()

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

  # ---------------------------------------------------------------- meta and config

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _missing(self, step: int) -> str | None:
    """Why step's directory is incomplete (files every save writes), or None."""
    path = self._step_dir(step)
    if not os.path.isdir(path):
      return "its directory is gone"
    if not os.listdir(path):
      return "empty directory"
    for name in ("_CHECKPOINT_METADATA", "meta/metadata", "state/_METADATA",
                 "state/manifest.ocdbt"):
      if not os.path.exists(os.path.join(path, name)):
        return f"{name} is missing"
    return None

  def _read_meta(self, step: int) -> dict[str, Any]:
    """The step's meta item; CheckpointCorrupt naming the step if it is unreadable."""
    problem = self._missing(step)
    if problem is None:
      try:
        meta = self.manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except Exception as err:
        problem = f"meta/metadata is unreadable ({_one_line(err)})"
      else:
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
          problem = "meta/metadata holds no config"
        else:
          return meta
    raise CheckpointCorrupt(f"checkpoint step {step} in {self.directory} is damaged: {problem}",
                            {step: problem})

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The meta item of `step` (default: the newest step whose meta is readable)."""
    if step is not None:
      return self._read_meta(step)
    for s in reversed(self.all_steps()):
      try:
        return self._read_meta(s)
      except CheckpointCorrupt as err:
        logging.warning("%s", err)
    raise CheckpointNotFound(f"no readable checkpoint in {self.directory}")

  def _scope(self, scope: str | None) -> str:
    if scope is None:  # a writer continues the run; a reader only needs the network
      return "model" if self.read_only else "run"
    if scope not in ("run", "model"):
      raise ValueError(f"scope must be 'run' or 'model', not {scope!r}")
    return scope

  def _compare(self, meta: dict, step: int, config: ml_collections.ConfigDict, scope: str,
               allow_changes: bool) -> list[str]:
    saved = traverse_util.flatten_dict(meta["config"], sep=".")
    ours = _flat_json(config)
    absent = "(absent)"
    refused, changes = [], []
    for key in sorted(set(saved) | set(ours)):
      before, after = saved.get(key, absent), ours.get(key, absent)
      if before == after:
        continue
      line = f"{key}: checkpoint {before!r} vs config {after!r}"
      if scope == "model":
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
          f"{self.directory} holds a checkpoint of {what} (step {step}):\n  "
          + "\n  ".join(refused) + f"\n{fix} Nothing was written.", refused)
    return changes + (refused if allow_changes else [])

  def check_compatible(self, config: ml_collections.ConfigDict, step: int | None = None, *,
                       scope: str | None = None, allow_changes: bool = False) -> list[str]:
    """Raises CheckpointMismatch naming every field that differs where it matters.

    scope "run" (default for a writer): every field not in RESUMABLE; "model"
    (default read_only): the network's fields. Returns the differences that are
    allowed ("field: checkpoint X vs config Y"), which the caller should log.
    step None: the newest step whose meta is readable.
    """
    meta = self.read_meta(step)
    return self._compare(meta, meta.get("step", step), config, self._scope(scope),
                         allow_changes)

  # ---------------------------------------------------------------- restore

  def restore(self, abstract_state, step: int | None = None, *,
              config: ml_collections.ConfigDict | None = None, scope: str | None = None,
              allow_changes: bool = False):
    """The verified state at `step`, placed as `abstract_state`'s shardings.

    step None: the newest intact, finite checkpoint. A damaged one is reported in
    one warning and the next older one tried; for a writer, the newer steps that
    were passed over are moved to workdir/damaged_checkpoints/ so the run can save
    those steps again. With an explicit step, CheckpointCorrupt names what is wrong.
    config: checked first (check_compatible; refusals before any array is read);
    the allowed differences are logged.
    Raises CheckpointNotFound, CheckpointMismatch, CheckpointCorrupt.
    """
    steps = self.all_steps()
    if not steps:
      raise CheckpointNotFound(f"no checkpoint in {self.directory}")
    if step is not None:
      if step not in steps:
        raise CheckpointNotFound(f"no checkpoint for step {step} in {self.directory}; "
                                 f"available: {steps}")
      return self._restore_step(step, abstract_state, config, scope, allow_changes,
                                need_finite=False)
    problems: dict[int, str] = {}
    for s in reversed(steps):
      try:
        state = self._restore_step(s, abstract_state, config, scope, allow_changes,
                                   need_finite=True)
      except CheckpointCorrupt as err:
        problems[s] = err.problems[s]
        logging.warning("checkpoint step %d in %s is not usable (%s); trying the one before.",
                        s, self.directory, problems[s])
        continue
      if problems and not self.read_only:
        self._set_aside(sorted(problems))
      return state
    raise CheckpointCorrupt(
        f"no intact checkpoint in {self.directory}: "
        + "; ".join(f"step {s}: {p}" for s, p in sorted(problems.items()))
        + ". Nothing was changed; move them away (or use a new --workdir) to start afresh.",
        problems)

  def _restore_step(self, step: int, abstract_state, config, scope, allow_changes,
                    need_finite: bool):
    def corrupt(problem: str) -> CheckpointCorrupt:
      return CheckpointCorrupt(
          f"checkpoint step {step} in {self.directory} is damaged: {problem}", {step: problem})

    meta = self._read_meta(step)
    if config is not None:
      for line in self._compare(meta, step, config, self._scope(scope), allow_changes):
        logging.warning("resuming step %d with a changed config: %s", step, line)
    if need_finite and meta.get("finite") is False:
      raise CheckpointCorrupt(f"checkpoint step {step} holds NaN or Inf (saved for inspection)",
                              {step: "its parameters hold NaN or Inf (saved for inspection)"})
    stored = meta.get("leaves")
    if stored is not None:
      self._check_structure(step, stored, abstract_state)
    try:
      state = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))["state"]
    except Exception as err:
      _drop_orbax_leftovers()
      raise corrupt(f"the arrays cannot be read ({_one_line(err)})") from err
    if stored is None:
      logging.info("checkpoint step %d has no checksums (an older format): not verified", step)
      return state
    _, checksums = fingerprint(state)
    bad = [name for name, value in checksums.items() if stored[name]["checksum"] != value]
    if bad:
      more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
      raise corrupt(f"array data does not match its checksum: {', '.join(bad[:3])}{more}")
    return state

  def _check_structure(self, step: int, stored: dict, abstract_state) -> None:
    """Refuses a target of other arrays (e.g. another optimizer) before orbax reads."""
    target = {jax.tree_util.keystr(path, simple=True, separator="."): x
              for path, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    diffs = [f"{name}: only in the checkpoint" for name in sorted(set(stored) - set(target))]
    diffs += [f"{name}: only in the config's state" for name in sorted(set(target) - set(stored))]
    for name in sorted(set(stored) & set(target)):
      want = (tuple(stored[name]["shape"]), stored[name]["dtype"])
      got = (tuple(target[name].shape), str(target[name].dtype))
      if want != got:
        diffs.append(f"{name}: checkpoint {want[1]}{list(want[0])} vs config "
                     f"{got[1]}{list(got[0])}")
    if diffs:
      raise CheckpointMismatch(
          f"{self.directory} step {step} holds other arrays than this config's state:\n  "
          + "\n  ".join(diffs[:10]) + ("\n  ..." if len(diffs) > 10 else "")
          + "\nUse the config the checkpoint was trained with, or a new --workdir.", diffs)

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unusable newer steps out of the way (kept for inspection, not deleted)."""
    target = os.path.join(self.workdir, DAMAGED_DIR)
    if jax.process_index() == 0:
      os.makedirs(target, exist_ok=True)
      for step in steps:
        dest = os.path.join(target, str(step))
        n = 1
        while os.path.exists(dest):
          dest, n = os.path.join(target, f"{step}.{n}"), n + 1
        shutil.move(self._step_dir(step), dest)
      logging.warning("moved the unusable checkpoints %s to %s (delete them when done)",
                      steps, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("alexnet_jax checkpoint set aside")
    self.manager.reload()
