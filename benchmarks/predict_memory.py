"""Peak host memory of --mode=predict against the number of image files.

    .venv/bin/python -m benchmarks.predict_memory                  # 200 and 2,000 files
    .venv/bin/python -m benchmarks.predict_memory --sizes=200,2000 \
        --photos=/work/shared/data/imagenet-tiny/val

Trains the demo network (experiments/demo.py) for one step on a tiny generated image
folder (published statistics: nothing to compute), then runs `main.py --mode=predict` in a
fresh process per size on that many files: links to the same --num_photos real photos,
repeated under distinct names. Reports each process's lifetime peak RSS (ru_maxrss, read
with os.wait4; benchmarks/eval_memory.py's helper) and time. Predict decodes and
classifies config.eval_batch_size files at a time (alexnet_jax/run/evaluate.py), so the
peak should not depend on the number of files. Run it from another checkout's root
(`python -m benchmarks.predict_memory` there) to measure that code instead.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile

from benchmarks.eval_memory import REPO, _peak_mb, make_tree

PHOTOS = os.path.join(REPO, "..", "shared", "data", "imagenet-tiny", "val")


def link_images(directory: str, n: int, photos: list[str]) -> list[str]:
  """n links named 00000.JPEG ... to `photos`, repeated in turn."""
  os.makedirs(directory, exist_ok=True)
  paths = []
  for i in range(n):
    path = os.path.join(directory, f"{i:05d}.JPEG")
    os.symlink(photos[i % len(photos)], path)
    paths.append(path)
  return paths


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="200,2000")
  p.add_argument("--photos", default=PHOTOS, help="a folder searched for *.JPEG photos")
  p.add_argument("--num_photos", type=int, default=10)
  p.add_argument("--eval_batch", type=int, default=100, help="config.eval_batch_size")
  p.add_argument("--overrides", default="model.conv_impl=xla",
                 help="more --config.k=v fields, comma-separated")
  a = p.parse_args()
  photos = sorted(glob.glob(os.path.join(a.photos, "**", "*.JPEG"), recursive=True))
  if not photos:
    sys.exit(f"no *.JPEG under {a.photos}: pass --photos")
  photos = photos[:a.num_photos]
  tmp = tempfile.mkdtemp(prefix="predict_memory-")
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
  try:
    root = make_tree(os.path.join(tmp, "data"), 10, None)
    workdir = os.path.join(tmp, "workdir")
    flags = [f"--workdir={workdir}", "--config=experiments/demo.py",
             "--config.dataset.name=image_folder", f"--config.dataset.image_folder={root}",
             f"--config.dataset.cache_dir={tmp}/cache", "--config.input.stats=published",
             f"--config.eval_batch_size={a.eval_batch}", "--config.figures.enabled=false",
             *[f"--config.{kv}" for kv in filter(None, a.overrides.split(","))]]
    # One step makes a checkpoint (and the workdir's record) to predict with.
    _peak_mb([sys.executable, "main.py", *flags, "--config.num_train_steps=1",
              "--config.batch_size=8", "--config.eval_every_steps=1000",
              "--config.eval_ten_crop=false"], env)
    rows = []
    for n in (int(s) for s in a.sizes.split(",")):
      paths = link_images(os.path.join(tmp, f"images{n}"), n, photos)
      # A flag file: thousands of paths exceed the 128 KB limit of one argument.
      flagfile = os.path.join(tmp, f"images{n}.flags")
      with open(flagfile, "w") as f:
        f.write(f"--images={','.join(paths)}\n")
      mb, s, out = _peak_mb([sys.executable, "main.py", *flags, "--mode=predict",
                             f"--flagfile={flagfile}"], env)
      assert out.count(".JPEG\n") == n, out[-2000:]  # every file printed
      rows.append((n, mb))
      print(f"predict: {n:6d} files ({len(photos)} photos repeated)  peak RSS {mb:7.0f} MB  "
            f"{s:6.1f} s", flush=True)
    print(f"peak RSS ratio largest/smallest: {rows[-1][1] / rows[0][1]:.2f}")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
