"""Files the run writes beside its checkpoints, on any filesystem `etils.epath` reaches.

A workdir, a dataset cache or a statistics cache may be a local path or a `gs://...`
(or `s3://...`) URI, as on multi-host TPU/GPU set-ups: every side file of a run goes
through these helpers, never through `os`/`open` directly. orbax writes the checkpoints
themselves through epath and tensorstore.

Writes are atomic: the bytes go to a temporary name in the same directory, which is then
renamed over the target, so a reader (another process, a rerun after a kill) sees either
the old file or the new one, never half a file. (On an object store a single object
write is already all-or-nothing; the rename costs one copy there.)
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np
from etils import epath

PathLike = str | os.PathLike


def path(p: PathLike) -> epath.Path:
  """An epath.Path; a local relative path is made absolute (URIs are left as they are)."""
  text = os.fspath(p)
  if "://" not in text:
    text = os.path.abspath(os.path.expanduser(text))
  return epath.Path(text)


def is_local(p: PathLike) -> bool:
  """True for a path of the local filesystem (locks, statvfs and os calls work there)."""
  return "://" not in os.fspath(p)


class WorkdirError(OSError):
  """A --workdir that cannot hold a run: a file, under a file, or not writable. The
  message names the path, the reason and what to do."""


def unwritable_dir(directory: PathLike) -> str | None:
  """Why `directory` cannot be written (created if missing), or None if it can.

  Local paths only (an object store has no such states; None there). Creates `directory`
  (and its parents) when it can: a run writes there next anyway. An existing directory
  is only asked (access(2) sees a read-only mount, for root too), never written: a
  refused run leaves it exactly as it was.
  """
  if not is_local(directory):
    return None
  d = os.path.abspath(os.path.expanduser(os.fspath(directory)))
  if os.path.lexists(d) and not os.path.isdir(d):
    return f"{d} is a file, not a directory"
  ancestor = d
  while not os.path.lexists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    return f"{ancestor} is a file, so {d} cannot be a directory under it"
  try:
    os.makedirs(d, exist_ok=True)
  except OSError as err:
    return f"{d} is not writable ({err.strerror})"
  if not os.access(d, os.W_OK | os.X_OK):
    read_only = os.statvfs(d).f_flag & os.ST_RDONLY
    return f"{d} is not writable ({'Read-only file system' if read_only else 'Permission denied'})"
  return None


def write_bytes(target: PathLike, data: bytes) -> None:
  """Writes `data` to `target` atomically, creating its directory."""
  target = path(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    tmp.write_bytes(data)
    tmp.replace(target)
  except BaseException:
    if tmp.exists():
      tmp.unlink()
    raise


def write_text(target: PathLike, text: str) -> None:
  write_bytes(target, text.encode("utf-8"))


def write_json(target: PathLike, value: Any) -> None:
  write_text(target, json.dumps(value, indent=2) + "\n")


def write_with(target: PathLike, save: Callable[[BinaryIO], Any]) -> None:
  """`save(file)` (e.g. a figure's savefig) into memory, then to `target` atomically."""
  buffer = io.BytesIO()
  save(buffer)
  write_bytes(target, buffer.getvalue())


def write_npz(target: PathLike, **arrays: Any) -> None:
  write_with(target, lambda f: np.savez(f, **arrays))


def read_json(source: PathLike) -> Any:
  return json.loads(path(source).read_text())


def read_npz(source: PathLike) -> dict[str, np.ndarray]:
  """Every array of the .npz at `source`, loaded (the file is closed on return)."""
  with np.load(io.BytesIO(path(source).read_bytes())) as z:
    return {name: z[name] for name in z.files}
