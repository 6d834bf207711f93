"""The input pipeline: sources -> validate/decode -> augment -> batches, and statistics.

See `pipeline` for order, resume and multi-process sharing; `sources` for where data
comes from; `demo` for the built-in demo data; `stats` for mean and PCA statistics.
"""

from alexnet_jax.data.decode import BadImageError, BadImageLog
from alexnet_jax.data.pipeline import (
    dataset_info,
    eval_batches,
    eval_dataset,
    load_image_files_uint8,
    needed_statistics,
    preprocess_image_files,
    statistics,
    steps_per_epoch,
    train_batches,
    train_dataset,
)
from alexnet_jax.data.sources import DatasetInfo, DatasetNotFoundError
from alexnet_jax.data.stats import Stats

__all__ = [
    "BadImageError", "BadImageLog", "DatasetInfo", "DatasetNotFoundError", "Stats",
    "dataset_info", "eval_batches", "eval_dataset", "load_image_files_uint8",
    "needed_statistics", "preprocess_image_files", "statistics", "steps_per_epoch", "train_batches",
    "train_dataset",
]
