"""Room on the disk for a save: what it needs, what is free, and what a failed one left.

Guarantees: `needed_bytes` is an upper estimate of a save's size (orbax compresses
random-looking floats by a few per cent only); free space is known on a local filesystem
and None elsewhere (a gs:// workdir: the write itself tells); `discard_partial` removes a
failed save's temporary directories and never raises, so that the write error it follows
is the one reported.
"""

from __future__ import annotations

import contextlib
import os
import time

import jax
import numpy as np
from etils import epath

from alexnet_jax import fileio


def mb(nbytes: float) -> str:
  return f"{nbytes / 2**20:.1f} MiB"


def needed_bytes(state) -> int:
  """The arrays' raw size and the metadata files around them."""
  leaves = jax.tree.leaves(state)
  return (sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in leaves)
          + 64 * 1024 + 1024 * len(leaves))


def _statvfs(directory: epath.Path) -> os.statvfs_result | None:
  if not fileio.is_local(directory):
    return None
  try:
    return os.statvfs(directory)
  except OSError:
    return None


def free_bytes(directory: epath.Path) -> int | None:
  st = _statvfs(directory)
  return None if st is None else st.f_bavail * st.f_frsize


def free_report(directory: epath.Path) -> str:
  """What is free: bytes, and files when those run out (a full inode table is ENOSPC too)."""
  st = _statvfs(directory)
  if st is None:
    return "free space unknown"
  text = f"{mb(st.f_bavail * st.f_frsize)} free"
  if st.f_files and st.f_favail < 1000:
    text += f" and room for {st.f_favail} more files"
  return text


def discard_partial(directory: epath.Path, step: int) -> None:
  """Removes what a failed save of `step` left in `directory` (frees the space).

  Best effort: orbax's other writer threads may still create a directory or two after
  the failure surfaced (retried briefly); the next writer's start-up removes any
  leftover, and a leftover is never taken for a checkpoint.
  """
  # Whatever a filesystem raises here must not hide the write error being reported.
  with contextlib.suppress(Exception):
    for _ in range(5):
      partial = [p for p in directory.iterdir()
                 if p.name.startswith(f"{step}.orbax-checkpoint-tmp")]
      if not partial:
        return
      for path in partial:
        with contextlib.suppress(Exception):  # the others are still worth removing
          path.rmtree(missing_ok=True)
      time.sleep(0.1)
