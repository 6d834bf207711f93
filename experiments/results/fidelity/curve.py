r"""Per-step learning curve of a preset with overrides: the ablation driver of issue 13.

Uses the library's own pieces (train_batches, create_train_state, make_train_step,
make_eval_step): the same batches, dropout masks and update as `main.py --mode=train`,
without checkpoints or TensorBoard, and with every step's loss kept. Writes OUT (JSON)
after every step, so a run stopped early still leaves its curve.

  nice -n 19 .venv/bin/python experiments/results/fidelity/curve.py \
      --config=experiments/alexnet.py --steps=150 --out=runs/fid/paper.json \
      [--set model.init_weight_std='(0.01,0.01,0.03,0.03,0.03,0.01,0.01,0.01)' ...] \
      [--eval_at=100,150]

Every run gets: dataset = the imagenette hold-out split (IMAGE_FOLDER, made by
`python -m alexnet_jax.data.holdout /work/shared/data/imagenette/train
/tmp/imagenette_split`), num_classes 10, micro-batches of 32, the square cache.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import time

import sys

import jax
import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))

IMAGE_FOLDER = "/tmp/imagenette_split"


def load_config(path: str, overrides: list[str]):
  spec = importlib.util.spec_from_file_location("cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  base = {"dataset.name": "image_folder", "dataset.image_folder": IMAGE_FOLDER,
          "model.num_classes": 10, "microbatch_size": 32, "input.square_cache": True}
  for key, value in base.items():
    _set(c, key, value)
  for item in overrides:
    key, _, text = item.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    _set(c, key, value)
  return c


def _set(c, key, value):
  *parents, leaf = key.split(".")
  node = c
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise KeyError(f"no config field {key}")
  old = node[leaf]
  if isinstance(old, tuple) and isinstance(value, list):
    value = tuple(value)
  if isinstance(old, float) and isinstance(value, int):
    value = float(value)
  node[leaf] = value


def evaluate(run, state, eval_step, ten_crop: bool, max_batches: int = 0):
  from alexnet_jax import data as input_pipeline
  from alexnet_jax import parallel
  sums = None
  for i, batch in enumerate(input_pipeline.eval_batches(run.config, ten_crop=ten_crop,
                                                        **run.batch_args())):
    if max_batches and i >= max_batches:
      break
    out = jax.device_get(eval_step(state, parallel.global_batch(run.mesh, batch)))
    sums = out if sums is None else {k: sums[k] + out[k] for k in out}
  n = float(sums["count"])
  return {"loss": float(sums["loss"]) / n, "top1_error": float(sums["top1_errors"]) / n,
          "top5_error": float(sums["top5_errors"]) / n, "num_examples": int(n)}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--config", required=True)
  p.add_argument("--set", action="append", default=[])
  p.add_argument("--steps", type=int, required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--eval_at", default="")
  p.add_argument("--eval_batches", type=int, default=0, help="0 = the whole val split")
  args = p.parse_args()

  from alexnet_jax import data as input_pipeline
  from alexnet_jax import parallel, steps
  from alexnet_jax.run import setup
  config = load_config(args.config, args.set)
  run = setup.build(config)  # validates the config; mesh, layout, schedule, statistics
  mesh, info, spe = run.mesh, run.info, run.steps_per_epoch
  state = steps.create_train_state(config, run.layout)
  train_step = steps.make_train_step(config, run.layout, run.schedule)
  eval_step = steps.make_eval_step(config, run.layout)
  batches = input_pipeline.train_batches(config, **run.batch_args())
  eval_at = {int(s) for s in args.eval_at.split(",") if s}
  record = {"config": args.config, "set": args.set, "steps_per_epoch": spe,
            "num_train": info.num_train, "num_eval": info.num_eval, "curve": [], "eval": []}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

  def dump():
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
      json.dump(record, f)
    os.replace(tmp, args.out)

  t_start = time.perf_counter()
  for step in range(1, args.steps + 1):
    t0 = time.perf_counter()
    batch = parallel.global_batch(mesh, next(batches))
    state, m = train_step(state, batch, steps.step_rng(state))
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    m.update(step=step, seconds=time.perf_counter() - t0)
    record["curve"].append(m)
    print(f"step {step} loss {m['loss']:.4f} err {m['top1_error']:.3f} "
          f"gnorm {m['grad_norm']:.3g} unorm {m['update_norm']:.3g} {m['seconds']:.1f}s",
          flush=True)
    if not np.isfinite(m["loss"]):
      record["nonfinite_at"] = step
      dump()
      break
    if step in eval_at:
      e = evaluate(run, state, eval_step, ten_crop=False,
                   max_batches=args.eval_batches)
      e["step"] = step
      record["eval"].append(e)
      print("eval", e, flush=True)
    record["wall_s"] = time.perf_counter() - t_start
    dump()


if __name__ == "__main__":
  main()
