"""The input pipeline: sources -> validate/decode -> augment -> batches, and statistics.

See `pipeline` for order, resume and multi-process sharing; `sources` for where data
comes from; `demo` for the built-in demo data; `stats` for mean and PCA statistics.

The names below are imported on first use, so that `python -m alexnet_jax.data.prepare
--help` (which needs none of them) does not wait for TensorFlow to load.
"""

import importlib

_EXPORTS = {
    "decode": ("BadImageError", "BadImageLog"),
    "pipeline": ("dataset_info", "eval_batches", "eval_dataset", "load_image_files_uint8",
                 "needed_statistics", "preprocess_image_files", "statistics",
                 "steps_per_epoch", "train_batches", "train_dataset"),
    "sources": ("DatasetInfo", "DatasetNotFoundError"),
    "stats": ("Stats",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
  if name not in _MODULE_OF:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
  globals()[name] = value  # once
  return value
