"""The build: pyproject.toml holds the metadata; this adds the optional C++ extension.

alexnet_jax/kernels/onednn_conv.cc -> alexnet_jax/kernels/_onednn_conv*.so: oneDNN's
convolutions as XLA FFI handlers (model.conv_impl). oneDNN's headers and libdnnl.so.3
come from the onednn-devel-cpu-gomp / onednn-cpu-gomp wheels, which pyproject.toml's
build requirements put in pip's build environment (and requirements.txt in the venv,
for run time); XLA's FFI headers are vendored (kernels/third_party, from jaxlib).

The extension is optional: without oneDNN (another platform, no wheel) it is left out,
and a failed compile (no C++ compiler) is a warning, not an error; either way
`pip install -e .` succeeds and model.conv_impl="auto" uses XLA's convolutions.
"""

import importlib.metadata
import os
import pathlib
import sys

from setuptools import Extension, setup

HERE = pathlib.Path(__file__).parent
KERNELS = HERE / "alexnet_jax" / "kernels"


def _wheel_file(dist: str, suffix: str) -> pathlib.Path | None:
  """A file that the wheel `dist` installed (its data files live under the prefix)."""
  try:
    files = importlib.metadata.distribution(dist).files or ()
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in files:
    # RECORD paths of data files are relative to site-packages ("../../libdnnl.so.3",
    # "../../../include/oneapi/dnnl/dnnl.hpp"): match the end, resolve, check it is there.
    if ("/" + str(f).replace("\\", "/")).endswith("/" + suffix):
      path = pathlib.Path(f.locate()).resolve()
      if path.exists():
        return path
  return None


def _onednn() -> tuple[pathlib.Path, pathlib.Path] | None:
  """(include dir, libdnnl.so.3) from the build environment, else from sys.prefix."""
  header = _wheel_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp")
  lib = _wheel_file("onednn-cpu-gomp", "libdnnl.so.3")
  if header is None:
    header = pathlib.Path(sys.prefix) / "include" / "oneapi" / "dnnl" / "dnnl.hpp"
  if lib is None:
    lib = pathlib.Path(sys.prefix) / "lib" / "libdnnl.so.3"
  if not (header.exists() and lib.exists()):
    return None
  return header.parents[2], lib


def _extensions() -> list[Extension]:
  if os.environ.get("ALEXNET_JAX_NO_EXTENSION"):
    print("alexnet_jax: ALEXNET_JAX_NO_EXTENSION is set: the oneDNN extension is not built")
    return []
  if not sys.platform.startswith("linux"):
    print("alexnet_jax: the oneDNN extension is built on Linux only; XLA's convolutions")
    return []
  found = _onednn()
  if found is None:
    print("alexnet_jax: oneDNN (onednn-devel-cpu-gomp, onednn-cpu-gomp) not found: the "
          "oneDNN extension is not built; XLA's convolutions will be used")
    return []
  include, lib = found
  return [Extension(
      "alexnet_jax.kernels._onednn_conv",
      sources=[str((KERNELS / "onednn_conv.cc").relative_to(HERE))],
      include_dirs=[str(KERNELS / "third_party"), str(include)],
      language="c++",
      extra_compile_args=["-std=c++17", "-O2", "-g0", "-fopenmp", "-Wno-return-type"],
      # By full path: the extension then needs "libdnnl.so.3" (its soname), which
      # alexnet_jax.kernels loads from the venv before loading the extension.
      extra_link_args=[str(lib), "-fopenmp"],
      optional=True,  # a failed compile is a warning; the package installs without it
  )]


setup(ext_modules=_extensions())
