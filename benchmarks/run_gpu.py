r"""The benchmark suite for a machine with a GPU, in under five minutes.

  python benchmarks/run_gpu.py [--budget_s=270] [--no_md]

Needs jax (with CUDA), numpy and the step's own pure-Python dependencies (flax, optax,
ml_collections; install their wheels if missing) for our step; torch (same Python) for
the PyTorch side; TF / tfds / clu only for the input-pipeline and data-wait sections,
which are skipped with a message when missing. Runs in one process, interleaving ours
and PyTorch on the same GPU (XLA_PYTHON_CLIENT_PREALLOCATE=false so both fit).

Sections: matmul peak (float32 default precision and bfloat16 -> float32); train step
images/s ours vs PyTorch (channels_last, SGD momentum + decay, autocast bf16), batch 32
and 128 (+512 bfloat16, for the projection), compile time, peak device memory; ten-crop
eval; the input pipeline and data wait when TF is there; the CPU fake-device scaling
points if time is left; the projected time for 90 ImageNet epochs (1.28M images x 90 /
images/s). Writes benchmarks/results/gpu.{json,md} and the `gpu results` block of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

REPO = common.REPO
BEGIN, END = "<!-- gpu results: begin -->", "<!-- gpu results: end -->"
T0 = time.perf_counter()


def log(msg: str) -> None:
  print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


class TorchGPU:
  """The peer's model (benchmarks/torch_peer/alexnet_torch.py) on CUDA, in this process."""

  def __init__(self, batch: int, dtype: str):
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO / "benchmarks" / "torch_peer"))
    import alexnet_torch

    self.torch, self.F = torch, F
    torch.backends.cudnn.benchmark = True  # the usual setting for fixed shapes
    torch.manual_seed(0)
    self.batch, self.dtype = batch, dtype
    dev = torch.device("cuda")
    self.model = alexnet_torch.AlexNet2012(num_classes=1000).to(dev).to(
        memory_format=torch.channels_last).train()
    self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9,
                               weight_decay=5e-4)
    self.x = (torch.randn(batch, 3, 224, 224, device=dev) * 60).contiguous(
        memory_format=torch.channels_last)
    self.y = torch.randint(0, 1000, (batch,), device=dev)
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    self.train(2)
    self.warmup_s = time.perf_counter() - t

  def _autocast(self):
    return self.torch.autocast("cuda", dtype=self.torch.bfloat16,
                               enabled=self.dtype == "bfloat16")

  def train(self, steps: int) -> float:
    torch = self.torch
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
      self.opt.zero_grad(set_to_none=True)
      with self._autocast():
        loss = self.F.cross_entropy(self.model(self.x), self.y)
      loss.backward()
      self.opt.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps

  def eval(self, steps: int, crops: int = 10) -> float:
    torch = self.torch
    x = self.x.repeat(crops, 1, 1, 1).contiguous(memory_format=torch.channels_last)
    self.model.eval()
    with torch.inference_mode(), self._autocast():
      for i in range(steps + 1):
        if i == 1:  # the first pass picks cuDNN algorithms
          torch.cuda.synchronize()
          t = time.perf_counter()
        probs = self.F.softmax(self.model(x).float(), dim=1)
        probs.view(crops, self.batch, -1).mean(0)
      torch.cuda.synchronize()
    self.model.train()
    return (time.perf_counter() - t) / steps

  def peak_mb(self) -> float:
    return self.torch.cuda.max_memory_allocated() / 2**20

  def close(self):
    del self.model, self.opt, self.x, self.y
    gc.collect()
    self.torch.cuda.empty_cache()


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--budget_s", type=float, default=270.0,
                 help="optional sections are skipped once this much time has passed")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--no_md", dest="md", action="store_false")
  p.add_argument("--out_dir", default=str(REPO / "benchmarks" / "results"))
  args = p.parse_args(argv)

  missing = [m for m in ("flax", "optax", "ml_collections")
             if __import__("importlib.util").util.find_spec(m) is None]
  if missing:
    sys.exit(f"run_gpu.py: our train step needs {', '.join(missing)} (pure-Python wheels: "
             f"pip install {' '.join(missing)}); jax and numpy are the only other needs.")

  import jax

  res: dict = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
               "backend": jax.default_backend(), "notes": []}
  md: list[str] = []
  out_dir = Path(args.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)

  def note(msg):
    log(msg)
    res["notes"].append(msg)

  def save():
    (out_dir / "gpu.json").write_text(json.dumps(res, indent=1, default=str))
    text = "\n".join(md + ["", *[f"- {n}" for n in res["notes"]]])
    (out_dir / "gpu.md").write_text(text)
    if args.md:
      path = REPO / "BENCHMARKS.md"
      doc = path.read_text() if path.exists() else "# Benchmarks\n"
      if BEGIN not in doc:
        doc += f"\n## GPU results\n\n{BEGIN}\n{END}\n"
      head, rest = doc.split(BEGIN, 1)
      tail = rest.split(END, 1)[1] if END in rest else ""
      path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")

  if jax.default_backend() != "gpu":
    note(f"no GPU backend (jax says {jax.default_backend()}): the numbers below are not "
         "GPU numbers")
  md.append(f"jax {jax.__version__} on {res['devices'][0]}; one process, ours and PyTorch "
            "interleaved on the same device.")

  # ---------------------------------------------------------------- peak
  peak = common.matmul_peak(n=8192, reps=10)
  res["peak"] = peak
  md += ["", f"Matmul peak (8192^2): float32 (default precision) {peak['float32']:.0f} "
         f"GFLOP/s, bfloat16 -> float32 {peak['bfloat16']:.0f} GFLOP/s."]
  log(f"peak {peak}")

  try:
    import torch

    have_torch = torch.cuda.is_available()
    if not have_torch:
      note("torch has no CUDA here: PyTorch columns skipped")
    res["torch"] = torch.__version__
  except ImportError:
    have_torch = False
    note("torch not installed: PyTorch columns skipped")

  # ---------------------------------------------------------------- train
  configs = [(32, "float32"), (32, "bfloat16"), (128, "float32"), (128, "bfloat16"),
             (512, "bfloat16")]
  rows = res["train"] = []
  md += ["", "| batch | dtype | ours img/s | PyTorch img/s | ours / PyTorch | ours % of "
         "peak | compile s | ours peak MB | PyTorch peak MB |",
         "|---|---|---|---|---|---|---|---|---|"]
  for batch, dtype in configs:
    try:
      ours = common.OurTrainStep(common.config_for(batch, dtype))
      mem = common._bytes_in_use()
      theirs = TorchGPU(batch, dtype) if have_torch else None
      t_ours, t_torch = [], []
      for _ in range(args.rounds):
        t_ours.append(ours.run_async(args.steps))
        if theirs:
          t_torch.append(theirs.train(args.steps))
      row = dict(batch=batch, dtype=dtype, ours_ips=batch / min(t_ours),
                 torch_ips=batch / min(t_torch) if t_torch else None,
                 compile_s=ours.compile_s, ours_peak_mb=common._bytes_in_use().get(
                     "peak_bytes_in_use", mem.get("peak_bytes_in_use")),
                 torch_peak_mb=theirs.peak_mb() if theirs else None,
                 flops_per_image=ours.flops_per_image())
      rows.append(row)
      ratio = f"{row['ours_ips'] / row['torch_ips']:.2f}x" if row["torch_ips"] else "n/a"
      frac = 100 * row["ours_ips"] * common.TRAIN_FLOPS_PER_IMAGE / 1e9 / peak[dtype]
      md.append(f"| {batch} | {dtype} | {row['ours_ips']:.0f} | "
                f"{row['torch_ips'] or float('nan'):.0f} | {ratio} | {frac:.0f}% | "
                f"{ours.compile_s:.1f} | {row['ours_peak_mb'] or float('nan'):.0f} | "
                f"{row['torch_peak_mb'] or float('nan'):.0f} |")
      log(md[-1])
      del ours
      if theirs:
        theirs.close()
      gc.collect()
    except Exception as e:  # noqa: BLE001 - e.g. out of memory at one batch size
      traceback.print_exc()
      note(f"train batch {batch} {dtype} failed: {type(e).__name__}: {str(e)[:200]}")
    save()

  # ---------------------------------------------------------------- projection
  if rows:
    lines = ["", "Projected time for 90 epochs of ILSVRC-2012 (1,281,167 images x 90 / "
             "images/s, train steps only; the 2012 run took 5-6 days on two GTX 580):", ""]
    res["projection_h"] = {}
    for r in rows:
      hours = common.IMAGENET_TRAIN_IMAGES * 90 / r["ours_ips"] / 3600
      res["projection_h"][f"{r['batch']}-{r['dtype']}"] = hours
      lines.append(f"- batch {r['batch']}, {r['dtype']}: {hours:.1f} h")
    md += lines
    log("\n".join(lines))
    save()

  # ---------------------------------------------------------------- eval
  try:
    ev = common.OurEvalStep(common.config_for(128, "bfloat16"))
    t_ours = min(ev.run_async(args.steps) for _ in range(args.rounds))
    t_torch = None
    if have_torch:
      theirs = TorchGPU(128, "bfloat16")
      t_torch = min(theirs.eval(args.steps) for _ in range(args.rounds))
      theirs.close()
    res["eval"] = dict(ours_ips=128 / t_ours, torch_ips=128 / t_torch if t_torch else None)
    md += ["", f"Ten-crop eval, batch 128 images, bfloat16: ours {128 / t_ours:.0f} img/s, "
           f"PyTorch {(128 / t_torch) if t_torch else float('nan'):.0f} img/s."]
    del ev
  except Exception as e:  # noqa: BLE001
    traceback.print_exc()
    note(f"eval failed: {type(e).__name__}: {str(e)[:200]}")
  save()

  # ---------------------------------------------------------------- optional sections
  def left() -> float:
    return args.budget_s - (time.perf_counter() - T0)

  try:
    import tensorflow  # noqa: F401
    have_tf = True
  except ImportError:
    have_tf = False
    note("tensorflow missing: input pipeline and data-wait sections skipped")
  data = "/work/shared/data/imagenet-tiny"
  if have_tf and os.path.isdir(data) and left() > 60:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.input_pipeline", f"--data={data}",
                           "--images=1024", "--rounds=1"], capture_output=True, text=True,
                          cwd=str(REPO), timeout=max(left(), 30))
    md += ["", "Input pipeline:", "", proc.stdout.strip()]
  elif have_tf:
    note(f"input pipeline skipped ({data} missing or no time left)")
  if have_tf and left() > 90:
    try:
      import clu  # noqa: F401
      with __import__("tempfile").TemporaryDirectory() as wd:
        proc = subprocess.run(
            [sys.executable, "main.py", "--config=experiments/demo.py", f"--workdir={wd}",
             "--config.num_train_steps=30", "--config.eval_every_steps=100000",
             "--config.checkpoint_every_steps=100000"],
            capture_output=True, text=True, cwd=str(REPO), timeout=max(left(), 30))
      waits = [line for line in (proc.stdout + proc.stderr).splitlines() if "data wait" in line]
      md += ["", "Data wait (demo run):", ""] + [f"    {w.strip()[-110:]}" for w in waits]
    except ImportError:
      note("clu missing: data-wait section skipped")
  save()

  # Fake-device scaling is a CPU experiment; on this host's cores if time is left.
  scaling = []
  for devices, data_axis, model_axis in [(1, 1, 1), (2, 2, 1), (2, 1, 2), (4, 4, 1),
                                         (8, 8, 1)]:
    if left() < 45:
      note("CPU fake-device scaling: stopped for time")
      break
    try:
      scaling.append(common.run_json_subprocess(
          ["-m", "benchmarks.step_worker", "--batch=32", f"--devices={devices}",
           f"--data={data_axis}", f"--model={model_axis}", "--steps=2"],
          env={"JAX_PLATFORMS": "cpu"}, timeout=max(left(), 30)))
    except Exception as e:  # noqa: BLE001
      note(f"scaling point {devices} devices failed: {str(e)[:200]}")
      break
  if scaling:
    md += ["", "CPU fake devices (host cores), batch 32 float32:", "",
           "| devices | data x model | img/s |", "|---|---|---|"]
    md += [f"| {r['devices']} | {r['data']} x {r['model']} | {r['images_per_s']:.1f} |"
           for r in scaling]
  res["scaling"] = scaling
  res["total_s"] = time.perf_counter() - T0
  save()
  print("\n".join(md))
  log(f"done in {res['total_s']:.0f}s; results in {out_dir / 'gpu.md'}")


if __name__ == "__main__":
  main()
