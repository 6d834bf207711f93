r"""Throughput of the training input pipeline against a plain tf.data baseline.

Both read the same real JPEGs (default /work/shared/data/imagenet-tiny) and run in the
same process, interleaved (ours, plain, ours, plain, ...) so that drifting load on a
shared machine hits both alike. Prints a Markdown table.

  ours:  validate bytes, fused decode_and_crop_jpeg of the central square, resize to
         256x256 (antialiased), random 224 crop, flip, PCA jitter, per-pixel mean, on
         uint8 until batching (the float work runs once per batch).
  plain: read_file, decode_jpeg, resize the shorter side to 256, random 224 crop, flip,
         cast to float32.

Run from the repository root:
  python -m benchmarks.input_pipeline [--data=ROOT] [--images=3000] [--rounds=3]
  [--use_val_as_train]  (time on the validation images: original ILSVRC sizes)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

if __package__ in (None, ""):  # `python benchmarks/input_pipeline.py`
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from alexnet_jax import input_pipeline as ip  # noqa: E402
from alexnet_jax.data import sources  # noqa: E402
from alexnet_jax.data._tf import AUTOTUNE, tf  # noqa: E402
from experiments.alexnet import get_config  # noqa: E402


def plain_dataset(paths, batch_size: int, resize: int, crop: int, seed: int):
  def load(path):
    img = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    shape = tf.cast(tf.shape(img)[:2], tf.float32)
    scale = resize / tf.reduce_min(shape)
    size = tf.cast(tf.round(shape * scale), tf.int32)
    img = tf.image.resize(img, size)
    img = tf.image.random_crop(img, [crop, crop, 3])
    return tf.image.random_flip_left_right(img)

  ds = tf.data.Dataset.from_tensor_slices(paths).repeat().shuffle(len(paths), seed=seed)
  ds = ds.map(load, num_parallel_calls=AUTOTUNE).batch(batch_size, drop_remainder=True)
  return ds.prefetch(AUTOTUNE)


def time_batches(iterator, num_batches: int, batch_size: int) -> tuple[float, float]:
  """(images per wall-clock second, images per CPU-second of this process).

  The second is the per-core cost, and robust to other load on a shared machine.
  """
  next(iterator)  # warm-up: graph tracing and the first fill of the buffers
  t, cpu = time.perf_counter(), time.process_time()
  for _ in range(num_batches):
    next(iterator)
  n = num_batches * batch_size
  return n / (time.perf_counter() - t), n / (time.process_time() - cpu)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", default="/work/shared/data/imagenet-tiny")
  p.add_argument("--images", type=int, default=3000, help="timed images per round")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--use_val_as_train", action="store_true")
  args = p.parse_args(argv)
  if not os.path.isdir(args.data):
    sys.exit(f"{args.data} not found; pass --data=ROOT with ROOT/{{train,val}}/<class>/*.JPEG")

  root = args.data
  if args.use_val_as_train:
    root = tempfile.mkdtemp(prefix="bench-tree-")
    for split in ("train", "val"):
      os.symlink(os.path.join(os.path.abspath(args.data), "val"), os.path.join(root, split))

  c = get_config()
  c.dataset.name = "image_folder"
  c.dataset.image_folder = root
  c.dataset.cache_dir = os.path.join(tempfile.gettempdir(), "alexnet_jax_bench_cache")
  c.batch_size = args.batch_size
  c.model.num_classes = 10
  ip.statistics(c)  # computed and cached before timing
  paths = [str(x) for x in sources.get_source(c).files("train")[0]]
  num_batches = max(1, args.images // args.batch_size)

  # A fresh pipeline per round, dropped after it: a live idle tf.data iterator keeps
  # filling its buffers in the background and would steal CPU from the one being timed.
  make = {
      "ours": lambda r: ip.train_batches(c, start_step=r * num_batches),
      "plain": lambda r: plain_dataset(paths, args.batch_size, c.input.resize_size,
                                       c.model.input_size, c.seed + r).as_numpy_iterator(),
  }
  results = {"ours": [], "plain": []}
  for r in range(args.rounds):
    for name, factory in make.items():
      it = factory(r)
      results[name].append(time_batches(it, num_batches, args.batch_size))
      del it
      gc.collect()

  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  best = {k: max(w for w, _ in v) for k, v in results.items()}
  per_cpu = {k: max(c for _, c in v) for k, v in results.items()}
  print(f"\n{len(paths)} JPEGs from {args.data}{' (val)' if args.use_val_as_train else ''}, "
        f"batch {args.batch_size}, {num_batches * args.batch_size} images x {args.rounds} "
        f"rounds, interleaved; {cores} cores\n")
  print("| pipeline | images/s (best round) | all rounds | images per CPU-second (best) |")
  print("|---|---|---|---|")
  for k, v in results.items():
    rounds = ", ".join(f"{w:.0f}" for w, _ in v)
    print(f"| {k} | {best[k]:.0f} | {rounds} | {per_cpu[k]:.0f} |")
  print(f"\nratio ours / plain: {best['ours'] / best['plain']:.2f}x wall-clock, "
        f"{per_cpu['ours'] / per_cpu['plain']:.2f}x per CPU-second")


if __name__ == "__main__":
  main()
