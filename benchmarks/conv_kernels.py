r"""XLA's stride-1 convolutions against per-tap matmul reformulations, layer by layer.

For conv2-5 (one tower's shapes, NHWC, batch --batch) times, in one process:
  xla_fwd / xla_dx / xla_dw   XLA's forward conv, input gradient and kernel gradient
  tap_dw                      the kernel gradient as one matmul per kernel tap, contracting
                              over (batch, height, width): for tap (i, j),
                              xpad[:, i:i+H, j:j+W].reshape(-1, C).T @ g.reshape(-1, O)
  tap_fwd                     the forward conv as the sum over taps of slice @ kernel[i, j]
and the same in bfloat16 (for tap_*: bf16 operands, float32 accumulation through
`preferred_element_type`). Prints one JSON line per layer: median ms of --reps calls,
candidates interleaved round by round, and the kernel gradients' max relative difference
to XLA's. With --step, instead: the whole train step (the paper's config, batch
--batch, --microbatch) as it is against the same step with tap_dw as conv2-5's kernel
gradient (a custom VJP patched into alexnet_jax.model.conv), interleaved rounds.

  python -m benchmarks.conv_kernels [--batch=32] [--reps=6]
  python -m benchmarks.conv_kernels --step --batch=128 --microbatch=32 [--reps=4]

Results and what was concluded: BENCHMARKS.md, "What was tried and not kept".
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

# name: (side, kernel, input channels, output channels) of one tower.
LAYERS = {"conv2": (27, 5, 48, 128), "conv3": (13, 3, 256, 192),
          "conv4": (13, 3, 192, 192), "conv5": (13, 3, 192, 128)}


def xla_conv(x, k, pad):
  return jax.lax.conv_general_dilated(x, k, (1, 1), ((pad, pad), (pad, pad)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _slices(x, kh, kw, h, w, pad):
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  return [xp[:, i:i + h, j:j + w].reshape(-1, x.shape[-1]) for i in range(kh) for j in range(kw)]


def tap_dw(x, g, kshape, pad, acc=None):
  kh, kw, cin, cout = kshape
  g2 = g.reshape(-1, cout)
  taps = [jnp.matmul(xs.T, g2, preferred_element_type=acc)
          for xs in _slices(x, kh, kw, g.shape[1], g.shape[2], pad)]
  return jnp.stack(taps).reshape(kh, kw, cin, cout)


def tap_fwd(x, k, pad, acc=None):
  kh, kw, _, cout = k.shape
  b, h, w, _ = x.shape
  y = sum(jnp.matmul(xs, k[t // kw, t % kw], preferred_element_type=acc)
          for t, xs in enumerate(_slices(x, kh, kw, h, w, pad)))
  return y.reshape(b, h, w, cout)


def candidates(pad, kshape):
  bf = jnp.bfloat16

  def vjp_x(x, k, g, dtype=jnp.float32):
    x, k, g = (a.astype(dtype) for a in (x, k, g))
    return jax.vjp(lambda x: xla_conv(x, k, pad), x)[1](g)[0]

  def vjp_k(x, k, g, dtype=jnp.float32):
    x, k, g = (a.astype(dtype) for a in (x, k, g))
    return jax.vjp(lambda k: xla_conv(x, k, pad), k)[1](g)[0]

  return {
      "xla_fwd": lambda x, k, g: xla_conv(x, k, pad),
      "xla_dx": vjp_x,
      "xla_dw": vjp_k,
      "tap_dw": lambda x, k, g: tap_dw(x, g, kshape, pad),
      "tap_fwd": lambda x, k, g: tap_fwd(x, k, pad),
      "xla_fwd_bf16": lambda x, k, g: xla_conv(x.astype(bf), k.astype(bf), pad),
      "xla_dw_bf16": functools.partial(vjp_k, dtype=bf),
      "tap_dw_bf16": lambda x, k, g: tap_dw(x.astype(bf), g.astype(bf), kshape, pad, jnp.float32),
      "tap_fwd_bf16": lambda x, k, g: tap_fwd(x.astype(bf), k.astype(bf), pad, jnp.float32),
  }


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _tap_conv(x, k, pad):
  return xla_conv(x, k, pad)


def _tap_conv_fwd(x, k, pad):
  return xla_conv(x, k, pad), (x, k)


def _tap_conv_bwd(pad, res, g):
  x, k = res
  dx = jax.vjp(lambda x: xla_conv(x, k, pad), x)[1](g)[0]
  return dx, tap_dw(x, g, k.shape, pad).astype(k.dtype)


_tap_conv.defvjp(_tap_conv_fwd, _tap_conv_bwd)


def step_ab(batch: int, microbatch: int, reps: int, steps_per_rep: int = 3) -> dict:
  """The train step as is (A) vs with per-tap kernel gradients in conv2-5 (B)."""
  from alexnet_jax import model

  from benchmarks import common

  as_is = model.conv

  def tap_conv(x, kernel, bias, stride, padding):
    if stride == 1:
      return _tap_conv(x, kernel, padding[0]) + bias
    return as_is(x, kernel, bias, stride, padding)

  built = {}
  for name, fn in (("xla", as_is), ("tap_dw", tap_conv)):
    model.conv = fn  # read when the step is traced, i.e. in OurTrainStep's constructor
    try:
      built[name] = common.OurTrainStep(common.config_for(batch, "float32",
                                                          microbatch=microbatch))
    finally:
      model.conv = as_is
  times = {n: [] for n in built}
  for r in range(reps):
    for n in (list(built) if r % 2 == 0 else list(built)[::-1]):
      times[n] += built[n].run(steps_per_rep)
  med = {n: float(np.median(t)) for n, t in times.items()}
  return {"batch": batch, "microbatch": microbatch, "median_step_s": med,
          "images_per_s": {n: batch / t for n, t in med.items()},
          "tap_dw_speedup": med["xla"] / med["tap_dw"],
          "loss": {n: st.loss for n, st in built.items()}}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--reps", type=int, default=6)
  p.add_argument("--step", action="store_true", help="A/B of the whole train step")
  p.add_argument("--microbatch", type=int, default=0)
  args = p.parse_args(argv)
  if args.step:
    print(json.dumps(step_ab(args.batch, args.microbatch, args.reps)), flush=True)
    return
  rng = np.random.default_rng(0)
  for name, (side, ksize, cin, cout) in LAYERS.items():
    pad, kshape = ksize // 2, (ksize, ksize, cin, cout)
    x = jnp.asarray(rng.standard_normal((args.batch, side, side, cin)), jnp.float32)
    k = jnp.asarray(rng.standard_normal(kshape) * 0.05, jnp.float32)
    g = jnp.asarray(rng.standard_normal((args.batch, side, side, cout)), jnp.float32)
    fns = {n: jax.jit(f) for n, f in candidates(pad, kshape).items()}
    outs = {n: f(x, k, g).block_until_ready() for n, f in fns.items()}  # compile, warm up
    times = {n: [] for n in fns}
    for _ in range(args.reps):  # interleaved: load drift hits every candidate alike
      for n, f in fns.items():
        t = time.perf_counter()
        f(x, k, g).block_until_ready()
        times[n].append(time.perf_counter() - t)
    ref = outs["xla_dw"]
    scale = float(jnp.max(jnp.abs(ref)))
    diff = {n: float(jnp.max(jnp.abs(outs[n].astype(jnp.float32) - ref))) / scale
            for n in ("tap_dw", "xla_dw_bf16", "tap_dw_bf16")}
    print(json.dumps({"layer": name, "batch": args.batch,
                      "ms": {n: round(1e3 * float(np.median(t)), 1) for n, t in times.items()},
                      "dw_rel_diff_vs_xla_f32": diff}), flush=True)


if __name__ == "__main__":
  main()
