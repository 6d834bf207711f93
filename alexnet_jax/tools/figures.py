"""The paper's figures for a run: PNG files (and their numbers as JSON) in DIR/figures/.

  write_all(config, workdir)               # restores the latest checkpoint, writes all
  conv1_kernels(params, path)              # Figure 3: the conv1 kernels, tower by tower
  neighbours(run, params, query_paths, train_paths, path)   # Figure 4 (run: setup.build)
  training_curves(workdir, path)           # loss, errors and learning rate vs step

Figure 3 shows every conv1 kernel [kh, kw, 3] as a small RGB image, tower 1's
above tower 2's, with ONE min-max normalisation over all of them (as the 2012
tool did, so a kernel's brightness and contrast say how large its weights are).
Beside it, conv1_colour.json holds one number per tower saying how colour-specific
its kernels are (see `colour_specificity`): the paper reports tower 1 learning
largely colour-agnostic kernels and tower 2 colour-specific ones.

Figure 4 shows, on the left, evaluation images with their five most probable
classes and, on the right, the same images with their nearest training images in
the Euclidean distance of the last hidden layer (fc7, 4096-d in the paper).

Everything is drawn off-screen: matplotlib figures get an Agg canvas explicitly
(no pyplot, no display, no global backend switch), kernel grids are written with
PIL at their exact pixel size.

Length (~480 lines): three figures, each a short computation (grid, colour numbers,
nearest neighbours, event reading) and its drawing; they share only the output folder,
so a split would be by figure, three small files that are always read together.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from alexnet_jax import fileio

_log = logging.getLogger(__name__)

FIGURES_DIR = "figures"

# Figure 3 layout (pixels): 16 kernels a row as in the paper, each enlarged 4x with
# nearest neighbours (11x11 -> 44x44), 2 px between kernels, 12 px between towers.
KERNELS_PER_ROW = 16
KERNEL_SCALE = 4
KERNEL_PAD = 2
TOWER_GAP = 12
BACKGROUND = 255  # white spacing

# Figure 4 defaults; `write_all` arguments or config.figures.<name> override them.
DEFAULT_NUM_QUERIES = 8
# Training images searched for neighbours: ~10 s of features on a 2-core CPU for the demo.
DEFAULT_MAX_TRAIN_IMAGES = 1000
DEFAULT_NUM_NEIGHBOURS = 6  # the paper shows six
TOP_K = 5  # labels shown per query (the paper's top-5)
# Images preprocessed and pushed through the network per call: bounds host memory
# (1000 x 224 x 224 x 3 float32 = 600 MB) while keeping recompilations few.
_FEATURE_CHUNK = 1000
_DISTANCE_BLOCK = 4096  # training features per block of the distance computation

TRAIN_TAGS = ("train/loss", "train/top1_error", "train/top5_error", "train/learning_rate")
EVAL_TAGS = ("eval/loss", "eval/top1_error", "eval/top5_error")
TEN_CROP_TAGS = ("eval_ten_crop/top1_error", "eval_ten_crop/top5_error")

COLOUR_DEFINITION = (
    "per kernel w [kh, kw, 3]: ||w - g||_F / ||w||_F, where g is w projected per pixel "
    "onto the grey axis (1,1,1)/sqrt(3) (every channel replaced by the pixel's channel "
    "mean): the share (as a norm) of the kernel off the grey axis, averaged over the "
    "tower's kernels. 0 = grey (colour-agnostic); 1 = channels summing to zero at every "
    "pixel (e.g. red against green); a single-channel kernel, and i.i.d. random weights "
    "(as at initialisation) on average, give sqrt(2/3) = 0.816")


# ------------------------------------------------------------------ Figure 3


def kernel_grid(kernels: np.ndarray, *, per_row: int = KERNELS_PER_ROW,
                scale: int = KERNEL_SCALE, pad: int = KERNEL_PAD, tower_gap: int = TOWER_GAP,
                background: int = BACKGROUND) -> tuple[np.ndarray, np.ndarray]:
  """Lays out conv1 kernels as one RGB image, one block of rows per tower.

  Args:
    kernels: float [T, kh, kw, 3, K] (the params' conv1 kernel).

  Returns:
    image: uint8 [H, W, 3]. All kernels share one min-max normalisation to 0-255.
    corners: int [T, K, 2], the (row, column) of each kernel's top-left pixel; the
      kernel covers [kh * scale, kw * scale] pixels from there.
  """
  kernels = np.asarray(kernels, np.float64)
  towers, kh, kw, channels, count = kernels.shape
  if channels != 3:
    raise ValueError(f"conv1 kernels must have 3 input channels, got {channels}")
  lo, hi = kernels.min(), kernels.max()
  norm = (kernels - lo) / (hi - lo) if hi > lo else np.full_like(kernels, 0.5)
  pixels = np.round(norm * 255).astype(np.uint8)

  cols = min(per_row, count)
  rows = math.ceil(count / cols)
  cell_h, cell_w = kh * scale, kw * scale
  block_h = rows * cell_h + (rows - 1) * pad
  height = 2 * pad + towers * block_h + (towers - 1) * tower_gap
  width = 2 * pad + cols * cell_w + (cols - 1) * pad
  image = np.full((height, width, 3), background, np.uint8)
  corners = np.zeros((towers, count, 2), np.int64)
  for t in range(towers):
    for k in range(count):
      y = pad + t * (block_h + tower_gap) + (k // cols) * (cell_h + pad)
      x = pad + (k % cols) * (cell_w + pad)
      big = np.repeat(np.repeat(pixels[t, :, :, :, k], scale, axis=0), scale, axis=1)
      image[y:y + cell_h, x:x + cell_w] = big
      corners[t, k] = (y, x)
  return image, corners


def colour_specificity(kernels: np.ndarray) -> np.ndarray:
  """How far each kernel lies off the grey axis: float [T, K] in [0, 1].

  kernels: float [T, kh, kw, 3, K]. See COLOUR_DEFINITION. Scale-free, so the
  towers compare whatever their weights' magnitudes.
  """
  w = np.asarray(kernels, np.float64)
  grey = w.mean(axis=3, keepdims=True)  # per pixel (w.u)u has every channel = the mean
  off = np.sqrt(((w - grey) ** 2).sum(axis=(1, 2, 3)))
  total = np.sqrt((w ** 2).sum(axis=(1, 2, 3)))
  return np.where(total > 0, off / np.maximum(total, 1e-30), 0.0)


def conv1_kernels(params: dict[str, Any], path: str, *,
                  json_path: str | None = None) -> dict[str, Any]:
  """Figure 3: writes the conv1 kernel grid to `path` (PNG) and the colour numbers.

  Args:
    params: the model's params; uses params["conv1"]["kernel"] [T, kh, kw, 3, K].
    path: the PNG to write.
    json_path: where the colour numbers go (default: conv1_colour.json beside `path`).

  Returns:
    {"tower_1": x, ..., "tower_T": y, "definition": str}: mean colour specificity of
    each tower's kernels (tower 2 > tower 1 in the paper's runs).
  """
  from PIL import Image

  kernels = np.asarray(params["conv1"]["kernel"], np.float32)
  image, _ = kernel_grid(kernels)
  fileio.write_with(path, lambda f: Image.fromarray(image).save(f, format="PNG"))
  per_kernel = colour_specificity(kernels)
  result: dict[str, Any] = {f"tower_{t + 1}": float(per_kernel[t].mean())
                            for t in range(per_kernel.shape[0])}
  result["definition"] = COLOUR_DEFINITION
  fileio.write_json(json_path or fileio.path(path).parent / "conv1_colour.json", result)
  return result


# ------------------------------------------------------------------ Figure 4


def nearest(queries: np.ndarray, bank: np.ndarray, k: int,
            block: int = _DISTANCE_BLOCK) -> tuple[np.ndarray, np.ndarray]:
  """The k rows of `bank` nearest each query in Euclidean distance.

  Args:
    queries: float [q, d]; bank: float [n, d].
    k: neighbours wanted (at most n).
    block: bank rows per distance block (memory is q x block).

  Returns:
    (indices int64 [q, k], distances float64 [q, k]), nearest first; ties go to the
    lower bank index.
  """
  queries = np.asarray(queries, np.float64)
  bank = np.asarray(bank, np.float64)
  k = min(k, len(bank))
  q_sq = (queries ** 2).sum(axis=1, keepdims=True)
  best_d = np.full((len(queries), 0), np.inf)
  best_i = np.zeros((len(queries), 0), np.int64)
  for start in range(0, len(bank), block):
    chunk = bank[start:start + block]
    # |a-b|^2 = |a|^2 + |b|^2 - 2ab in float64: one matmul per block, no n x d copies.
    d2 = q_sq + (chunk ** 2).sum(axis=1)[None, :] - 2.0 * queries @ chunk.T
    cand_d = np.concatenate([best_d, np.maximum(d2, 0.0)], axis=1)
    cand_i = np.concatenate([best_i, np.broadcast_to(
        np.arange(start, start + len(chunk)), d2.shape)], axis=1)
    order = np.lexsort((cand_i, cand_d), axis=1)[:, :k]  # by distance, then index
    best_d = np.take_along_axis(cand_d, order, axis=1)
    best_i = np.take_along_axis(cand_i, order, axis=1)
  return best_i, np.sqrt(best_d)


def _features(run, params, paths: Sequence[str],
              predict_step) -> tuple[np.ndarray, np.ndarray]:
  """(probabilities [n, classes], fc7 features [n, width]) of image files, in chunks."""
  from alexnet_jax import data
  from alexnet_jax.run import evaluate

  probs, feats = [], []
  for start in range(0, len(paths), _FEATURE_CHUNK):
    images = data.preprocess_image_files(run.config, paths[start:start + _FEATURE_CHUNK],
                                         stats=run.stats)
    p, f = evaluate.features_and_probabilities(run, params, images, predict_step=predict_step)
    probs.append(p)
    feats.append(f)
  return np.concatenate(probs), np.concatenate(feats)


def neighbours(run, params, query_paths: Sequence[str], train_paths: Sequence[str],
               path: str, num_neighbours: int = DEFAULT_NUM_NEIGHBOURS, *,
               query_labels: Sequence[int] | None = None,
               names: Sequence[str] | None = None) -> dict[str, Any]:
  """Figure 4: top-5 labels (left) and nearest training images in fc7 space (right).

  Args:
    run: the run (`setup.build`); params: as for `evaluate.features_and_probabilities`.
    query_paths: the q images shown (e.g. from the evaluation split).
    train_paths: the n images searched for neighbours.
    path: the PNG to write.
    num_neighbours: neighbours shown per query (the paper: six).
    query_labels: true classes of the queries, if known: their bar is drawn red.
    names: class names (default: the run's, in ImageNet's words where they are wnids).

  Returns:
    {"queries": [{"path", "label", "label_name", "top5": [[name, probability]] (TOP_K of them),
                  "neighbours": [{"path", "distance"}]}]}.
  """
  from alexnet_jax import data, steps
  from alexnet_jax.run import evaluate

  if names is None:
    names = evaluate.readable_names(run.class_names)
  query_paths, train_paths = [str(p) for p in query_paths], [str(p) for p in train_paths]
  predict_step = steps.make_predict_step(run.config, run.layout)  # one compile for all chunks
  q_probs, q_feats = _features(run, params, query_paths, predict_step)
  _, t_feats = _features(run, params, train_paths, predict_step)
  index, dist = nearest(q_feats, t_feats, num_neighbours)

  top = np.argsort(-q_probs, axis=1, kind="stable")[:, :min(TOP_K, q_probs.shape[1])]
  result = {"queries": [{
      "path": p,
      "label": None if query_labels is None else int(query_labels[i]),
      "label_name": None if query_labels is None else names[int(query_labels[i])],
      "top5": [[names[c], float(q_probs[i, c])] for c in top[i]],
      "neighbours": [{"path": train_paths[j], "distance": float(d)}
                     for j, d in zip(index[i], dist[i], strict=True)],
  } for i, p in enumerate(query_paths)]}

  # Only the shown images are decoded again, as uint8 for display.
  shown = data.load_image_files_uint8(
      run.config, query_paths + [train_paths[j] for j in index.reshape(-1)])
  q_images = shown[:len(query_paths)]
  n_images = shown[len(query_paths):].reshape(len(query_paths), index.shape[1],
                                              *shown.shape[1:])
  _draw_neighbours(result, q_images, n_images, path)
  return result


def _draw_neighbours(result: dict[str, Any], q_images: np.ndarray, n_images: np.ndarray,
                     path: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  queries = result["queries"]
  rows, k = len(queries), n_images.shape[1]
  side = 1.3  # inches per image
  ratios = [1.0, 1.7, 0.25, 1.0] + [1.0] * k
  fig = Figure(figsize=(side * sum(ratios), side * rows + 0.5), dpi=100)
  FigureCanvasAgg(fig)
  grid = fig.add_gridspec(rows, len(ratios), width_ratios=ratios, wspace=0.06, hspace=0.12,
                          left=0.01, right=0.99, top=1 - 0.4 / (side * rows + 0.5),
                          bottom=0.01)

  def show(ax, image, edge=None):
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if edge:
      for spine in ax.spines.values():
        spine.set_edgecolor(edge)
        spine.set_linewidth(2.5)

  for r, q in enumerate(queries):
    show(fig.add_subplot(grid[r, 0]), q_images[r])
    bars = fig.add_subplot(grid[r, 1])
    labels = [name for name, _ in q["top5"]]
    probs = [p for _, p in q["top5"]]
    colours = ["#d62728" if name == q["label_name"] else "#9ecae1" for name in labels]
    ys = np.arange(len(labels))[::-1]
    bars.barh(ys, probs, color=colours, height=0.8)
    for y, name, p in zip(ys, labels, probs, strict=True):
      bars.text(0.02, y, f"{name[:24]}  {p:.0%}", va="center", ha="left", fontsize=6.5)
    bars.set_xlim(0, 1)
    bars.set_ylim(-0.6, len(labels) - 0.4)
    bars.set_xticks([])
    bars.set_yticks([])
    show(fig.add_subplot(grid[r, 3]), q_images[r], edge="black")
    for j in range(k):
      ax = fig.add_subplot(grid[r, 4 + j])
      show(ax, n_images[r, j])
      ax.set_title(f"{q['neighbours'][j]['distance']:.3g}", fontsize=6, pad=1.5)
  fig.text(0.01, 1 - 0.05 / (side * rows + 0.5), f"top-{TOP_K} predictions (true class red)",
           va="top", fontsize=9)
  fig.text(sum(ratios[:3]) / sum(ratios), 1 - 0.05 / (side * rows + 0.5),
           f"query, then its {k} nearest training images in fc7 (Euclidean distance above)",
           va="top", fontsize=9)
  fileio.write_with(path, lambda f: fig.savefig(f, format="png"))


# ------------------------------------------------------------------ curves


def read_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Every scalar the run logged: {tag: (steps int64 [m], values float64 [m])}.

  clu writes scalars as tensor events; a step logged twice (a resumed run) keeps
  its last value.
  """
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util  # = tf.make_ndarray, without importing TF

  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0, "scalars": 0})
  acc.Reload()
  out = {}
  tags = acc.Tags()
  for tag in tags.get("tensors", []):
    values = {}
    for e in acc.Tensors(tag):
      v = tensor_util.make_ndarray(e.tensor_proto)
      if v.size == 1 and np.issubdtype(v.dtype, np.number):
        values[e.step] = float(v.reshape(()))
    if values:
      steps = np.array(sorted(values), np.int64)
      out[tag] = (steps, np.array([values[s] for s in steps], np.float64))
  for tag in tags.get("scalars", []):  # plain scalar summaries, if another writer made them
    values = {e.step: e.value for e in acc.Scalars(tag)}
    steps = np.array(sorted(values), np.int64)
    out.setdefault(tag, (steps, np.array([values[s] for s in steps], np.float64)))
  return out


def training_curves(workdir: str, path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Loss, top-1 and top-5 error (train and eval) and learning rate (log) vs step -> PNG.

  Reads the TensorBoard event files clu wrote in `workdir`; returns the curves drawn.
  Raises FileNotFoundError when `workdir` holds none of the tags.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  scalars = read_scalars(workdir)
  wanted = TRAIN_TAGS + EVAL_TAGS + TEN_CROP_TAGS
  curves = {t: scalars[t] for t in wanted if t in scalars}
  if not curves:
    raise FileNotFoundError(f"no training scalars ({', '.join(TRAIN_TAGS)}) in TensorBoard "
                            f"event files in {workdir}")
  fig = Figure(figsize=(10, 7), dpi=100)
  FigureCanvasAgg(fig)
  axes = fig.subplots(2, 2)
  panels = [("loss", "cross-entropy loss", False), ("top1_error", "top-1 error", False),
            ("top5_error", "top-5 error", False), ("learning_rate", "learning rate", True)]
  styles = {"train": dict(color="#1f77b4", lw=1.0), "eval": dict(color="#d62728", marker="o",
                                                                   ms=3, lw=1.2),
            "eval_ten_crop": dict(color="#2ca02c", marker="s", ms=3, lw=1.0, ls="--")}
  names = {"train": "train (batch)", "eval": "eval (centre crop)",
           "eval_ten_crop": "eval (10 crops)"}
  for ax, (metric, title, log) in zip(axes.flat, panels, strict=True):
    drawn = False
    for prefix in ("train", "eval", "eval_ten_crop"):
      tag = f"{prefix}/{metric}"
      if tag not in curves:
        continue
      steps, values = curves[tag]
      if log:
        keep = values > 0  # a log axis cannot show a zero rate
        steps, values = steps[keep], values[keep]
        if not len(steps):
          continue
      ax.plot(steps, values, label=names[prefix], **styles[prefix])
      drawn = True
    if log and drawn:
      ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if drawn:
      ax.legend(fontsize=8)
    else:
      ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
  fig.suptitle(fileio.path(workdir).name)
  fig.tight_layout()
  fileio.write_with(path, lambda f: fig.savefig(f, format="png"))
  return curves


# ------------------------------------------------------------------ all of them


def _knob(config, name: str, value, default):
  """An explicit argument, else config.figures.<name> if the config has it, else default."""
  if value is not None:
    return value
  figures_cfg = config.get("figures") if hasattr(config, "get") else None
  if figures_cfg is not None and name in figures_cfg:
    return figures_cfg[name]
  return default


def evenly_spaced(n: int, count: int) -> np.ndarray:
  """`min(n, count)` distinct indices spread evenly over range(n), int64 (deterministic)."""
  count = min(n, count)
  if count <= 0:
    return np.zeros([0], np.int64)
  return np.unique(np.linspace(0, n - 1, count).round().astype(np.int64))


def write_all(config, workdir: str, *, run=None, state=None, step: int | None = None,
              num_queries: int | None = None, max_train_images: int | None = None,
              num_neighbours: int | None = None) -> list[str]:
  """Writes every figure of a run into workdir/figures/; returns the paths written.

  Args:
    config: the run's config.
    workdir: the run's directory (checkpoints, TensorBoard events).
    run: the run as `setup.build` made it (default: built here from config).
    state: a TrainState to draw (e.g. at the end of training); default: restored from
      the checkpoint at `step` (default latest) with `evaluate.restore`.
    num_queries / max_train_images / num_neighbours: Figure 4's size (default
      config.figures.<name> if present, else DEFAULT_*). Queries are evenly spaced over
      the evaluation split, the searched training images evenly spaced over the
      training split, so the figure is deterministic.

  Figure 4 needs image files (the demo or an image folder); with a TFDS dataset it is
  skipped with a warning. The training curves are skipped when the workdir has no
  TensorBoard events (e.g. imported weights). Single-process only.
  """
  from alexnet_jax.data import sources
  from alexnet_jax.run import evaluate, setup

  run = run or setup.build(config, workdir, mode="eval")
  if state is None:
    state = evaluate.restore(run, workdir, step)
  out_dir = os.fspath(fileio.path(workdir) / FIGURES_DIR)
  written = []

  path = os.path.join(out_dir, "conv1_kernels.png")
  colour = conv1_kernels({"conv1": {"kernel": np.asarray(state.params["conv1"]["kernel"])}},
                         path)
  written += [path, os.path.join(out_dir, "conv1_colour.json")]
  _log.info("conv1 colour specificity: %s", {k: v for k, v in colour.items()
                                             if k != "definition"})

  source = sources.get_source(config)
  if hasattr(source, "files"):
    eval_paths, eval_labels = source.files("eval")
    train_paths, _ = source.files("train")
    q_idx = evenly_spaced(len(eval_paths),
                          int(_knob(config, "num_queries", num_queries, DEFAULT_NUM_QUERIES)))
    t_idx = evenly_spaced(len(train_paths), int(_knob(
        config, "max_train_images", max_train_images, DEFAULT_MAX_TRAIN_IMAGES)))
    path = os.path.join(out_dir, "neighbours.png")
    result = neighbours(
        run, state.params, list(eval_paths[q_idx]), list(train_paths[t_idx]),
        path, int(_knob(config, "num_neighbours", num_neighbours, DEFAULT_NUM_NEIGHBOURS)),
        query_labels=list(eval_labels[q_idx]))
    json_path = os.path.join(out_dir, "neighbours.json")
    fileio.write_json(json_path, {"num_train_searched": len(t_idx), **result})
    written += [path, json_path]
  else:
    _log.warning("Figure 4 skipped: dataset %r has no image files to show (use the demo "
                 "or config.dataset.name='image_folder')", config.dataset.name)

  path = os.path.join(out_dir, "training_curves.png")
  try:
    training_curves(workdir, path)
    written.append(path)
  except FileNotFoundError as e:
    _log.warning("training curves skipped: %s", e)
  return written
