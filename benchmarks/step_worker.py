r"""One benchmark point in a fresh process: compile time, step speed, peak memory.

A fresh process per point because (a) the fake CPU device count is fixed when jax
starts, and (b) ru_maxrss is a lifetime peak that can't be reset. Prints one JSON line.

  python -m benchmarks.step_worker --batch=128 --dtype=float32 [--devices=2 --data=1
      --model=2] [--steps=3] [--eval] [--set=lrn_impl=cumsum ...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--devices", type=int, default=0,
                 help="fake CPU devices (XLA_FLAGS); 0 = leave the platform alone")
  p.add_argument("--data", type=int, default=1)
  p.add_argument("--model", type=int, default=1)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--microbatch", type=int, default=0, help="config.microbatch_size")
  p.add_argument("--eval", action="store_true", help="time the ten-crop eval step instead")
  p.add_argument("--set", action="append", default=[],
                 help="config.model field=value (python literal), repeatable")
  args = p.parse_args(argv)
  if args.devices:
    # Must precede the first jax import: the CPU client reads it once.
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={args.devices}").strip()

  import ast

  import jax

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks import common

  fields = {}
  for item in args.set:
    k, v = item.split("=", 1)
    try:
      fields[k] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      fields[k] = v
  config = common.config_for(args.batch, args.dtype, data=args.data, model=args.model,
                             microbatch=args.microbatch, **fields)
  out = dict(batch=args.batch, microbatch=args.microbatch, dtype=args.dtype,
             devices=len(jax.devices()), platform=jax.devices()[0].platform, data=args.data,
             model=args.model, jax=jax.__version__, fields=fields)
  if args.eval:
    ev = common.OurEvalStep(config)
    step_s = ev.run(args.steps)
    out.update(kind="eval", compile_s=ev.compile_s, step_s=step_s,
               images_per_s=common.images_per_s(args.batch, step_s))
  else:
    st = common.OurTrainStep(config)
    step_s = st.run(args.steps)
    out.update(kind="train", compile_s=st.compile_s, warmup_s=st.warmup_s, step_s=step_s,
               images_per_s=common.images_per_s(args.batch, step_s),
               flops_per_image=st.flops_per_image(), xla_flops=st.flops, loss=st.loss)
  out["max_rss_mb"] = common.max_rss_mb()
  out.update({f"device_{k}": v for k, v in common._bytes_in_use().items()})
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
