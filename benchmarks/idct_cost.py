r"""What the exact JPEG IDCT costs: images decoded per CPU-second, fast vs accurate.

  .venv/bin/python benchmarks/idct_cost.py [--rounds=5]

Decodes the same files with `decode.decode_centre_square` (the pipeline's decode: the
central square, resized to 256) under input.jpeg_dct_method "INTEGER_FAST" and
"INTEGER_ACCURATE", the two alternating round by round, one thread (so CPU time is the
cost, whatever else the machine does). Two sets: the imagenette photos (224 x 224) and the
ILSVRC-2012 photos of ../shared/data/imagenet-tiny (full size, ~500 x 375).
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # as main.py
from alexnet_jax.data import decode  # noqa: E402
from alexnet_jax.data._tf import tf  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                      "shared", "data")


DECODERS = {dct: tf.function(lambda data, dct=dct: decode.decode_centre_square(data, 256, dct=dct))
            for dct in ("INTEGER_FAST", "INTEGER_ACCURATE")}


def _rate(blobs, dct: str) -> float:
  """Images per CPU-second of this process (a traced function: no eager dispatch)."""
  start = time.process_time()
  for data in blobs:
    DECODERS[dct](data)
  return len(blobs) / (time.process_time() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--files", type=int, default=300, help="per set")
  args = parser.parse_args()
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  sets = {
      "imagenette (224x224)": sorted(glob.glob(f"{SHARED}/imagenette/train/*/*.JPEG")),
      "imagenet-tiny (ILSVRC size)": sorted(glob.glob(f"{SHARED}/imagenet-tiny/*/*/*.JPEG")),
  }
  for name, paths in sets.items():
    if not paths:
      print(f"{name}: no files, skipped")
      continue
    paths = paths[::max(1, len(paths) // args.files)][:args.files]
    blobs = [tf.constant(open(p, "rb").read()) for p in paths]
    for dct in ("INTEGER_FAST", "INTEGER_ACCURATE"):  # warm-up: traces each function once
      DECODERS[dct](blobs[0])
    rates = {"INTEGER_FAST": [], "INTEGER_ACCURATE": []}
    for _ in range(args.rounds):
      for dct in rates:
        rates[dct].append(_rate(blobs, dct))
    fast, accurate = (np.median(rates[k]) for k in ("INTEGER_FAST", "INTEGER_ACCURATE"))
    ratio = np.median(np.asarray(rates["INTEGER_ACCURATE"]) / np.asarray(rates["INTEGER_FAST"]))
    print(f"{name}, {len(blobs)} files, {args.rounds} rounds: fast {fast:.0f} img/CPU-s, "
          f"accurate {accurate:.0f} img/CPU-s; accurate/fast {ratio:.3f} "
          f"(per round: {', '.join(f'{a / f:.3f}' for a, f in zip(rates['INTEGER_ACCURATE'], rates['INTEGER_FAST']))})")


if __name__ == "__main__":
  main()
