"""Hold out a validation split from a train-only image folder, as a symlink tree.

    python -m alexnet_jax.data.holdout SRC DST [--fraction=0.1]

SRC/<class>/* (e.g. imagenette's train folder, which has no labelled val split)
-> DST/train/<class>/* and DST/val/<class>/*: per class, the files sorted by name,
the last `fraction` of them (at least one) go to val, the rest to train. Links, not
copies; deterministic (no seed); rerunning with the same arguments is a no-op, and
a DST made with other arguments is refused rather than silently mixed.
"""

from __future__ import annotations

import argparse
import json
import math
import os

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def plan(src: str, fraction: float) -> dict[str, dict[str, list[str]]]:
  """{class: {"train": [file, ...], "val": [file, ...]}} (file names, sorted)."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"fraction must be in (0, 1), got {fraction}")
  out = {}
  for cls in sorted(os.listdir(src)):
    folder = os.path.join(src, cls)
    if not os.path.isdir(folder):
      continue
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
    if len(files) < 2:
      raise ValueError(f"class {cls!r} has {len(files)} images; need >= 2 to hold one out")
    n_val = max(1, math.ceil(len(files) * fraction))
    out[cls] = {"train": files[:-n_val], "val": files[-n_val:]}
  if not out:
    raise ValueError(f"no class folders under {src}")
  return out


def make(src: str, dst: str, fraction: float = 0.1) -> dict[str, int]:
  """Creates the symlink tree; returns {"train": n, "val": n}."""
  src = os.path.abspath(src)
  split = plan(src, fraction)
  stamp = os.path.join(dst, "holdout.json")
  key = {"src": src, "fraction": fraction}
  if os.path.exists(stamp):
    with open(stamp) as f:
      have = json.load(f)
    if {k: have.get(k) for k in key} != key:
      raise ValueError(f"{dst} was made from {have}; remove it or pick another DST")
  counts = {"train": 0, "val": 0}
  for cls, parts in split.items():
    for which, files in parts.items():
      folder = os.path.join(dst, which, cls)
      os.makedirs(folder, exist_ok=True)
      for name in files:
        link = os.path.join(folder, name)
        if not os.path.lexists(link):
          os.symlink(os.path.join(src, cls, name), link)
        counts[which] += 1
  with open(stamp, "w") as f:
    json.dump({**key, **counts}, f)
  return counts


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("src")
  p.add_argument("dst")
  p.add_argument("--fraction", type=float, default=0.1)
  args = p.parse_args(argv)
  print(make(args.src, args.dst, args.fraction))


if __name__ == "__main__":
  main()
