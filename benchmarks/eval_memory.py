"""Peak host memory of evaluation against the evaluation set's size.

    .venv/bin/python -m benchmarks.eval_memory                 # pipeline only, generated JPEGs
    .venv/bin/python -m benchmarks.eval_memory --mode=main  # real --mode=eval, demo net
    .venv/bin/python -m benchmarks.eval_memory --photos=/work/shared/data/imagenette/train

Each point runs in a fresh process and reports its lifetime peak RSS (ru_maxrss, read with
os.wait4). `pipeline`: centre-crop then ten-crop `eval_batches` over the set, with a consumer
that sleeps --consumer_ms per batch (an eval step slower than the pipeline, the case where
an unbounded read-ahead fills up). `main`: trains the demo network for one step on the
tree, then times `main.py --mode=eval` (centre and ten crops, eval batch 100) on sets of
each size. With bounded read-ahead the peak should not depend on the set's size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

CLASSES = 10


def make_tree(root: str, n: int, photos: str | None, size: tuple[int, int] = (500, 375)) -> str:
  """root/{train,val}/<class>/*.JPEG with n validation images (and 2 training images a class).

  photos: an image folder (<class>/*.JPEG) whose files are linked instead of generated."""
  from PIL import Image

  rng = np.random.default_rng(0)
  for split, per_class in (("train", 2), ("val", -(-n // CLASSES))):
    for c in range(CLASSES):
      d = os.path.join(root, split, f"class{c}")
      os.makedirs(d, exist_ok=True)
      if photos:
        src_dir = os.path.join(photos, sorted(os.listdir(photos))[c])
        files = sorted(os.listdir(src_dir))
        for i in range(per_class):
          if split == "val" and c * per_class + i >= n:
            break
          os.symlink(os.path.join(src_dir, files[(i + (per_class if split == "val" else 0))
                                                % len(files)]),
                     os.path.join(d, f"{i:05d}.JPEG"))
        continue
      for i in range(per_class):
        if split == "val" and c * per_class + i >= n:
          break
        # Smooth random colours: JPEG sizes and decode costs like photos' (not noise).
        small = rng.integers(0, 256, (size[1] // 25, size[0] // 25, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BILINEAR).save(
            os.path.join(d, f"{i:05d}.JPEG"), quality=90)
  return root


def _peak_mb(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
  """(peak RSS MB, seconds, output tail) of a child process."""
  t = time.perf_counter()
  p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       cwd=REPO, env=env)
  out = p.stdout.read()
  _, status, usage = os.wait4(p.pid, 0)
  p.returncode = os.waitstatus_to_exitcode(status)
  if p.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{out[-3000:]}")
  return usage.ru_maxrss / 1024, time.perf_counter() - t, out


def pipeline_worker(root: str, eval_batch: int, consumer_ms: float, overrides: str,
                    passes: str = "centre,ten") -> None:
  """One pass of centre-crop and/or one of ten-crop batches; prints a JSON line."""
  from alexnet_jax import data
  from experiments.alexnet import get_config

  c = get_config("smoke")
  c.dataset.name = "image_folder"
  c.dataset.image_folder = root
  c.dataset.cache_dir = os.path.join(root, "cache")
  c.model.input_size = 224
  c.eval_batch_size = eval_batch
  c.input.stats = "published"
  for kv in filter(None, overrides.split(",")):
    k, v = kv.split("=")
    c.update_from_flattened_dict({k: type(c[k.split(".")[0]][k.split(".")[1]])(v)})
  n = 0
  for ten_crop in [p == "ten" for p in passes.split(",")]:
    for b in data.eval_batches(c, ten_crop=ten_crop):
      n += int(b["mask"].sum())
      time.sleep(consumer_ms / 1000)
  print(json.dumps({"examples": n}))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mode", choices=("pipeline", "main"), default="pipeline")
  p.add_argument("--sizes", default="100,1000")
  p.add_argument("--photos", default=None, help="<class>/*.JPEG folder to link, not generate")
  p.add_argument("--eval_batch", type=int, default=100)
  p.add_argument("--consumer_ms", type=float, default=300.0)
  p.add_argument("--overrides", default="", help="pipeline mode: input.x=v,... config fields")
  p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.worker:
    pipeline_worker(a.worker[0], int(a.worker[1]), float(a.worker[2]), *a.worker[3:])
    return
  sizes = [int(s) for s in a.sizes.split(",")]
  tmp = tempfile.mkdtemp(prefix="eval_memory-")
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu"}
  try:
    rows = []
    workdir = os.path.join(tmp, "workdir")
    for n in sizes:
      root = make_tree(os.path.join(tmp, f"set{n}"), n, a.photos)
      if a.mode == "pipeline":
        mb, s, _ = _peak_mb([sys.executable, "-m", "benchmarks.eval_memory", "--worker", root,
                             str(a.eval_batch), str(a.consumer_ms), a.overrides], env)
      else:
        flags = [f"--workdir={workdir}", "--config=experiments/demo.py",
                 "--config.dataset.name=image_folder", f"--config.dataset.image_folder={root}",
                 f"--config.dataset.cache_dir={tmp}/cache", "--config.input.stats=published",
                 f"--config.eval_batch_size={a.eval_batch}", "--config.figures.enabled=false"]
        if not os.path.isdir(workdir):  # one training step makes a checkpoint to evaluate
          _peak_mb([sys.executable, "main.py", *flags, "--config.num_train_steps=1",
                    "--config.batch_size=8", "--config.eval_every_steps=1000"], env)
        mb, s, _ = _peak_mb([sys.executable, "main.py", *flags, "--mode=eval"], env)
      rows.append((n, mb, s))
      print(f"{a.mode}: {n:6d} eval images  peak RSS {mb:7.0f} MB  {s:6.1f} s", flush=True)
    print(f"peak RSS ratio largest/smallest set: {rows[-1][1] / rows[0][1]:.2f}")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
