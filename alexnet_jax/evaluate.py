"""Evaluation (centre crop and the paper's ten crops) and prediction for image files.

Every validation example is counted exactly once whatever the batch size and
process count: the pipeline pads the last batch and masks the padding, and
the eval step sums over unmasked examples only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from alexnet_jax import checkpoint as checkpoint_lib
from alexnet_jax import input_pipeline, parallel, steps

RESOURCES = os.path.join(os.path.dirname(__file__), "resources")


def evaluate(config: ml_collections.ConfigDict, state, mesh, eval_step, *, ten_crop: bool,
             bad_images=None) -> dict[str, float]:
  """Top-1/top-5 error and loss over the whole evaluation split."""
  totals = None
  for batch in input_pipeline.eval_batches(
      config, ten_crop=ten_crop, process_index=jax.process_index(),
      process_count=jax.process_count(), bad_images=bad_images):
    sums = eval_step(state, parallel.global_batch(mesh, batch))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return {"top1_error": float(totals["top1_errors"]) / count,
          "top5_error": float(totals["top5_errors"]) / count,
          "loss": float(totals["loss"]) / count, "num_examples": int(count)}


def restore(config: ml_collections.ConfigDict, workdir: str, mesh, step: int | None = None):
  """The checkpointed state at `step` (default latest), placed on `mesh`'s devices."""
  from alexnet_jax import train  # the restore target is the train state's

  ckpt = checkpoint_lib.Checkpointer(workdir, read_only=True)
  if ckpt.latest_step() is None:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}: train first with "
                            f"--mode=train --workdir={workdir}")
  ckpt.check_compatible(config, step)
  state = ckpt.restore(train.abstract_train_state(config, mesh), step)
  ckpt.close()
  return state


def run_eval(config: ml_collections.ConfigDict, workdir: str,
             step: int | None = None) -> dict:
  """--mode=eval: centre-crop and ten-crop errors of a checkpoint -> DIR/eval/<step>.json."""
  from alexnet_jax import train

  run = train.setup(config)
  state = restore(config, workdir, run.mesh, step)
  step = int(jax.device_get(state.step))
  eval_step = steps.make_eval_step(config, run.mesh)
  centre = evaluate(config, state, run.mesh, eval_step, ten_crop=False)
  ten = evaluate(config, state, run.mesh, eval_step, ten_crop=True)
  report = {
      "step": step, "split": config.dataset.eval_split, "num_examples": centre["num_examples"],
      "center_crop": {k: centre[k] for k in ("top1_error", "top5_error")},
      "ten_crop": {k: ten[k] for k in ("top1_error", "top5_error")},
  }
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    path = os.path.join(workdir, "eval", f"{step}.json")
    with open(path, "w") as f:
      json.dump(report, f, indent=2)
    logging.info("wrote %s", path)
  print(f"step {step}, {report['num_examples']} {report['split']} images: "
        f"centre crop top-1/top-5 error {centre['top1_error']:.4f}/{centre['top5_error']:.4f}, "
        f"ten crops {ten['top1_error']:.4f}/{ten['top5_error']:.4f}")
  return report


def class_names(config: ml_collections.ConfigDict, info) -> list[str]:
  """Readable class names: ImageNet's words for the 1000 ILSVRC wnids, else the folder names."""
  names = list(info.class_names)
  if len(names) == 1000:
    with open(os.path.join(RESOURCES, "ilsvrc2012_classes.tsv")) as f:
      words = dict(line.rstrip("\n").split("\t") for line in f if not line.startswith("#"))
    names = [words.get(n, n) for n in names]
  return names


def predict(config: ml_collections.ConfigDict, workdir: str, paths: Sequence[str],
            step: int | None = None, top_k: int = 5) -> list[list[tuple[str, float]]]:
  """--mode=predict: the top-k classes with probabilities for each image file."""
  from alexnet_jax import train

  run = train.setup(config)
  state = restore(config, workdir, run.mesh, step)
  names = class_names(config, run.info)
  images = input_pipeline.preprocess_image_files(config, paths)
  probs, _ = features_and_probabilities(config, run.mesh, state.params, images)
  results = []
  for path, p in zip(paths, probs, strict=True):
    top = np.argsort(-p)[:top_k]
    results.append([(names[i], float(p[i])) for i in top])
    print(path)
    for i in top:
      print(f"  {p[i]:7.2%}  {names[i]}")
  return results


def features_and_probabilities(config: ml_collections.ConfigDict, mesh, params,
                               images: np.ndarray, batch_size: int | None = None,
                               predict_step=None):
  """Softmax [n, classes] and the last hidden layer (fc7, after ReLU) [n, fc7 width].

  Batched and jitted; the last batch is padded to the data axis and trimmed. Pass the
  same `predict_step` (`steps.make_predict_step(config, mesh)`) to repeated calls: a
  new one compiles again.
  """
  predict_step = predict_step or steps.make_predict_step(config, mesh)
  data = mesh.shape[parallel.DATA]
  batch_size = batch_size or config.eval_batch_size
  probs, feats = [], []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    padded = -(-len(chunk) // data) * data
    chunk = np.concatenate([chunk, np.zeros((padded - len(chunk), *chunk.shape[1:]),
                                            chunk.dtype)])
    p, f = jax.device_get(predict_step(params, jax.device_put(
        chunk, parallel.batch_sharding(mesh))))
    n = min(batch_size, len(images) - start)
    probs.append(p[:n])
    feats.append(f[:n])
  return np.concatenate(probs), np.concatenate(feats)
