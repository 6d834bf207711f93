"""oneDNN's CPU convolutions inside jitted code, through XLA's FFI (optional extension).

`onednn_conv.cc` (built by `pip install -e .` into `_onednn_conv*.so` when a C++
compiler and the oneDNN wheels are there; see setup.py) holds three XLA FFI handlers:
convolution forward, backward-data and backward-weights, NHWC activations, HWIO
kernels, float32 or bfloat16 (float32 accumulation). `conv` wraps them in a
`jax.custom_vjp`; `available()` says whether they can be used here and, if not,
`unavailable_reason()` says why (one line).

Threads: oneDNN (OpenMP) runs each convolution on a team of `threads()` threads (all
the cores this process may use, or ALEXNET_ONEDNN_THREADS), one convolution at a time,
from the XLA thread that reached the call; its idle OpenMP threads sleep instead of
spinning (OMP_WAIT_POLICY=PASSIVE unless set), so between convolutions XLA's own pool
has the cores to itself.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import os
import sys

import jax
import numpy as np

EXTENSION = "alexnet_jax.kernels._onednn_conv"
TARGETS = {"forward": "alexnet_onednn_conv_forward",
           "backward_data": "alexnet_onednn_conv_backward_data",
           "backward_weights": "alexnet_onednn_conv_backward_weights"}
_SYMBOLS = {"forward": "AlexnetOnednnConvForward",
            "backward_data": "AlexnetOnednnConvBackwardData",
            "backward_weights": "AlexnetOnednnConvBackwardWeights"}


class Unavailable(RuntimeError):
  pass


def threads() -> int:
  """oneDNN's OpenMP team size: ALEXNET_ONEDNN_THREADS, else every core we may use."""
  env = os.environ.get("ALEXNET_ONEDNN_THREADS")
  if env:
    return max(1, int(env))
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def _libdnnl_candidates() -> list[str]:
  """libdnnl.so.3 from the onednn-cpu-gomp wheel (installed under the environment's
  prefix: <prefix>/lib), then the system's."""
  found = []
  try:
    for f in importlib.metadata.distribution("onednn-cpu-gomp").files or ():
      if f.name == "libdnnl.so.3":
        found.append(str(f.locate()))
  except importlib.metadata.PackageNotFoundError:
    pass
  found.append(os.path.join(sys.prefix, "lib", "libdnnl.so.3"))
  return [p for p in found if os.path.exists(p)] + ["libdnnl.so.3"]


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
  """(the extension, "") or (None, why it cannot be used)."""
  if not sys.platform.startswith("linux"):
    return None, f"the oneDNN extension is built for Linux only (this is {sys.platform})"
  spec = importlib.util.find_spec(EXTENSION)
  if spec is None or not spec.origin:
    return None, ("the oneDNN extension was not built (`pip install -e .` needs a C++ "
                  "compiler and the onednn-*-cpu-gomp wheels of requirements.txt)")
  # Before libgomp starts (if no one has started it yet): idle OpenMP threads sleep at
  # once instead of spinning after each convolution (GOMP_SPINCOUNT: 300,000 spins by
  # default), which would take a core from XLA's pool while it runs the ops in between.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  errors = []
  for path in _libdnnl_candidates():
    try:
      # The extension links libdnnl.so.3 by name; loaded first (global), it is found.
      ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
      break
    except OSError as e:
      errors.append(str(e))
  else:
    return None, f"oneDNN's libdnnl.so.3 could not be loaded ({errors[-1]})"
  try:
    lib = ctypes.CDLL(spec.origin)
  except OSError as e:
    return None, f"the oneDNN extension could not be loaded ({e})"
  for key, symbol in _SYMBOLS.items():
    jax.ffi.register_ffi_target(TARGETS[key], jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform="cpu")
  lib.AlexnetOnednnSetThreads(threads())
  return lib, ""


def available() -> bool:
  return _load()[0] is not None


def unavailable_reason() -> str:
  return _load()[1]


def version() -> str:
  lib = _load()[0]
  if lib is None:
    raise Unavailable(unavailable_reason())
  v = lib.AlexnetOnednnVersion()
  return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def cache_size() -> int:
  """Primitives built so far (one per direction, dtype and geometry)."""
  lib = _load()[0]
  return 0 if lib is None else lib.AlexnetOnednnCacheSize()


def _call(direction: str, out: jax.ShapeDtypeStruct, a: jax.Array, b: jax.Array,
          stride: int, padding: tuple[int, int]) -> jax.Array:
  if not available():
    raise Unavailable(unavailable_reason())
  # vmap (not used by the model) runs the calls one after another.
  y = jax.ffi.ffi_call(TARGETS[direction], out, vmap_method="sequential")(
      a, b, stride=np.int64(stride), pad_lo=np.int64(padding[0]),
      pad_hi=np.int64(padding[1]))
  # Under shard_map the result varies over the mesh axes its operands vary over (both
  # have the same ones: see `conv`); ffi_call's result type does not say so by itself.
  return _vary_to(y, _vma(a) | _vma(b))


def _vma(x: jax.Array) -> frozenset:
  """The shard_map mesh axes `x` varies over (empty outside shard_map)."""
  aval = jax.typeof(x)
  vma = getattr(aval, "vma", None)  # the name in older JAX
  if vma is None:
    vma = aval.mat.varying
  return frozenset(vma)


def _vary_to(x: jax.Array, axes) -> jax.Array:
  missing = tuple(sorted(set(axes) - _vma(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _out_size(size: int, k: int, stride: int, padding: tuple[int, int]) -> int:
  return (size + padding[0] + padding[1] - k) // stride + 1


def conv(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int]) -> jax.Array:
  """lax.conv_general_dilated(x, kernel, (stride, stride), (padding, padding), NHWC/HWIO),
  by oneDNN: x [B, H, W, C], kernel [kh, kw, C, O] of one dtype (float32 or bfloat16)."""
  # Inside shard_map: both operands made to vary over the same mesh axes here, outside
  # the custom_vjp, so autodiff transposes that (a psum of the cotangent) as for any
  # primitive, and the custom rule sees, and returns, one type.
  axes = _vma(x) | _vma(kernel)
  return _conv(_vary_to(x, axes), _vary_to(kernel, axes), stride, tuple(padding))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int]) -> jax.Array:
  b, h, w, _ = x.shape
  kh, kw, _, o = kernel.shape
  if x.dtype != kernel.dtype:
    raise TypeError(f"oneDNN conv: x is {x.dtype}, kernel {kernel.dtype}")
  out = jax.ShapeDtypeStruct(
      (b, _out_size(h, kh, stride, padding), _out_size(w, kw, stride, padding), o), x.dtype)
  return _call("forward", out, x, kernel, stride, padding)


def _conv_fwd(x, kernel, stride, padding):
  return _conv(x, kernel, stride, padding), (x, kernel)


def _conv_bwd(stride, padding, res, g):
  x, kernel = res
  g = g.astype(x.dtype)
  dx = _call("backward_data", jax.ShapeDtypeStruct(x.shape, x.dtype), g, kernel, stride,
             padding)
  dk = _call("backward_weights", jax.ShapeDtypeStruct(kernel.shape, kernel.dtype), x, g,
             stride, padding)
  return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)
