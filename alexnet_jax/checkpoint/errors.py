"""What can go wrong with a checkpoint, said once and in words the user can act on.

Guarantees: every problem the CLI should print in one line, without a traceback, is a
CheckpointError or the lock's WorkdirLocked (USER_ERRORS); a failed write is recognised by
the OS's reason however deep orbax and tensorstore wrapped it (`write_failure`); and what
orbax itself prints about a failure that the Checkpointer reports (a traceback per writer
thread, tracebacks of abandoned coroutines, a reader's read-only notice, the missing
metadata of a step deleted while a reader lists it) is dropped, and nothing else is.
"""

from __future__ import annotations

import contextlib
import errno
import logging as std_logging
import os
import sys
import warnings
from collections.abc import Iterator

from alexnet_jax import lock as lock_lib


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


class CheckpointGone(CheckpointNotFound):
  """A listed step went away while it was read: the live run writing the workdir deleted
  it (its keep policy) after saving a newer one. Not damage: nothing to mend or move."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


class CheckpointCorrupt(CheckpointError):
  """A checkpoint is damaged or incomplete; `problems` maps each bad step to why."""

  def __init__(self, message: str, problems: dict[int, str]):
    super().__init__(message)
    self.problems = problems


class CheckpointWriteError(CheckpointError):
  """A save could not be written (disk full, permissions); the previous ones are intact."""


# What the CLI should print in one line without a traceback.
USER_ERRORS = (CheckpointError, lock_lib.WorkdirLocked)


def one_line(err: BaseException) -> str:
  """The first line of the innermost error: orbax wraps tensorstore's clear status
  ("Truncated Zstd-compressed stream") in a message that dumps the whole spec."""
  while (err.__cause__ or err.__context__) is not None:
    err = err.__cause__ or err.__context__
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0] if text else ''}"[:400]


def errors_in(err: BaseException) -> Iterator[BaseException]:
  """`err` and every error it came from: causes, contexts, an ExceptionGroup's members."""
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


def write_failure(err: BaseException) -> str | None:
  """The OS's reason if `err` (or one it came from) is a failed write, else None.

  tensorstore reports a failed write as a ValueError holding the OS's message,
  not as an OSError, hence the message test.
  """
  for e in errors_in(err):
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
      return os.strerror(e.errno)
    for words in _WRITE_WORDS:
      if words in str(e):
        return words
  return None


class DropOrbaxWriteFailures(std_logging.Filter):
  """orbax logs a failed write once per thread, each with its traceback (31 for one full
  disk); the Checkpointer reports it once, as a CheckpointWriteError."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno < std_logging.ERROR or "orbax" not in record.pathname:
      return True
    err = record.exc_info[1] if record.exc_info else None
    return not ((err is not None and write_failure(err))
                or any(words in record.getMessage() for words in _WRITE_WORDS))


def drop_orbax_leftovers() -> None:
  """From now on, drops what orbax's abandoned operations print.

  A failed restore or save leaves orbax's other coroutines to die unawaited (or to
  call into their closed event loop), on their own threads and at their own time,
  and Python prints each one's traceback when it is collected: raw tracebacks after
  the one-line report. Installed once, on the first failure; it drops only those.
  """
  # A read task orbax abandoned unstarted: Python warns when it is collected. (Set on
  # every call: a warnings context, as pytest's per test, restores the filters.)
  warnings.filterwarnings("ignore", category=RuntimeWarning,
                          message="coroutine '_read_array_index_and_device_put' was never")
  previous = sys.unraisablehook
  if getattr(previous, "drops_orbax_leftovers", False):
    return

  def hook(unraisable):
    text = str(unraisable.exc_value)
    if "while reading array index" not in text and text != "Event loop is closed":
      previous(unraisable)

  hook.drops_orbax_leftovers = True
  sys.unraisablehook = hook
  # The tasks of a failed read that asyncio collects unawaited: it logs each one with
  # its traceback ("Task exception was never retrieved").
  std_logging.getLogger("asyncio").addFilter(_DropAbandonedOrbaxTasks())


class _DropAbandonedOrbaxTasks(std_logging.Filter):
  def filter(self, record: std_logging.LogRecord) -> bool:
    text = record.getMessage()
    return not ("exception was never retrieved" in text
                and ("orbax" in text or "Error reading" in text))


class DropOrbaxVanishedStepNotices(std_logging.Filter):
  """orbax warns 'Metadata file does not exist' (or logs an error reading it) when a step
  it lists or reads is deleted meanwhile: for a reader beside a live run, a step its
  writer's keep policy deletes. The Checkpointer reports such a step once, as gone, and
  a damaged one by its own missing-file check."""

  _NOTICES = ("Metadata file does not exist", "Failed to read Metadata file")

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not ("orbax" in record.pathname and str(record.msg).startswith(self._NOTICES))


class _DropOrbaxReadOnlyNotice(std_logging.Filter):
  """orbax logs 'Given directory is read only' unconditionally for a reader."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


@contextlib.contextmanager
def quiet_read_only_notice():
  logger = std_logging.getLogger("absl")
  notice = _DropOrbaxReadOnlyNotice()
  logger.addFilter(notice)
  try:
    yield
  finally:
    logger.removeFilter(notice)
