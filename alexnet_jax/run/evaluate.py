"""Evaluation (centre crop and the paper's ten crops) and prediction for image files.

Every validation example is counted exactly once whatever the batch size, mesh and
process count: the pipeline pads the last batch and masks the padding, each process
reads the share of each batch that its devices' place on the mesh selects, and the eval
step sums over unmasked examples only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from alexnet_jax import checkpoint as checkpoint_lib
from alexnet_jax import data, fileio, parallel, steps
from alexnet_jax.run import setup

RESOURCES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "resources")


def evaluate(run: setup.RunSetup, state, eval_step, *, ten_crop: bool,
             bad_images=None) -> dict[str, float]:
  """Top-1/top-5 error and loss over the whole evaluation split.

  Unusable files are skipped (named with the reason in `bad_images` and the log):
  num_skipped says how many, so an exact evaluation is never silently inexact.
  """
  totals = None
  for batch in data.eval_batches(run.config, ten_crop=ten_crop, bad_images=bad_images,
                                 **run.batch_args()):
    sums = eval_step(state, parallel.global_batch(run.mesh, batch))
    if totals is not None:
      # At most two steps in flight: each holds its batch on the device, and with JAX's
      # asynchronous dispatch a loop faster than the step queued every batch of the set
      # (measured: 7.2 GB peak RSS on 1,000 images vs 2.4 GB on 100, ten crops of 100).
      jax.block_until_ready(totals)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  # Every good example is counted exactly once over all processes: the rest were skipped.
  skipped = run.info.num_eval - int(count)
  if count == 0:
    raise data.BadImageError(f"none of the {skipped} evaluation images could be used; see "
                             "the log for each file and why")
  return {"top1_error": float(totals["top1_errors"]) / count,
          "top5_error": float(totals["top5_errors"]) / count,
          "loss": float(totals["loss"]) / count, "num_examples": int(count),
          "num_skipped": skipped}


def restore(run: setup.RunSetup, workdir: str, step: int | None = None):
  """The checkpointed state at `step` (default latest), placed on the run's mesh."""
  ckpt = checkpoint_lib.Checkpointer(workdir, read_only=True)
  try:  # checks the network first; step None: the newest intact, finite checkpoint
    return ckpt.restore(run.layout.abstract, step, config=run.config)
  finally:
    ckpt.close()


def run_eval(config: ml_collections.ConfigDict, workdir: str,
             step: int | None = None) -> dict:
  """--mode=eval: centre-crop and ten-crop errors of a checkpoint -> DIR/eval/<step>.json."""
  run = setup.build(config, workdir, mode="eval")
  state = restore(run, workdir, step)
  step = int(jax.device_get(state.step))
  eval_step = steps.make_eval_step(config, run.layout)
  bad_images = data.BadImageLog(on_bad_image=config.input.on_bad_image)
  centre = evaluate(run, state, eval_step, ten_crop=False, bad_images=bad_images)
  ten = evaluate(run, state, eval_step, ten_crop=True, bad_images=bad_images)
  report = {
      "step": step, "split": config.dataset.eval_split, "num_examples": centre["num_examples"],
      # This process's skipped files; num_skipped counts those of all processes.
      "num_skipped": centre["num_skipped"], "skipped_files": bad_images.report(),
      "center_crop": {k: centre[k] for k in ("top1_error", "top5_error", "loss")},
      "ten_crop": {k: ten[k] for k in ("top1_error", "top5_error", "loss")},
  }
  if jax.process_index() == 0:
    path = fileio.path(workdir) / "eval" / f"{step}.json"
    fileio.write_json(path, report)
    logging.info("wrote %s", path)
  if centre["num_skipped"]:
    logging.warning("evaluation skipped %d unusable images: %s", centre["num_skipped"],
                    bad_images.summary())
  skipped = f" ({centre['num_skipped']} skipped)" if centre["num_skipped"] else ""
  print(f"step {step}, {report['num_examples']} {report['split']} images{skipped}: "
        f"centre crop top-1/top-5 error {centre['top1_error']:.4f}/{centre['top5_error']:.4f}, "
        f"ten crops {ten['top1_error']:.4f}/{ten['top5_error']:.4f}")
  return report


def readable_names(class_names: Sequence[str]) -> list[str]:
  """ImageNet's words for ILSVRC-2012 wnids (any subset of them), other names unchanged."""
  with open(os.path.join(RESOURCES, "ilsvrc2012_classes.tsv")) as f:
    words = dict(line.rstrip("\n").split("\t") for line in f if not line.startswith("#"))
  return [words.get(n, n) for n in class_names]


def predict(config: ml_collections.ConfigDict, workdir: str, paths: Sequence[str],
            step: int | None = None, top_k: int = 5) -> list[list[tuple[str, float]]]:
  """--mode=predict: the top-k classes with probabilities for each image file.

  Needs only the workdir (checkpoint, class names, input statistics), not the dataset.
  """
  # A path that names nothing is a typo; an existing file that cannot be used (unreadable,
  # a dangling link, corrupt, too large) is skipped and named below.
  missing = [p for p in paths if not os.path.lexists(p)]
  if missing:
    raise FileNotFoundError(f"--images: no such file: {', '.join(missing)}")
  run = setup.build(config, workdir, mode="predict")
  state = restore(run, workdir, step)
  names = readable_names(run.class_names)
  bad_images = data.BadImageLog(on_bad_image=config.input.on_bad_image)
  images = data.preprocess_image_files(config, paths, stats=run.stats, bad_images=bad_images)
  if len(bad_images.paths) == len(set(paths)):
    raise data.BadImageError(f"no usable image in --images: {bad_images.summary()}")
  probs, _ = features_and_probabilities(run, state.params, images)
  results = []
  for path, p in zip(paths, probs, strict=True):
    if path in bad_images.reasons:
      results.append([])
      print(f"{path}\n  skipped: {bad_images.reasons[path]}")
      continue
    top = np.argsort(-p)[:top_k]
    results.append([(names[i], float(p[i])) for i in top])
    print(path)
    for i in top:
      print(f"  {p[i]:7.2%}  {names[i]}")
  return results


def features_and_probabilities(run: setup.RunSetup, params, images: np.ndarray,
                               batch_size: int | None = None, predict_step=None):
  """Softmax [n, classes] and the last hidden layer (fc7, after ReLU) [n, fc7 width].

  Batched and jitted; the last batch is padded to the data axis and trimmed. Pass the
  same `predict_step` (`steps.make_predict_step(config, run.layout)`) to repeated calls:
  a new one compiles again.
  """
  predict_step = predict_step or steps.make_predict_step(run.config, run.layout)
  mesh = run.mesh
  size = mesh.shape[parallel.DATA]
  batch_size = batch_size or run.config.eval_batch_size
  probs, feats = [], []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    padded = -(-len(chunk) // size) * size
    chunk = np.concatenate([chunk, np.zeros((padded - len(chunk), *chunk.shape[1:]),
                                            chunk.dtype)])
    p, f = jax.device_get(predict_step(params, jax.device_put(
        chunk, parallel.batch_sharding(mesh))))
    n = min(batch_size, len(images) - start)
    probs.append(p[:n])
    feats.append(f[:n])
  return np.concatenate(probs), np.concatenate(feats)
