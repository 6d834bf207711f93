"""PyTorch benchmark worker, driven over stdin/stdout with JSON lines.

Runs in the peer's own Python 3.11 venv (.venv-torch/, made by setup_venv.sh) and
is started by client.TorchPeer from the project's Python 3.12 benchmark driver. One
long-lived process lets the driver interleave JAX and PyTorch measurements
(A B A B ...) in one sitting, which is what makes ratios meaningful on a shared
2-core machine whose absolute speed drifts.

Protocol: one JSON object per line in, one JSON object per line out (flushed).
On start the worker prints {"ok": true, "event": "ready", ...} once torch is
imported and the model self-check has passed. Every reply carries "ok" and echoes
"cmd" (and "id", when the request had one). Errors reply {"ok": false, "error": ...}
and the worker keeps running. All logging goes to stderr: fd 1 is re-pointed at
stderr at start-up, so even a stray print or a C library's output can't corrupt the
reply stream.

Usage: python peer.py [--malloc=tuned|glibc]   (default tuned, or $TORCH_PEER_MALLOC;
see _TUNED_MALLOC below: it roughly doubles batch-128 training speed here)

Commands (optional fields with their defaults):
  setup  batch=128 dtype="float32"|"bfloat16" threads=<current> num_classes=1000
         seed=0 warmup=2 lrn=true lrn_alpha=1e-4 towers=2
         -> {"params", "setup_s", "threads", ...}
  train  steps=10 -> {"images_per_s", "step_s": [...], "loss"}
  eval   steps=5 ten_crop=true warmup=1 chunk=0 -> {"images_per_s" (images, not
         crops), "crops_per_s", "step_s": [...]}
  info   -> torch version, threads, mkldnn, CPU capability, ...
  peak_memory -> {"max_rss_mb", "rss_mb"}
  quit   -> {"ok": true} and exit
"""

import os
import sys

# Allocator tuning (--malloc=tuned, the default; --malloc=glibc turns it off).
# PyTorch's CPU tensors come straight from glibc malloc, which serves every block
# over 32 MB (at batch 128: all big activations, e.g. conv1's 149 MB output) with a
# fresh mmap and returns it with munmap on free. Each training step then page-faults
# and zeroes gigabytes again: measured here, 15-21 s per batch-128 step at first,
# drifting to ~7 s after several steps, against a steady ~4.7 s with mmap off (the
# heap keeps and reuses the memory). PyTorch's CPU tuning guide recommends
# jemalloc/tcmalloc for the same reason; these two glibc settings get the effect
# without extra packages. glibc reads them only at start-up, hence the re-exec.
_TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def _malloc_mode(argv: list[str]) -> str:
  mode = os.environ.get("TORCH_PEER_MALLOC", "tuned")
  for a in argv:
    if a.startswith("--malloc="):
      mode = a.split("=", 1)[1]
  if mode not in ("tuned", "glibc"):
    sys.exit(f"peer.py: --malloc must be 'tuned' or 'glibc', not {mode!r}")
  return mode


MALLOC = _malloc_mode(sys.argv[1:])
if MALLOC == "tuned" and any(os.environ.get(k) != v for k, v in _TUNED_MALLOC.items()):
  os.environ.update(_TUNED_MALLOC)
  os.execv(sys.executable, [sys.executable, *sys.argv])  # same fds: stdin/stdout kept

# Keep the reply stream clean before anything (torch included) can print: replies go
# to a private duplicate of fd 1, and fd 1 itself now points at stderr.
_REPLIES = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import alexnet_torch  # noqa: E402


def log(msg: str) -> None:
  print(f"[torch_peer {os.getpid()}] {msg}", file=sys.stderr, flush=True)


def reply(obj: dict) -> None:
  _REPLIES.write(json.dumps(obj) + "\n")
  _REPLIES.flush()


def _finite(x: float) -> float | None:
  # NaN/inf aren't valid JSON; a diverged loss shows up as null instead.
  return x if math.isfinite(x) else None


class Worker:
  def __init__(self):
    self.cfg = None  # the last setup request, normalised
    self.model = None
    self.opt = None
    self.x = self.y = None  # the training batch (fixed, random)
    self.x_eval = None  # the eval crops, made on first use

  # ------------------------------------------------------------------ helpers
  def _need_setup(self):
    if self.model is None:
      raise RuntimeError("no model: send {\"cmd\": \"setup\", ...} first")

  def _autocast(self):
    # bfloat16 = autocast around forward + loss (weights, grads and the SGD update
    # stay float32), the usual PyTorch mixed precision; float32 = autocast disabled.
    return torch.autocast("cpu", dtype=torch.bfloat16,
                          enabled=self.cfg["dtype"] == "bfloat16")

  def _train_step(self) -> float:
    self.opt.zero_grad(set_to_none=True)
    with self._autocast():
      loss = F.cross_entropy(self.model(self.x), self.y)
    loss.backward()
    self.opt.step()
    return loss.item()  # also a sync point (CPU ops are synchronous anyway)

  # ----------------------------------------------------------------- commands
  def setup(self, batch=128, dtype="float32", threads=None, num_classes=1000, seed=0,
            warmup=2, lrn=True, lrn_alpha=1e-4, towers=2):
    if dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be 'float32' or 'bfloat16', not {dtype!r}")
    if int(batch) < 1:
      raise ValueError(f"batch must be >= 1, not {batch}")
    t0 = time.perf_counter()
    # Free the previous model/optimizer/batches first, so two configs never coexist
    # in memory (max RSS still remembers the biggest one; see README).
    self.model = self.opt = self.x = self.y = self.x_eval = None
    gc.collect()
    if threads is not None:
      torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    model = alexnet_torch.AlexNet2012(num_classes=int(num_classes), lrn=bool(lrn),
                                      lrn_alpha=float(lrn_alpha), towers=int(towers))
    # channels_last (NHWC) is what oneDNN's CPU convolutions prefer; without it every
    # conv reorders its input and output.
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    # Random stand-ins on the scale of mean-subtracted 0-255 pixels (std ~60), as the
    # project feeds the network; speed doesn't depend on content, but this keeps the
    # activations in a realistic range (no denormals, no all-zero ReLUs).
    x = (torch.randn(int(batch), 3, 224, 224, generator=g) * 60.0).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, int(num_classes), (int(batch),), generator=g)
    self.cfg = dict(batch=int(batch), dtype=dtype, threads=torch.get_num_threads(),
                    num_classes=int(num_classes), seed=seed, lrn=bool(lrn),
                    lrn_alpha=float(lrn_alpha), towers=int(towers))
    self.model, self.opt, self.x, self.y = model, opt, x, y
    # Warm-up: the first steps create oneDNN primitives and allocate the momentum
    # buffers; they are slower and are not part of any measurement.
    build_s = time.perf_counter() - t0
    warm = [self._timed(self._train_step) for _ in range(int(warmup))]
    log(f"setup {self.cfg} build {build_s:.2f}s warm-up {[round(s, 2) for s in warm]}")
    return dict(params=alexnet_torch.count_params(model), setup_s=time.perf_counter() - t0,
                build_s=build_s, warmup_s=warm, **self.cfg)

  @staticmethod
  def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t

  def train(self, steps=10):
    self._need_setup()
    self.model.train()
    step_s, loss = [], float("nan")
    for _ in range(int(steps)):
      t = time.perf_counter()
      loss = self._train_step()
      step_s.append(time.perf_counter() - t)
    total = sum(step_s)
    return dict(images_per_s=self.cfg["batch"] * len(step_s) / total if total else None,
                step_s=step_s, steps=len(step_s), batch=self.cfg["batch"],
                dtype=self.cfg["dtype"], loss=_finite(loss))

  def eval(self, steps=5, ten_crop=True, warmup=1, chunk=0):
    """Forward-only inference, as the paper's test: softmax averaged over 10 crops.

    One step = one batch of `batch` images = batch*10 crops (or batch crops without
    ten_crop). `chunk` > 0 runs the crops through the net that many at a time (less
    memory); 0 = all at once. `warmup` untimed steps first: new shapes create new
    oneDNN primitives.
    """
    self._need_setup()
    batch, crops = self.cfg["batch"], 10 if ten_crop else 1
    n = batch * crops
    if self.x_eval is None or self.x_eval.shape[0] != n:
      self.x_eval = None
      g = torch.Generator().manual_seed(self.cfg["seed"] + 1)
      self.x_eval = (torch.randn(n, 3, 224, 224, generator=g) * 60.0).contiguous(
          memory_format=torch.channels_last)
    chunk = int(chunk) if chunk and int(chunk) > 0 else n
    self.model.eval()

    def step():
      probs = torch.cat([F.softmax(self.model(self.x_eval[i:i + chunk]).float(), dim=1)
                         for i in range(0, n, chunk)])
      return probs.view(batch, crops, -1).mean(dim=1)  # (images, classes)

    try:
      # inference_mode: no autograd bookkeeping at all (stricter than no_grad).
      with torch.inference_mode(), self._autocast():
        for _ in range(int(warmup)):
          step()
        step_s = [self._timed(step) for _ in range(int(steps))]
    finally:
      self.model.train()
    total = sum(step_s)
    return dict(images_per_s=batch * len(step_s) / total if total else None,
                crops_per_s=n * len(step_s) / total if total else None,
                step_s=step_s, steps=len(step_s), batch=batch, crops_per_image=crops,
                dtype=self.cfg["dtype"])

  def info(self):
    return dict(
        torch=torch.__version__,
        python=platform.python_version(),
        threads=torch.get_num_threads(),
        interop_threads=torch.get_num_interop_threads(),
        cpu_count=os.cpu_count(),
        mkldnn=torch.backends.mkldnn.is_available(),
        mkl=torch.backends.mkl.is_available(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        malloc=MALLOC,
        malloc_env={k: os.environ.get(k) for k in _TUNED_MALLOC},
        config=self.cfg,
        pid=os.getpid(),
    )

  def peak_memory(self):
    # ru_maxrss is in KiB on Linux (bytes on macOS). It is the process's lifetime
    # peak and can't be reset: for per-config peaks start a fresh peer per config.
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 / (1024 * 1024) if sys.platform == "darwin" else 1 / 1024
    rss_mb = None
    try:
      with open("/proc/self/statm") as f:
        rss_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
      pass
    return dict(max_rss_mb=kib * scale, rss_mb=rss_mb)


def main() -> int:
  worker = Worker()
  try:
    check = alexnet_torch.self_check()
  except Exception as e:  # report it, but still serve: the driver decides
    traceback.print_exc()
    reply(dict(ok=False, event="ready", error=f"self_check failed: {e}"))
  else:
    reply(dict(ok=True, event="ready", pid=os.getpid(), torch=torch.__version__,
               self_check=check))
  commands = {"setup": worker.setup, "train": worker.train, "eval": worker.eval,
              "info": worker.info, "peak_memory": worker.peak_memory}
  for line in sys.stdin:
    line = line.strip()
    if not line:
      continue
    req = {}
    try:
      req = json.loads(line)
      if not isinstance(req, dict):
        raise ValueError("a request must be a JSON object")
      cmd = req.get("cmd")
      echo = {"cmd": cmd} | ({"id": req["id"]} if "id" in req else {})
      if cmd == "quit":
        reply(dict(ok=True, **echo))
        return 0
      if cmd not in commands:
        raise ValueError(f"unknown cmd {cmd!r}; expected one of "
                         f"{sorted([*commands, 'quit'])}")
      args = {k: v for k, v in req.items() if k not in ("cmd", "id")}
      out = commands[cmd](**args)
      reply(dict(ok=True, **echo, **out))
    except Exception as e:  # noqa: BLE001 - any failure is reported, the worker lives on
      traceback.print_exc()
      echo = {k: req[k] for k in ("cmd", "id") if isinstance(req, dict) and k in req}
      reply(dict(ok=False, error=f"{type(e).__name__}: {e}", **echo))
  return 0  # stdin closed: the driver went away


if __name__ == "__main__":
  sys.exit(main())
