"""Loading experiment files (`experiments/*.py`) by path, as the `--config` flag does.

One loader for every tool that takes a config or sweep file by path. Experiment files
import `experiments.*` like a config flag's module would, so the repo root goes on
sys.path first.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import ml_collections

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_module(path: str) -> ModuleType:
  """The Python file at `path` (absolute, or relative to the cwd or the repo root)."""
  if not os.path.isfile(path) and os.path.isfile(os.path.join(REPO_ROOT, path)):
    path = os.path.join(REPO_ROOT, path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such file: {path!r}")
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
  name = "_experiment_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(spec: str) -> ml_collections.ConfigDict:
  """`file.py[:variant]` -> its get_config(variant), as `--config=file.py:variant` gives."""
  path, _, variant = spec.partition(":")
  module = load_module(path)
  return module.get_config(variant) if variant else module.get_config()
