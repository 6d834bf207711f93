r"""Where our train step's time goes: per-layer, per-direction, from a jax.profiler trace.

Traces a few steps, reads the per-op events XLA CPU emits (one per fusion/thunk), and
attributes each op to a layer and a direction with the compiled HLO: forward ops carry
`jvp()` in their op_name, input gradients `transpose(jvp())`; convolution kernel
gradients lose their op_name, so they are matched by their output shape (a permutation
of the layer's kernel shape). Prints a Markdown table and one JSON line (last).

  python -m benchmarks.profile_step [--batch=32] [--dtype=float32] [--steps=2] [--microbatch=0]
      [--conv_impl=auto|xla|onednn]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _shape(text: str) -> tuple[int, ...]:
  m = re.match(r"\w+\[([\d,]*)\]", text)
  return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def layer_shapes(config) -> dict[str, dict[str, tuple[int, ...]]]:
  """Per conv layer (one tower): kernel, input and output shapes of one pass (a micro-batch)."""
  from alexnet_jax import model as model_lib

  cfg, b = config.model, config.microbatch_size or config.batch_size
  kernels = model_lib.AlexNet(cfg).kernel_shapes()
  sides = model_lib.spatial_sizes(cfg)
  out, side_in = {}, cfg.input_size
  for name in model_lib.CONV_LAYERS:
    k = kernels[name]
    out[name] = {"kernel": k, "in": (b, side_in, side_in, k[2]),
                 "out": (b, sides[name], sides[name], k[3])}
    side_in = sides[name]
    if name in model_lib.POOLED_LAYERS:
      side_in = (side_in - cfg.pool_window) // cfg.pool_stride + 1
  return out


def classify(name: str, shape: tuple[int, ...], op_name: str, layers,
             target: str = "") -> tuple[str, str]:
  """(layer or activation shape, what) for one HLO op (target: a custom call's)."""
  kind = op_name.rsplit("/", 1)[-1] if op_name else ""
  direction = "bwd" if "transpose(" in op_name else "fwd"
  if target.startswith("alexnet_onednn_conv_"):  # model.conv_impl=onednn (FFI calls)
    which = target.removeprefix("alexnet_onednn_conv_")
    want, what = {"forward": ("out", "conv forward"),
                  "backward_data": ("in", "conv input grad (dX)"),
                  "backward_weights": ("kernel", "conv kernel grad (dW)")}[which]
    for layer, s in layers.items():
      if shape == s[want]:
        return layer, f"{what}, oneDNN"
    return "x".join(map(str, shape)), f"{what}, oneDNN"
  for layer, s in layers.items():
    if sorted(shape) == sorted(s["kernel"]) and shape[:2] != s["out"][:2]:
      return layer, "conv kernel grad (dW)"
    if kind == "conv_general_dilated":
      if shape == s["out"] and direction == "fwd":
        return layer, "conv forward"
      if shape == s["in"] and direction == "bwd":
        return layer, "conv input grad (dX)"
  if kind == "dot_general":
    return "fc", f"matmul {direction}"
  if kind in ("concatenate", "slice", "pad", "add_any", "transpose", "copy") or \
      name.startswith(("copy", "transpose")):
    return "-", f"data movement ({kind or name.split('.')[0]}) {direction}"
  if kind in ("mul", "add", "sub", "select_n") and len(shape) <= 3:
    return "-", f"optimizer / elementwise ({kind})"
  return "x".join(map(str, shape)) or "-", f"{kind or name.split('.')[0]} {direction}"


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--microbatch", type=int, default=0, help="config.microbatch_size")
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--conv_impl", default="auto", help="model.conv_impl: auto, xla or onednn")
  args = p.parse_args(argv)

  import jax

  from benchmarks import common

  config = common.config_for(args.batch, args.dtype, microbatch=args.microbatch,
                             conv_impl=args.conv_impl)
  step = common.OurTrainStep(config)
  step.run(1)
  trace_dir = tempfile.mkdtemp(prefix="alexnet-profile-")
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  wall = sum(step.run(args.steps)) / args.steps
  jax.profiler.stop_trace()
  files = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))
  with gzip.open(files[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X":
      per_op[e["name"]] += e.get("dur", 0) / 1e3 / args.steps  # ms per step

  ops = {}
  for line in step.compiled.as_text().splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
    if m and m.group(1) in per_op:
      op = re.search(r'op_name="([^"]*)"', line)
      target = re.search(r'custom_call_target="([^"]*)"', line)
      ops[m.group(1)] = (_shape(m.group(2)), op.group(1) if op else "",
                         target.group(1) if target else "")
  layers = layer_shapes(config)
  groups = collections.Counter()
  rows = []
  for name, ms in per_op.items():
    if name not in ops:
      continue
    shape, op_name, target = ops[name]
    key = classify(name, shape, op_name, layers, target)
    groups[key] += ms
    rows.append((ms, name, shape, op_name.split("jit(train_step)/")[-1][-60:], key))
  total = sum(groups.values())
  micro = f" in passes of {args.microbatch}" if args.microbatch else ""
  print(f"\nOur train step, batch {args.batch}{micro}, {args.dtype}, 1 device: "
        f"{wall * 1e3:.0f} ms "
        f"per step wall-clock; {total:.0f} ms in {len(rows)} XLA ops (both towers)\n")
  print("| layer | what | ms/step | share |")
  print("|---|---|---|---|")
  for (layer, what), ms in groups.most_common():
    if ms >= 0.005 * total:
      print(f"| {layer} | {what} | {ms:.0f} | {100 * ms / total:.1f}% |")
  print(f"\nTop {args.top} ops:\n")
  print("| ms/step | op | output shape | op_name |")
  print("|---|---|---|---|")
  for ms, name, shape, op_name, _ in sorted(rows, reverse=True)[:args.top]:
    print(f"| {ms:.0f} | {name} | {'x'.join(map(str, shape))} | {op_name} |")
  summary = {"batch": args.batch, "dtype": args.dtype, "wall_ms": wall * 1e3,
             "ops_ms": total, "groups": [[k[0], k[1], v] for k, v in groups.most_common()]}
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  main()
