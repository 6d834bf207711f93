"""One run, set up once from a config: what training, evaluation, prediction and the
figures all take, instead of each re-deriving it.

    run = setup.build(config, workdir, mode="train")   # validates; writes nothing
    setup.record(run, workdir)                         # train only: the workdir artefacts

`build` checks the whole config (every field, the mesh, the dataset) before anything is
compiled or written, then derives, once: the mesh and this process's share of each batch,
the train state's layout (optimizer, PartitionSpecs, abstract state: `steps.StateLayout`),
the learning-rate schedule, the class names and the input statistics.

A workdir is a complete artefact: `record` writes the class names (dataset.json) and the
input statistics actually used (input_stats.npz) beside the checkpoints and the config, so
`--mode=predict` on a copied workdir needs no training data, and a resumed run keeps the
statistics it started with even if the dataset's cache changes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh

from alexnet_jax import config_checks, data, fileio, optim, parallel, steps
from alexnet_jax.data import stats as stats_lib

DATASET_FILE = "dataset.json"
FINAL_METRICS = "final_metrics.json"  # written by training at its end; read by --follow
STATS_FILE = "input_stats.npz"


@dataclasses.dataclass(frozen=True)
class RunSetup:
  """A validated run on a mesh. `info` is None for --mode=predict of a recorded workdir
  (no dataset needed); `steps_per_epoch`/`num_train_steps`/`schedule` are for training."""

  config: ml_collections.ConfigDict
  mesh: Mesh
  layout: steps.StateLayout
  share: tuple[int, int]  # (index, count) of this process's share of each batch
  class_names: tuple[str, ...]  # index = label (wnids for ImageNet)
  stats: stats_lib.Stats | None  # mean image / PCA used by the pipeline; None: none needed
  info: data.DatasetInfo | None
  steps_per_epoch: int = 0
  num_train_steps: int = 0
  schedule: optim.Schedule | None = None

  def batch_args(self) -> dict[str, Any]:
    """Keyword arguments every pipeline call of this run takes."""
    return {"process_index": self.share[0], "process_count": self.share[1], "stats": self.stats,
            "class_names": self.class_names}


def build(config: ml_collections.ConfigDict, workdir: str | None = None, *,
          mode: str = "train") -> RunSetup:
  """Validates `config` and derives the run (compiles nothing, writes nothing).

  mode "train" needs the training data; "eval" the evaluation split; "predict" nothing
  when `workdir` holds the recorded class names and statistics.
  """
  config_checks.check(config, jax.device_count())
  mesh = parallel.make_mesh(config)
  damaged, names = None, None
  try:
    recorded = read_record(workdir)
    names = recorded[0] if recorded is not None else None
  except DamagedRecord as err:  # derived files: recomputed from the dataset, if it is there
    recorded, damaged, names = None, err, err.class_names
    logging.warning("%s: recomputing it from the dataset (record() writes it again)", err)
  info = None
  if mode != "predict" or recorded is None:
    _check_cache_dir(config)
    # Recorded class names fix the labels (an image folder then needs only the split
    # it is read for); the dataset must then have those classes.
    try:
      info = data.dataset_info(config, names)
    except data.DatasetNotFoundError as err:
      if damaged is None:
        raise
      raise DamagedRecord(
          f"{damaged}, and without the dataset it cannot be recomputed ({err}). Copy "
          f"{damaged.file} from a copy of the workdir, or point the config at the training "
          "data", damaged.file) from err
    if info.num_classes != config.model.num_classes:
      raise config_checks.ConfigError(
          "model.num_classes", f"{config.model.num_classes}, but dataset "
          f"{config.dataset.name!r} has {info.num_classes} classes")
    if names is not None and tuple(names) != info.class_names:
      raise config_checks.ConfigError(
          "dataset", f"its classes differ from those recorded in {workdir}/{DATASET_FILE} "
          f"(e.g. {_first_difference(names, info.class_names)}): labels would mean "
          "other classes. Point the config at the dataset the run was trained on.")
  class_names, stats = recorded if recorded is not None else (
      info.class_names, data.needed_statistics(config))
  spe = total = 0
  schedule = None
  if mode == "train":
    spe = data.steps_per_epoch(config, info)
    total = (config.num_train_steps if config.num_train_steps > 0
             else max(1, round(config.num_epochs * spe)))
    schedule = optim.make_schedule(config, spe)
  return RunSetup(config=config, mesh=mesh, layout=steps.state_layout(config, mesh),
                  share=parallel.data_share(mesh), class_names=tuple(class_names), stats=stats,
                  info=info, steps_per_epoch=spe, num_train_steps=total, schedule=schedule)


def _check_cache_dir(config: ml_collections.ConfigDict) -> None:
  """dataset.cache_dir (default under HOME) receives the demo data, the statistics and the
  square cache: one that cannot be written is named before any of them is made."""
  problem = fileio.unwritable_dir(config.dataset.cache_dir)
  if problem is not None:
    raise config_checks.ConfigError(
        "dataset.cache_dir", f"{config.dataset.cache_dir!r}: {problem}; the demo data, "
        "input statistics and square cache are written there: pass "
        "--config.dataset.cache_dir=A_WRITABLE_DIR")


def record(run: RunSetup, workdir: str) -> None:
  """Writes the class names and input statistics into `workdir` (once, or again where they
  are damaged; process 0)."""
  if jax.process_index() != 0:
    return
  try:
    if read_record(workdir) is not None:
      return
  except DamagedRecord:
    pass  # build() recomputed what was damaged: written again below
  workdir = fileio.path(workdir)
  if run.stats is not None:
    stats_lib.save(os.fspath(workdir / STATS_FILE), run.stats,
                   f"the statistics this run's pipeline used ({run.config.dataset.name})")
  fileio.write_json(workdir / DATASET_FILE, {
      "dataset": run.config.dataset.name, "class_names": list(run.class_names),
      "num_train": run.info.num_train, "num_eval": run.info.num_eval,
      "input_stats": STATS_FILE if run.stats is not None else None})


class DamagedRecord(FileNotFoundError):
  """dataset.json or input_stats.npz in a workdir is damaged (e.g. a half-written copy).

  `file`: which one; `class_names`: the recorded names if dataset.json itself is intact.
  A FileNotFoundError, so the CLI prints it in one line where it cannot be mended.
  """

  def __init__(self, message: str, file: str, class_names: list[str] | None = None):
    super().__init__(message)
    self.file, self.class_names = file, class_names


def read_record(workdir: str | None) -> tuple[list[str], stats_lib.Stats | None] | None:
  """(class names, statistics or None) recorded in `workdir`, or None if not recorded.

  Raises DamagedRecord if a recorded file cannot be read, FileNotFoundError if the
  statistics file that dataset.json names is missing (a workdir copied without it).
  """
  path = fileio.path(workdir) / DATASET_FILE if workdir else None
  if path is None or not path.is_file():
    return None
  try:
    meta = fileio.read_json(path)
    names = [str(n) for n in meta["class_names"]]
  except (ValueError, KeyError, TypeError) as err:
    raise DamagedRecord(f"{path} is damaged ({type(err).__name__}: {err})",
                        DATASET_FILE) from err
  stats = None
  if meta.get("input_stats"):
    path = os.fspath(fileio.path(workdir) / meta["input_stats"])
    try:
      stats = stats_lib.load(path)
    except stats_lib.Unreadable as err:
      raise DamagedRecord(str(err), meta["input_stats"], names) from err
    if stats is None:
      raise FileNotFoundError(f"{path} is missing, but {DATASET_FILE} says the run used it; "
                              "copy the whole workdir")
  return names, stats


def _first_difference(a, b) -> str:
  for i, (x, y) in enumerate(zip(a, b, strict=False)):
    if x != y:
      return f"class {i}: recorded {x!r}, dataset {y!r}"
  return f"recorded {len(a)} classes, dataset {len(b)}"
