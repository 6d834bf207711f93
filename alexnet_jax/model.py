"""The AlexNet of Krizhevsky, Sutskever & Hinton (2012), written once per tower.

In 2012 every layer's kernels were split between two GPUs ("towers") that
exchanged activations only before conv3, fc6, fc7 and fc8. Here every
parameter carries a leading tower axis, and the forward pass loops over the
towers that are local to the device. The exchanges are `all_gather`s over the
mesh axis named `tower_axis`; with `tower_axis=None` all towers are local and an
exchange is a plain concatenation. So the same code runs with both towers on
one device or one tower per device under `jax.shard_map`, and each tower's
parameters can live only on its own device.

Towers on one device run as separate convolutions, never as one grouped
convolution (nor `vmap` over the kernel, which lowers to one): XLA's CPU
grouped convolution is 4-5x slower (see ../shared/docs/cpu-notes.md).

Shapes at the boundary:
  images: float [B, S, S, 3], S = config.input_size, mean-subtracted 0-255 scale.
  params: {layer: {"kernel": [T, kh, kw, cin, cout/T] or [T, din, dout/T],
                   "bias": [T, cout/T]}} with T towers (T/m of them under a
          shard_map whose tower axis has m devices).
  logits: float32 [B, num_classes].
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from alexnet_jax import kernels

CONV_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5")
FC_LAYERS = ("fc6", "fc7", "fc8")
LAYERS = CONV_LAYERS + FC_LAYERS
POOLED_LAYERS = ("conv1", "conv2", "conv5")  # max-pooling follows these
DROPOUT_LAYERS = ("fc6", "fc7")
ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

Params = dict[str, dict[str, jax.Array]]


# ------------------------------------------------------------------ geometry

def conv_padding(cfg: ml_collections.ConfigDict, index: int) -> tuple[int, int]:
  """(before, after) padding of conv layer `index`; conv2-5 keep the size."""
  if index == 0:
    return tuple(cfg.conv1_padding)
  half = cfg.conv_kernel_size[index] // 2
  return (half, half)


def spatial_sizes(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """Side of each conv layer's output (before pooling), and of the pool5 output."""
  sizes = {}
  side = cfg.input_size
  for i, name in enumerate(CONV_LAYERS):
    before, after = conv_padding(cfg, i)
    k, s = cfg.conv_kernel_size[i], cfg.conv_stride[i]
    side = (side + before + after - k) // s + 1
    sizes[name] = side
    if name in POOLED_LAYERS:
      side = (side - cfg.pool_window) // cfg.pool_stride + 1
  sizes["pool5"] = side
  return sizes


# ------------------------------------------------------------------ the layers

def _pow_neg(d: jax.Array, beta: float) -> jax.Array:
  """d ** -beta; the paper's beta = 0.75 as rsqrt(d) * sqrt(rsqrt(d)).

  XLA CPU lowers a general power to exp(log(.)), about 3x slower than the
  rsqrt/sqrt pair in LRN's forward pass (BENCHMARKS.md); equal within 4e-7 relative.
  """
  if beta == 0.75:
    r = jax.lax.rsqrt(d)
    return r * jnp.sqrt(r)
  if beta == 0.5:
    return jax.lax.rsqrt(d)
  return d ** -beta


def lrn(x: jax.Array, *, k: float, n: int, alpha: float, beta: float,
        alpha_over_n: bool) -> jax.Array:
  """Local response normalisation across channels (the paper's section 3.3).

  b_i = a_i / (k + alpha' * sum_{|j-i| <= n//2} a_j^2)^beta over the last axis,
  with alpha' = alpha / n in the 2012 code's form. The window sum is a banded
  matmul: on XLA CPU that is faster than reduce_window over channels.
  """
  channels = x.shape[-1]
  idx = np.arange(channels)
  band = (np.abs(idx[:, None] - idx[None, :]) <= n // 2).astype(np.float32)
  scale = alpha / n if alpha_over_n else alpha
  x32 = x.astype(jnp.float32)
  window_sum = jnp.einsum("...c,cd->...d", x32 * x32, band)
  return (x32 * _pow_neg(k + scale * window_sum, beta)).astype(x.dtype)


def spatial_norm(x: jax.Array, *, size: int, k: float, alpha: float, beta: float,
                 alpha_over_size: bool) -> jax.Array:
  """The 2012 code's "cnorm2": per-map normalisation over a size x size window.

  b = a / (k + alpha' * sum_{window} a^2)^beta, the window clipped at borders
  (zero padding), alpha' = alpha / size^2 in the 2012 code.
  """
  scale = alpha / (size * size) if alpha_over_size else alpha
  x32 = x.astype(jnp.float32)
  lo, hi = (size - 1) // 2, size // 2
  window_sum = jax.lax.reduce_window(
      x32 * x32, 0.0, jax.lax.add, (1, size, size, 1), (1, 1, 1, 1),
      ((0, 0), (lo, hi), (lo, hi), (0, 0)))
  return (x32 * _pow_neg(k + scale * window_sum, beta)).astype(x.dtype)


def _pool_taps(x: jax.Array, window: int, stride: int) -> list[jax.Array]:
  """The window*window strided views x[:, i::stride, j::stride] (row-major order)."""
  oh = (x.shape[1] - window) // stride + 1
  ow = (x.shape[2] - window) // stride + 1
  return [jax.lax.slice(x, (0, i, j, 0),
                        (x.shape[0], i + stride * (oh - 1) + 1, j + stride * (ow - 1) + 1,
                         x.shape[3]), (1, stride, stride, 1))
          for i in range(window) for j in range(window)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """Max pooling (VALID) as a max over strided views.

  Same values and gradient as reduce_window(max), whose XLA CPU gradient
  (select_and_scatter) is ~10x slower than this (BENCHMARKS.md). The gradient of
  each window goes to its first maximum in row-major order, as select_and_scatter
  does (jnp.maximum's own gradient would split ties, which are common after ReLU).
  """
  return functools.reduce(jnp.maximum, _pool_taps(x, window, stride))


def _max_pool_fwd(x, window, stride):
  y = max_pool(x, window, stride)
  return y, (x, y)


def _max_pool_bwd(window, stride, res, g):
  x, y = res
  free = jnp.ones(y.shape, bool)  # windows whose maximum has not been claimed yet
  dx = jnp.zeros(x.shape, g.dtype)
  zero = jnp.zeros((), g.dtype)
  for t, tap in enumerate(_pool_taps(x, window, stride)):
    i, j = divmod(t, window)
    hit = free & (tap == y)
    free = free & ~hit
    # Put this tap's share back at rows i, i+stride, ... (interior padding).
    cfg = [(0, 0, 0),
           (i, x.shape[1] - i - stride * (y.shape[1] - 1) - 1, stride - 1),
           (j, x.shape[2] - j - stride * (y.shape[2] - 1) - 1, stride - 1),
           (0, 0, 0)]
    dx = dx + jax.lax.pad(jnp.where(hit, g, zero), zero, cfg)
  return (dx,)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _xla_conv(x: jax.Array, kernel: jax.Array, stride: int,
              padding: tuple[int, int]) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), (padding, padding),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _space_to_depth_patches(x: jax.Array, kh: int, kw: int, stride: int,
                            padding: tuple[int, int]) -> jax.Array:
  """im2col of a strided conv: [B, OH, OW, qh*qw*stride*stride*C], q = ceil(k/stride).

  Blocks of stride x stride pixels become channels first (one reshape/transpose), so
  the patches are qh*qw slices of contiguous channel blocks rather than kh*kw slices
  of C=3 channels: ~2x faster to build on XLA CPU. Patch column
  ((qi*qw + qj)*stride + ri)*stride + rj)*C + c holds kernel tap
  (qi*stride + ri, qj*stride + rj, c); the kernel gradient's taps past kh, kw are
  computed and then dropped.
  """
  b, h, w, c = x.shape
  oh = (h + sum(padding) - kh) // stride + 1
  ow = (w + sum(padding) - kw) // stride + 1
  qh, qw = -(-kh // stride), -(-kw // stride)
  hp, wp = (oh - 1 + qh) * stride, (ow - 1 + qw) * stride
  # Rows past the padded input that the windows never reach are cropped, missing
  # ones zero-filled: either way they meet only the kernel's zero padding.
  x = jnp.pad(x, ((0, 0), (padding[0], max(0, hp - h - padding[0])),
                  (padding[0], max(0, wp - w - padding[0])), (0, 0)))[:, :hp, :wp]
  x = x.reshape(b, hp // stride, stride, wp // stride, stride, c)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp // stride, wp // stride, stride * stride * c)
  return jnp.concatenate([x[:, i:i + oh, j:j + ow] for i in range(qh) for j in range(qw)],
                         axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _strided_conv(x: jax.Array, kernel: jax.Array, stride: int,
                  padding: tuple[int, int]) -> jax.Array:
  """XLA's conv, but with the kernel gradient as im2col + one matmul.

  XLA CPU's kernel-gradient convolution for conv1 (11x11, stride 4, 3 input
  channels) is its slowest op: ~5x the forward conv (BENCHMARKS.md). The patches
  are built only in the backward pass (both towers share them: same input, so XLA
  computes them once), so the forward pass and evaluation keep XLA's fast conv.
  """
  return _xla_conv(x, kernel, stride, padding)


def _strided_conv_fwd(x, kernel, stride, padding):
  return _xla_conv(x, kernel, stride, padding), (x, kernel)


def _strided_conv_bwd(stride, padding, res, g):
  x, kernel = res
  kh, kw, cin, cout = kernel.shape
  patches = _space_to_depth_patches(x, kh, kw, stride, padding)
  # g^T @ patches rather than patches^T @ g: contracting over the patches' major
  # dimension lets XLA feed them to the matmul as they are, where the other order
  # made it transpose all of them first (~0.5 GB at batch 32).
  # In the compute dtype, like XLA's own kernel-gradient conv (XLA CPU has no
  # bf16 x bf16 -> f32 kernel for this dot's layout).
  dk = jnp.einsum("bhwo,bhwk->ok", g, patches.astype(g.dtype)).T
  qh, qw = -(-kh // stride), -(-kw // stride)
  dk = dk.reshape(qh, qw, stride, stride, cin, cout).transpose(0, 2, 1, 3, 4, 5)
  dk = dk.reshape(qh * stride, qw * stride, cin, cout)[:kh, :kw].astype(kernel.dtype)
  # The input gradient (unused for conv1, whose input is the image: XLA drops it).
  _, vjp_x = jax.vjp(lambda x: _xla_conv(x, kernel, stride, padding), x)
  return vjp_x(g)[0], dk


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


CONV_IMPLS = ("auto", "xla", "onednn")


@functools.cache
def _auto_conv_impl(backend: str) -> str:
  if backend != "cpu":
    return "xla"  # GPUs: cuDNN through XLA
  if kernels.available():
    return "onednn"
  logging.warning("model.conv_impl=auto: XLA's convolutions, not oneDNN's: %s",
                  kernels.unavailable_reason())
  return "xla"


def resolve_conv_impl(impl: str) -> str:
  """model.conv_impl as used: "auto" is oneDNN's on CPU where the extension is built
  (alexnet_jax/kernels), else XLA's (logged once, with the reason)."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
  return _auto_conv_impl(jax.default_backend()) if impl == "auto" else impl


def conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int,
         padding: tuple[int, int], impl: str = "xla") -> jax.Array:
  """NHWC x HWIO convolution plus bias; impl: "xla" or "onednn" (resolve_conv_impl)."""
  if impl == "onednn":
    # oneDNN's forward, backward-data and backward-weights kernels (PyTorch's on CPU),
    # called from the jitted step through XLA's FFI.
    return kernels.conv(x, kernel, stride, tuple(padding)) + bias
  # The im2col kernel gradient answers a weakness of XLA's CPU convolutions;
  # GPUs (cuDNN) keep XLA's own.
  if stride > 1 and jax.default_backend() == "cpu":
    y = _strided_conv(x, kernel, stride, tuple(padding))
  else:
    y = _xla_conv(x, kernel, stride, padding)
  return y + bias


# ------------------------------------------------------------------ the model

@dataclasses.dataclass(frozen=True)
class AlexNet:
  """The network described by `config.model`; pure functions of the params."""

  config: ml_collections.ConfigDict

  @property
  def towers(self) -> int:
    return self.config.towers

  def kernel_shapes(self) -> dict[str, tuple[int, ...]]:
    """Per-tower kernel shape of every layer (without the leading tower axis)."""
    cfg, towers = self.config, self.config.towers
    shapes, cin = {}, 3
    for i, name in enumerate(CONV_LAYERS):
      cout = cfg.conv_features[i]
      # Input channels seen by one tower: all of them where the towers
      # exchange (and for conv1, whose input is the whole image).
      cin_tower = cin if (i == 0 or name in cfg.cross_tower) else cin // towers
      shapes[name] = (cfg.conv_kernel_size[i], cfg.conv_kernel_size[i], cin_tower,
                      cout // towers)
      cin = cout
    din = spatial_sizes(cfg)["pool5"] ** 2 * cin
    outs = tuple(cfg.fc_features) + (cfg.num_classes,)
    for name, dout in zip(FC_LAYERS, outs, strict=True):
      din_tower = din if name in cfg.cross_tower else din // towers
      shapes[name] = (din_tower, dout // towers)
      din = dout
    return shapes

  def init(self, rng: jax.Array) -> Params:
    """Weights ~ N(0, std[layer]), biases = constant[layer]; float32."""
    cfg, params = self.config, {}
    keys = jax.random.split(rng, len(LAYERS))
    for i, (name, shape) in enumerate(self.kernel_shapes().items()):
      std, bias = cfg.init_weight_std[i], cfg.init_bias[i]
      params[name] = {
          "kernel": std * jax.random.normal(keys[i], (self.towers, *shape), jnp.float32),
          "bias": jnp.full((self.towers, shape[-1]), bias, jnp.float32),
      }
    return params

  def apply(self, params: Params, images: jax.Array, *, train: bool,
            rng: jax.Array | None = None, tower_axis: str | None = None,
            capture: bool = False) -> Any:
    """Logits float32 [B, num_classes] (and, with `capture`, every layer's output).

    Args:
      params: the towers held by this device (all of them without `tower_axis`).
      images: [B, S, S, 3].
      train: apply dropout (needs `rng`).
      rng: a typed key, or a [B] batch of keys (one per example: then the
        dropout mask of an example does not depend on how the batch is split).
      tower_axis: mesh axis over which the towers are spread, inside shard_map.
      capture: also return {layer: [T_local, B, ...]} of pre-pooling outputs.
    """
    cfg = self.config
    dtype = DTYPES[cfg.compute_dtype]
    act = ACTIVATIONS[cfg.activation]
    local_towers = params["conv1"]["kernel"].shape[0]
    first_tower = (jax.lax.axis_index(tower_axis) * local_towers
                   if tower_axis is not None else 0)

    def exchange(xs: Sequence[jax.Array]) -> jax.Array:
      """Every tower's activations, concatenated on the channel axis in tower order."""
      x = jnp.concatenate(xs, axis=-1) if len(xs) > 1 else xs[0]
      if tower_axis is not None:
        x = jax.lax.all_gather(x, tower_axis, axis=x.ndim - 1, tiled=True)
      return x

    def normalise(xs: list[jax.Array]) -> list[jax.Array]:
      opts = {k: cfg.lrn[k] for k in ("k", "n", "alpha", "beta", "alpha_over_n")}
      if cfg.lrn.per_tower:
        return [lrn(x, **opts) for x in xs]
      # One window over every tower's channels: an extra exchange the paper's
      # network did not have, offered to measure what per-tower LRN changes.
      width = xs[0].shape[-1]
      full = lrn(exchange(xs), **opts)
      return [jax.lax.dynamic_slice_in_dim(full, (first_tower + t) * width, width, axis=-1)
              for t in range(local_towers)]

    if rng is not None and rng.ndim == 0:
      rng = jax.random.split(rng, images.shape[0])

    def dropout(xs: list[jax.Array], layer: int) -> list[jax.Array]:
      rate = cfg.dropout_rate
      if rate == 0.0:
        return xs
      if not train:
        return [x * (1.0 - rate) for x in xs] if cfg.dropout_style == "scale_at_test" else xs
      out = []
      for t, x in enumerate(xs):
        def mask(key, t=t, shape=x.shape[1:]):
          key = jax.random.fold_in(jax.random.fold_in(key, layer), first_tower + t)
          return jax.random.bernoulli(key, 1.0 - rate, shape)
        keep = jax.vmap(mask)(rng)
        scale = 1.0 / (1.0 - rate) if cfg.dropout_style == "inverted" else 1.0
        out.append(jnp.where(keep, x * scale, 0.0).astype(x.dtype))
      return out

    conv_impl = resolve_conv_impl(cfg.get("conv_impl", "auto"))
    captured = {}
    x = images.astype(dtype)
    xs = [x] * local_towers
    for i, name in enumerate(CONV_LAYERS):
      if name in cfg.cross_tower:
        xs = [exchange(xs)] * local_towers
      p = params[name]
      xs = [conv(x, p["kernel"][t].astype(dtype), p["bias"][t].astype(dtype),
                 cfg.conv_stride[i], conv_padding(cfg, i), conv_impl)
          for t, x in enumerate(xs)]
      if capture:
        captured[name] = jnp.stack(xs)
      use_lrn = cfg.lrn.enabled and name in cfg.lrn.layers
      if use_lrn and name == "conv1" and cfg.lrn.before_relu_in_conv1:
        # 2012 code: conv1 -> LRN -> pool -> ReLU (pool and ReLU commute).
        xs = [act(x) for x in normalise(xs)]
      else:
        xs = [act(x) for x in xs]
        if use_lrn:
          xs = normalise(xs)
      if name == "conv2" and cfg.cnorm2.enabled:
        opts = {k: cfg.cnorm2[k] for k in ("size", "k", "alpha", "beta", "alpha_over_size")}
        xs = [spatial_norm(x, **opts) for x in xs]
      if name in POOLED_LAYERS:
        xs = [max_pool(x, cfg.pool_window, cfg.pool_stride) for x in xs]

    for i, name in enumerate(FC_LAYERS):
      if name in cfg.cross_tower:
        # At fc6 the exchange gathers [B, h, w, C] maps: flatten in (h, w, c) order.
        xs = [exchange(xs)] * local_towers
      xs = [x.reshape(x.shape[0], -1) for x in xs]
      p = params[name]
      # One matmul batched over the tower axis: `p["kernel"][t]` would copy each
      # tower's slice of the big fc kernels (fc6: 75 MB) every step, forward and
      # backward (BENCHMARKS.md); stacking the small activations instead is cheap.
      ys = jnp.einsum("tbi,tio->tbo", jnp.stack(xs), p["kernel"].astype(dtype))
      xs = list(ys + p["bias"].astype(dtype)[:, None, :])
      if capture:
        captured[name] = jnp.stack(xs)
      if name != "fc8":
        xs = dropout([act(x) for x in xs], layer=len(CONV_LAYERS) + i)
    logits = exchange(xs).astype(jnp.float32)
    return (logits, captured) if capture else logits


# ------------------------------------------------------------------ summary

@dataclasses.dataclass(frozen=True)
class LayerStats:
  name: str
  output_per_tower: tuple[int, ...]  # without the batch axis
  params: int
  neurons: int
  macs: int


def layer_stats(model: AlexNet, params: Params) -> list[LayerStats]:
  """Per-layer counts from the real parameter pytree and traced output shapes."""
  size = model.config.input_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  _, captured = jax.eval_shape(
      lambda p, x: model.apply(p, x, train=False, capture=True), params, images)
  rows = []
  for name in LAYERS:
    out = captured[name].shape  # [T, 1, ...]
    neurons = math.prod(out[2:]) * out[0]
    kernel = params[name]["kernel"].shape  # [T, ..., cin, cout]
    fan_in = math.prod(kernel[1:-1])  # kh*kw*cin or din: MACs per output neuron
    count = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params[name]))
    rows.append(LayerStats(name, tuple(out[2:]), count, neurons, neurons * fan_in))
  return rows


def format_summary(model: AlexNet, params: Params) -> str:
  rows = layer_stats(model, params)
  header = f"{'layer':<7}{'output per tower':>20}{'parameters':>14}{'neurons':>12}{'MACs':>16}"
  lines = [f"AlexNet, {model.towers} tower(s), input {model.config.input_size}x"
           f"{model.config.input_size}x3", header, "-" * len(header)]
  for r in rows:
    shape = " x ".join(map(str, r.output_per_tower))
    lines.append(f"{r.name:<7}{shape:>20}{r.params:>14,}{r.neurons:>12,}{r.macs:>16,}")
  lines.append("-" * len(header))
  lines.append(f"{'total':<7}{'':>20}{sum(r.params for r in rows):>14,}"
               f"{sum(r.neurons for r in rows):>12,}{sum(r.macs for r in rows):>16,}")
  return "\n".join(lines)
