"""One run per workdir: an advisory lock on `workdir/.lock` that dies with its holder.

Two runs writing one workdir corrupt each other (the second one's start-up
deletes the first one's checkpoint in progress), so a writer takes

    with WorkdirLock(workdir):
      ...

`fcntl.flock` is released by the kernel when the holding process exits, however
it exits (kill -9 included), so a lock is never stale in the sense of blocking
a later run. The lock is taken on the workdir directory itself, not on the `.lock`
file: a lock on a file dies with the file's name (delete `.lock` of a live run and a
second run would create a new one and lock that), while the directory cannot go while
the run writes in it. The `.lock` file keeps the holder's pid, host and start time so
that a refusal can name who holds it, and so that taking over from a run that died
without releasing can be reported. A clean release empties the file.

Within one process the lock is re-entrant (a count per path): the training loop
and its Checkpointer may both take it.

Multi-process runs: only the process that calls it holds it; the Checkpointer
takes it on process 0 only (one lock per run, whatever the process count) and
shares the outcome with the other processes.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import threading

from absl import logging


class WorkdirLocked(RuntimeError):
  """Another live run holds the workdir; the message names it (pid, host, since)."""


_held: dict[str, list[int]] = {}  # path -> [dir fd, .lock fd, count] held by this process
_held_guard = threading.Lock()


def _describe(holder: dict) -> str:
  if not holder:
    return "a process that has not yet written its details"
  return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
          f"since {holder.get('since', '?')}")


def _read_holder(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 65536).decode(errors="replace").strip()
  if not text:
    return {}
  try:
    holder = json.loads(text)
  except ValueError:
    return {"pid": "?", "host": "?", "since": f"? (unreadable lock file: {text[:60]!r})"}
  return holder if isinstance(holder, dict) else {}


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds workdir/.lock or raises WorkdirLocked."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, ".lock")
    self.held = False

  def holder(self) -> dict:
    """The details written by the current (or last, if it died) holder; {} if none."""
    try:
      fd = os.open(self.path, os.O_RDONLY)
    except FileNotFoundError:
      return {}
    try:
      return _read_holder(fd)
    finally:
      os.close(fd)

  def _who(self) -> str:
    if not os.path.exists(self.path):
      return "whose details file .lock was deleted; `fuser -v` on the directory names it"
    return _describe(self.holder())

  def acquire(self) -> WorkdirLock:
    if self.held:
      return self
    with _held_guard:
      if self.path in _held:
        _held[self.path][-1] += 1
        self.held = True
        return self
      os.makedirs(self.workdir, exist_ok=True)
      dir_fd = os.open(self.workdir, os.O_RDONLY | os.O_DIRECTORY)
      try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(dir_fd)
        raise WorkdirLocked(
            f"{self.workdir} is in use by another run ({self._who()}): wait for "
            "it to finish or stop it, or use another --workdir. Nothing was written.") from None
      except OSError as err:
        os.close(dir_fd)
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
          raise
        # Some network filesystems have no flock: run, but say what is not guarded.
        logging.warning("cannot lock %s (%s): a second run on this workdir would not be "
                        "detected", self.workdir, err.strerror)
        self.held = True
        _held[self.path] = [-1, -1, 1]
        return self
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      previous = _read_holder(fd)
      if previous:
        logging.warning("%s: took over the lock left by %s, which is gone (killed or "
                        "crashed); its last checkpoint is where it left it.", self.workdir,
                        _describe(previous))
      me = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
      os.fsync(fd)
      _held[self.path] = [dir_fd, fd, 1]
      self.held = True
      return self

  def release(self) -> None:
    if not self.held:
      return
    self.held = False
    with _held_guard:
      entry = _held.get(self.path)
      if entry is None:
        return
      entry[-1] -= 1
      if entry[-1] > 0:
        return
      del _held[self.path]
      dir_fd, fd = entry[0], entry[1]
      if dir_fd < 0:
        return
      # Emptied before unlocking: a later run that finds details took over from a dead one.
      os.ftruncate(fd, 0)
      os.close(fd)
      fcntl.flock(dir_fd, fcntl.LOCK_UN)
      os.close(dir_fd)

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
