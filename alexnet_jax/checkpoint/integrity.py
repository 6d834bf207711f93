"""Whether a checkpoint holds what was saved: checksums, finiteness, files and array shapes.

Guarantees: `fingerprint` gives, in one pass on the device, whether the parameters and
optimizer state are finite and a checksum per array that any one changed element changes
and that does not depend on the sharding (a checkpoint written on 8 devices verifies on
1); `missing` names a file that every save writes and a step directory lacks, and
`read_meta` refuses a step whose meta item is missing or unreadable;
`check_structure` refuses a restore target of other arrays, naming each, before orbax
reads one; `checksum_problem` names the arrays whose data changed.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from alexnet_jax.checkpoint.errors import CheckpointCorrupt, CheckpointMismatch, one_line

# Written by every save (orbax's step metadata, our meta item, the state's tree and index).
REQUIRED_FILES = ("_CHECKPOINT_METADATA", "meta/metadata", "state/_METADATA",
                  "state/manifest.ocdbt")


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


def leaf_name(path: tuple) -> str:
  """A leaf's name in the meta item: "params.fc8.kernel"."""
  return jax.tree_util.keystr(path, simple=True, separator=".")


def fingerprint(tree) -> tuple[bool, dict[str, str]]:
  """(finite, {leaf name: 16 hex digits}) of a pytree of (possibly sharded) arrays."""
  finite, hashes = _fingerprint(tree)
  hashes = np.asarray(hashes)
  names = [leaf_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  return bool(finite), {name: f"{int(a):08x}{int(b):08x}"
                        for name, (a, b) in zip(names, hashes, strict=True)}


def missing(step_dir: epath.Path) -> str | None:
  """Why `step_dir` is incomplete (a file every save writes is not there), or None."""
  if not step_dir.is_dir():
    return "its directory is gone"
  if next(iter(step_dir.iterdir()), None) is None:
    return "empty directory"
  for name in REQUIRED_FILES:
    if not (step_dir / name).exists():
      return f"{name} is missing"
  return None


def read_meta(manager: ocp.CheckpointManager, directory: epath.Path, step: int
              ) -> dict[str, Any]:
  """The step's meta item; CheckpointCorrupt naming the step if it is missing or unreadable."""
  problem = missing(directory / str(step))
  if problem is None:
    try:
      meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as err:
      problem = f"meta/metadata is unreadable ({one_line(err)})"
    else:
      if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        problem = "meta/metadata holds no config"
      else:
        return meta
  raise CheckpointCorrupt(f"checkpoint step {step} in {directory} is damaged: {problem}",
                          {step: problem})


def check_structure(stored: dict, abstract_state, *, directory: str, step: int) -> None:
  """Refuses a restore target of other arrays than a meta item records (e.g. another
  optimizer's) with a CheckpointMismatch naming them, before orbax reads any."""
  target = {leaf_name(path): x
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
        f"{directory} step {step} holds other arrays than this config's state:\n  "
        + "\n  ".join(diffs[:10]) + ("\n  ..." if len(diffs) > 10 else "")
        + "\nUse the config the checkpoint was trained with, or a new --workdir.", diffs)


def checksum_problem(stored: dict, state) -> str | None:
  """What is wrong with a restored state's data by the checksums saved with it, or None."""
  _, checksums = fingerprint(state)
  bad = [name for name, value in checksums.items() if stored[name]["checksum"] != value]
  if not bad:
    return None
  more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
  return f"array data does not match its checksum: {', '.join(bad[:3])}{more}"
