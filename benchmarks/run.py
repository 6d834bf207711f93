r"""The speed benchmark suite: our JAX AlexNet side by side with the PyTorch peer.

  .venv/bin/python -m benchmarks.run            # full suite, < 20 min on 2 cores
  .venv/bin/python -m benchmarks.run --quick    # ~3-5 min: batch 32, one round each

Sections (each one's results are written as soon as it ends, so partial runs survive):
  peak      jitted matmul GFLOP/s: float32, and bfloat16 in / float32 accumulate
  train     train step images/s, ours vs PyTorch (tuned malloc and stock glibc),
            interleaved in rounds (ours, torch-tuned, torch-glibc, ours, ...), batch 32
            and 128, float32 and bfloat16 (PyTorch: autocast)
  eval      ten-crop evaluation images/s, ours vs PyTorch, interleaved
  memory    compile time and peak RSS of our step in a fresh process per config
  pipeline  benchmarks/input_pipeline.py (ours vs plain tf.data), run as is
  datawait  fraction of step time spent waiting for data in a real `main.py` run (demo)
  scaling   the step on 1, 2, 4, 8 fake CPU devices; model axis 1 vs 2
  profile   per-layer time of our step (benchmarks/profile_step.py)

Results: benchmarks/results/<name>.json and .md; the Markdown is also spliced into
BENCHMARKS.md between the `suite results` markers (--no-md to skip).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import common  # noqa: E402

REPO = common.REPO
BEGIN, END = "<!-- suite results: begin -->", "<!-- suite results: end -->"


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs):
  s = sorted(xs)
  n = len(s)
  return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


class Suite:
  def __init__(self, args):
    self.args = args
    self.results: dict = {"args": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    self.md: dict[str, str] = {}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    self.json_path = out / f"{args.name}.json"
    self.md_path = out / f"{args.name}.md"
    if args.update and self.json_path.exists():
      # Re-running some sections (--only) keeps the others' results from the last run.
      old = json.loads(self.json_path.read_text())
      self.md = dict(old.get("md", {}))
      self.results.update({k: v for k, v in old.items() if k not in ("args", "started")})
      self.results["updated_sections"] = args.only

  # ------------------------------------------------------------------ output
  def save(self) -> None:
    self.results["md"] = self.md
    self.json_path.write_text(json.dumps(self.results, indent=1, default=str))
    text = self.render()
    self.md_path.write_text(text)
    if self.args.md:
      path = REPO / "BENCHMARKS.md"
      doc = path.read_text() if path.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
      if BEGIN not in doc:
        doc += f"\n{BEGIN}\n{END}\n"
      head, rest = doc.split(BEGIN, 1)
      tail = rest.split(END, 1)[1] if END in rest else ""
      path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")

  def render(self) -> str:
    r = self.results
    env = r.get("env", {})
    lines = [f"Run `{r['args']['name']}` ({'quick' if r['args']['quick'] else 'full'}), "
             f"started {r['started']}; jax {env.get('jax')}, {env.get('cores')} cores, "
             f"torch {env.get('torch', 'n/a')}. Interleaved in one run: compare ratios.", ""]
    order = ["peak", "train", "eval", "memory", "pipeline", "datawait", "scaling", "profile"]
    for key in order:
      if key in self.md:
        lines += [self.md[key], ""]
    return "\n".join(lines)

  def section(self, key: str, fn) -> None:
    if key not in self.args.only:
      return
    log(f"--- {key}")
    t = time.perf_counter()
    try:
      fn()
    except Exception as e:  # noqa: BLE001 - a failing section must not lose the others
      traceback.print_exc()
      self.md[key] = f"### {key}\n\nFAILED: `{type(e).__name__}: {str(e)[:300]}`"
      self.results.setdefault("errors", {})[key] = repr(e)
    self.results.setdefault("section_s", {})[key] = time.perf_counter() - t
    log(f"--- {key} done in {time.perf_counter() - t:.0f}s")
    self.save()

  # ------------------------------------------------------------------ peers
  def start_peers(self) -> None:
    self.peers = {}
    if self.args.no_torch:
      self.torch_note = "PyTorch skipped (--no_torch)."
      return
    try:
      from benchmarks.torch_peer.client import TorchPeer, find_or_create_venv

      python = find_or_create_venv()
      err = open(Path(self.args.out_dir) / f"{self.args.name}.torch.log", "w")  # noqa: SIM115
      for malloc in self.args.malloc:
        self.peers[malloc] = TorchPeer(python, malloc=malloc, stderr=err)
      info = next(iter(self.peers.values())).info()
      self.results["env"]["torch"] = info.get("torch")
      self.results["env"]["torch_info"] = info
      self.torch_note = ""
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      self.torch_note = f"PyTorch peer unavailable: {e}"
      self.peers = {}

  def close_peers(self) -> None:
    for p in getattr(self, "peers", {}).values():
      p.close()

  # ------------------------------------------------------------------ sections
  def env(self) -> None:
    import jax

    self.results["env"] = dict(
        jax=jax.__version__, backend=jax.default_backend(), devices=len(jax.devices()),
        cores=common.cores(), xla_flags=os.environ.get("XLA_FLAGS", ""),
        python=sys.version.split()[0])

  def peak(self) -> None:
    got = common.matmul_peak()
    prev = self.results.get("peak", {})
    self.results["peak"] = {k: max(v, prev.get(k, 0.0)) for k, v in got.items()}
    self.results.setdefault("peak_samples", []).append(got)
    samples = self.results["peak_samples"]
    rows = " / ".join(f"{s['float32']:.0f} and {s['bfloat16']:.0f}" for s in samples)
    self.md["peak"] = (
        "### Matmul peak of this machine (2048^2 jitted matmul, same run)\n\n"
        f"float32: **{self.results['peak']['float32']:.0f} GFLOP/s**; bfloat16 in / float32 "
        f"accumulate: **{self.results['peak']['bfloat16']:.0f} GFLOP/s** (best of the "
        f"samples, fp32 and bf16: {rows}).")

  def train(self) -> None:
    a = self.args
    rows = self.results["train"] = []
    for batch in a.batches:
      for dtype in a.dtypes:
        log(f"train batch {batch} {dtype}")
        # Ours with the whole batch in one pass, and with micro-batches of
        # a.microbatch (config.microbatch_size: same gradient) where that splits it.
        # Per model.conv_impl of --conv_impl (keys "ours[xla]", ... when more than one),
        # all interleaved with the peers round by round.
        variants = {}
        for impl in a.conv_impls:
          variants[f"ours{_tag(a, impl)}"] = (impl, 0)
          if a.microbatch < batch:
            variants[f"ours{_tag(a, impl)}-mb{a.microbatch}"] = (impl, a.microbatch)
        ours = {}
        for key, (impl, micro) in variants.items():
          ours[key] = common.OurTrainStep(common.config_for(batch, dtype, microbatch=micro,
                                                            conv_impl=impl))
        times = {key: [] for key in ours}
        setups = {}
        for name, peer in self.peers.items():
          setups[name] = peer.setup(batch=batch, dtype=dtype, threads=common.cores(),
                                    warmup=1)
          times[f"torch-{name}"] = []
        for r in range(a.rounds):
          for key, step in ours.items():
            times[key] += step.run(a.steps)
          for name, peer in self.peers.items():
            times[f"torch-{name}"] += peer.train(a.steps)["step_s"]
          log(f"  round {r}: " + ", ".join(f"{k} {batch / median(v):.1f}"
                                           for k, v in times.items()))
        mem = {name: peer.peak_memory() for name, peer in self.peers.items()}
        first = next(iter(ours.values()))
        rows.append(dict(batch=batch, dtype=dtype, step_s=times, compile_s=first.compile_s,
                         conv_impls=a.conv_impls,
                         compile_s_all={k: v.compile_s for k, v in ours.items()},
                         microbatch=a.microbatch, flops_per_image_xla=first.flops_per_image(),
                         loss={k: v.loss for k, v in ours.items()},
                         torch_setup=setups, torch_memory=mem))
        del first, ours
        gc.collect()
        self.md["train"] = self._train_md()
        self.save()

  def _train_md(self) -> str:
    peak = self.results.get("peak", {})
    fpi = common.TRAIN_FLOPS_PER_IMAGE
    micro = self.args.microbatch
    out = ["### Train step (images/s; median step, best step in brackets)", "",
           "FLOP/s use 3 x 1.45 GFLOP per image for both implementations: our count of "
           "the two-tower net's 724,406,816 forward multiply-accumulates (2 FLOP each), "
           "times 3 for forward and backward (the paper gives no FLOP count; XLA's cost "
           "analysis of our step counts "
           f"{self.results['train'][0]['flops_per_image_xla'] / 1e9:.2f} GFLOP); the "
           "fraction is of the same-dtype matmul peak above. \"ours, mb\": the same step "
           f"with `--config.microbatch_size={micro}` (the batch in passes of {micro} images, "
           "gradients summed: the same gradient); \"best ours\" is the faster of the two.", "",
           "`conv`: `model.conv_impl` (xla: XLA's convolutions; onednn: oneDNN's through "
           "XLA's FFI, alexnet_jax/kernels; auto: oneDNN's where built).", "",
           f"| batch | dtype | conv | ours | ours, mb {micro} | PyTorch tuned malloc | "
           "PyTorch glibc | best ours / best PyTorch | best ours GFLOP/s (% of peak) | "
           "compile s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for row in self.results["train"]:
      b = row["batch"]
      ips = {k: (b / median(v), b / min(v)) for k, v in row["step_s"].items() if v}
      cell = {k: f"{m:.1f} ({best:.1f})" for k, (m, best) in ips.items()}
      torch_best = max((m for k, (m, _) in ips.items() if k.startswith("torch")),
                       default=None)
      impls = row.get("conv_impls", ["auto"])
      for impl in impls:
        tag = f"[{impl}]" if len(impls) > 1 else ""
        ours_best = max(m for k, (m, _) in ips.items()
                        if k in (f"ours{tag}", f"ours{tag}-mb{micro}"))
        ratio = f"**{ours_best / torch_best:.2f}x**" if torch_best else "n/a"
        gflops = ours_best * fpi / 1e9
        frac = (f" ({100 * gflops / peak[row['dtype']]:.0f}%)" if row["dtype"] in peak
                else "")
        compile_s = row.get("compile_s_all", {}).get(f"ours{tag}", row["compile_s"])
        out.append(f"| {b} | {row['dtype']} | {impl} | {cell[f'ours{tag}']} | "
                   f"{cell.get(f'ours{tag}-mb{micro}', '= ours')} | "
                   f"{cell.get('torch-tuned', 'n/a')} | {cell.get('torch-glibc', 'n/a')} | "
                   f"{ratio} | {gflops:.0f}{frac} | {compile_s:.1f} |")
    if self.torch_note:
      out += ["", self.torch_note]
    return "\n".join(out)

  def eval(self) -> None:
    a = self.args
    batch = a.eval_batch
    log(f"eval ten-crop, batch {batch} images ({batch * 10} crops)")
    ours = {f"ours{_tag(a, impl)}": common.OurEvalStep(
        common.config_for(batch, "float32", conv_impl=impl)) for impl in a.conv_impls}
    times = {key: [] for key in ours}
    for name, peer in self.peers.items():
      peer.setup(batch=batch, dtype="float32", threads=common.cores(), warmup=0)
      times[f"torch-{name}"] = []
    for _ in range(a.eval_rounds):
      for key, step in ours.items():
        times[key] += step.run(a.steps)
      for name, peer in self.peers.items():
        times[f"torch-{name}"] += peer.eval(steps=a.steps, ten_crop=True)["step_s"]
    self.results["eval"] = dict(batch=batch, step_s=times, conv_impls=a.conv_impls,
                                compile_s={k: v.compile_s for k, v in ours.items()})
    del ours
    gc.collect()
    ips = {k: batch / median(v) for k, v in times.items()}
    torch_best = max((v for k, v in ips.items() if k.startswith("torch")), default=None)
    lines = []
    for impl in a.conv_impls:
      key = f"ours{_tag(a, impl)}"
      ratio = f"{ips[key] / torch_best:.2f}x" if torch_best else "n/a"
      lines.append(f"| {impl} | {ips[key]:.1f} | {ips.get('torch-tuned', float('nan')):.1f} | "
                   f"{ips.get('torch-glibc', float('nan')):.1f} | **{ratio}** | "
                   f"{self.results['eval']['compile_s'][key]:.1f} |")
    self.md["eval"] = (
        f"### Evaluation, ten crops (images/s, float32, {batch} images = {batch * 10} crops "
        "per step)\n\n| conv | ours | PyTorch tuned | PyTorch glibc | ours / best PyTorch | "
        "our compile s |\n|---|---|---|---|---|---|\n" + "\n".join(lines))

  def memory(self) -> None:
    rows = []
    for batch in self.args.memory_batches:
      for dtype in self.args.dtypes:
        log(f"fresh process: batch {batch} {dtype}")
        rows.append(common.run_json_subprocess(
            ["-m", "benchmarks.step_worker", f"--batch={batch}", f"--dtype={dtype}",
             "--steps=1"]))
    self.results["memory"] = rows
    torch_mem = {}
    for row in self.results.get("train", []):
      for name, m in row.get("torch_memory", {}).items():
        torch_mem[(row["batch"], row["dtype"], name)] = m
    out = ["### Compile time and peak memory (ours: a fresh process per config)", "",
           "| batch | dtype | our compile s | our first step s | our peak RSS MB | "
           "PyTorch tuned peak RSS MB | PyTorch glibc peak RSS MB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
      tm = {n: torch_mem.get((r["batch"], r["dtype"], n), {}).get("max_rss_mb")
            for n in ("tuned", "glibc")}
      fmt = {n: (f"{v:.0f}" if v else "n/a") for n, v in tm.items()}
      out.append(f"| {r['batch']} | {r['dtype']} | {r['compile_s']:.1f} | "
                 f"{r['warmup_s'][0]:.1f} | {r['max_rss_mb']:.0f} | {fmt['tuned']} | "
                 f"{fmt['glibc']} |")
    out += ["", "PyTorch's figure is `ru_maxrss` of its long-lived worker read after that "
            "config's steps, i.e. the peak over that config and every earlier one (it "
            "can't be reset); the tuned malloc keeps freed memory, so its peak is higher."]
    self.md["memory"] = "\n".join(out)

  def pipeline(self) -> None:
    data = self.args.pipeline_data
    if not os.path.isdir(data):
      self.md["pipeline"] = f"### Input pipeline\n\nskipped: {data} not found."
      return
    try:
      import tensorflow  # noqa: F401
    except ImportError:
      self.md["pipeline"] = "### Input pipeline\n\nskipped: tensorflow is not installed."
      return
    cmd = [sys.executable, "-m", "benchmarks.input_pipeline", f"--data={data}",
           f"--images={self.args.pipeline_images}", f"--rounds={self.args.pipeline_rounds}"]
    log(" ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), timeout=900)
    if proc.returncode != 0:
      raise RuntimeError(f"input_pipeline exited {proc.returncode}: {proc.stderr[-1500:]}")
    table = proc.stdout.strip()
    self.results["pipeline"] = table
    self.md["pipeline"] = ("### Input pipeline (`benchmarks/input_pipeline.py`, as is)\n\n"
                           + table)

  def datawait(self) -> None:
    try:
      import clu  # noqa: F401
      import tensorflow  # noqa: F401
    except ImportError as e:
      self.md["datawait"] = f"### Data wait in a real run\n\nskipped: {e}"
      return
    steps = self.args.datawait_steps
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as workdir:
      cmd = [sys.executable, "main.py", "--config=experiments/demo.py",
             f"--workdir={workdir}", f"--config.num_train_steps={steps}",
             "--config.eval_every_steps=100000", "--config.checkpoint_every_steps=100000"]
      log(" ".join(cmd))
      t = time.perf_counter()
      proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), timeout=900)
      wall = time.perf_counter() - t
    text = proc.stdout + proc.stderr
    found = re.findall(r"step (\d+)/\d+ .*?([\d.]+) img/s\s+data wait (\d+)%", text)
    if proc.returncode != 0 or not found:
      raise RuntimeError(f"main.py exited {proc.returncode}; no 'data wait' lines:\n"
                         f"{text[-1500:]}")
    self.results["datawait"] = [dict(step=int(s), images_per_s=float(i), wait_pct=int(w))
                                for s, i, w in found]
    rows = "\n".join(f"| {s} | {i} | {w}% |" for s, i, w in found)
    self.md["datawait"] = (
        "### Data wait in a real training run\n\n"
        f"`main.py --config=experiments/demo.py --config.num_train_steps={steps}` (the demo "
        f"net, batch 64, real JPEGs through the tf.data pipeline; {wall:.0f}s in all). "
        "`train/data_wait_fraction` per logging window (the first window includes "
        "compilation and the pipeline's warm-up):\n\n"
        "| up to step | images/s | data wait |\n|---|---|---|\n" + rows)

  def scaling(self) -> None:
    batch = self.args.scaling_batch
    points = [(n, n, 1) for n in self.args.devices] + [(2, 1, 2)]
    rows = []
    for devices, data, model in points:
      log(f"scaling: {devices} fake devices, mesh data={data} model={model}")
      rows.append(common.run_json_subprocess(
          ["-m", "benchmarks.step_worker", f"--batch={batch}", "--dtype=float32",
           f"--devices={devices}", f"--data={data}", f"--model={model}",
           f"--steps={self.args.scaling_steps}"]))
    self.results["scaling"] = rows
    base = rows[0]["images_per_s"]
    out = [f"### Scaling on fake CPU devices (global batch {batch}, float32, one fresh "
           "process per point)", "",
           "| devices | mesh (data x model) | images/s | vs 1 device | compile s |",
           "|---|---|---|---|---|"]
    for r in rows:
      out.append(f"| {r['devices']} | {r['data']} x {r['model']} | {r['images_per_s']:.1f} | "
                 f"{r['images_per_s'] / base:.2f} | {r['compile_s']:.1f} |")
    out += ["", "Fake devices (`--xla_force_host_platform_device_count`) all share the same "
            "cores: these rows show the cost of partitioning and collectives (and any "
            "parallelism XLA finds between devices' programs), not a speed-up. Points run "
            "one after another, so load drift between them is not cancelled."]
    self.md["scaling"] = "\n".join(out)

  def profile(self) -> None:
    batch, micro = self.args.profile_batch, self.args.microbatch
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_step", f"--batch={batch}",
         f"--microbatch={micro if micro < batch else 0}", "--top=12",
         f"--conv_impl={self.args.conv_impls[-1]}"],
        capture_output=True, text=True, cwd=str(REPO), timeout=900)
    if proc.returncode != 0:
      raise RuntimeError(f"profile_step exited {proc.returncode}: {proc.stderr[-1500:]}")
    lines = proc.stdout.strip().splitlines()
    self.results["profile"] = json.loads(lines[-1])
    self.md["profile"] = "### Per-layer profile of our step\n\n" + "\n".join(lines[:-1]).strip()


def _tag(args, impl: str) -> str:
  """The results key suffix of a conv_impl: none when only one is timed (as before)."""
  return f"[{impl}]" if len(args.conv_impls) > 1 else ""


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="~3-5 minutes: batch 32, one round")
  p.add_argument("--name", default=None, help="results file name (default full/quick)")
  p.add_argument("--out_dir", default=str(REPO / "benchmarks" / "results"))
  p.add_argument("--no_md", dest="md", action="store_false", help="don't edit BENCHMARKS.md")
  p.add_argument("--no_torch", action="store_true")
  p.add_argument("--only", default="peak,train,eval,memory,pipeline,datawait,scaling,profile")
  p.add_argument("--microbatch", type=int, default=32,
                 help="also time our step with config.microbatch_size=N (when N < batch)")
  p.add_argument("--conv_impl", default="auto",
                 help="model.conv_impl to time, comma-separated for an interleaved A/B "
                      "(e.g. xla,onednn); the profile section uses the last")
  p.add_argument("--batches", default="",
                 help="train batch sizes, comma-separated (default: 32,128; --quick 32)")
  p.add_argument("--update", action="store_true",
                 help="keep the last run's results for the sections not in --only")
  args = p.parse_args(argv)
  args.only = args.only.split(",")
  args.conv_impls = args.conv_impl.split(",")
  batches = [int(b) for b in args.batches.split(",")] if args.batches else None
  args.name = args.name or ("quick" if args.quick else "full")
  args.malloc = ["tuned", "glibc"]
  args.dtypes = ["float32", "bfloat16"]
  if args.quick:
    args.batches, args.rounds, args.steps, args.eval_rounds = [32], 2, 1, 1
    args.eval_batch, args.memory_batches = 16, [32]
    args.pipeline_images, args.pipeline_rounds = 512, 1
    args.datawait_steps, args.devices, args.scaling_batch, args.scaling_steps = 20, [1, 2], 16, 1
    args.profile_batch = 16
    args.only = [s for s in args.only if s != "profile"]
  else:
    args.batches, args.rounds, args.steps, args.eval_rounds = [32, 128], 3, 1, 2
    args.eval_batch, args.memory_batches = 32, [128]
    args.pipeline_images, args.pipeline_rounds = 1536, 2
    args.datawait_steps, args.devices, args.scaling_batch, args.scaling_steps = (
        30, [1, 2, 4, 8], 32, 2)
    args.profile_batch = 128  # in passes of --microbatch: our fastest batch-128 step
  args.batches = batches or args.batches
  args.pipeline_data = str(REPO.parent / "shared" / "data" / "imagenet-tiny")

  suite = Suite(args)
  t0 = time.perf_counter()
  suite.env()
  needs_torch = {"train", "eval"} & set(args.only)
  if needs_torch:
    suite.start_peers()
  else:
    suite.peers, suite.torch_note = {}, ""
  try:
    suite.section("peak", suite.peak)
    suite.section("train", suite.train)
    suite.section("eval", suite.eval)
  finally:
    suite.close_peers()
  for key in ("memory", "pipeline", "datawait", "scaling", "profile"):
    suite.section(key, getattr(suite, key))
  suite.section("peak", suite.peak)  # again at the end: the peak is the best seen
  suite.results["total_s"] = time.perf_counter() - t0
  suite.save()
  log(f"done in {suite.results['total_s'] / 60:.1f} min: {suite.md_path}")
  print(suite.render())


if __name__ == "__main__":
  main()
