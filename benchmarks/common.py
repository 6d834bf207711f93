"""Shared pieces of the speed benchmarks: our train/eval step on synthetic data, timing.

Only jax + numpy (+ the project) are imported here, so the GPU script can use it on a
machine without TF/tfds/orbax/clu. Absolute times on the shared 2-core development
machine drift with other people's load: compare only numbers taken in one run,
interleaved.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

# Our own count (the paper gives none): the two-tower net's 724,406,816 forward
# multiply-accumulates x 2 FLOP, x 3 for forward and backward; used where XLA's cost
# analysis is missing.
TRAIN_FLOPS_PER_IMAGE = 3 * 2 * 724_406_816
FORWARD_FLOPS_PER_IMAGE = 2 * 724_406_816
IMAGENET_TRAIN_IMAGES = 1_281_167


def cores() -> int:
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def max_rss_mb() -> float:
  """This process's lifetime peak resident memory (ru_maxrss is KiB on Linux)."""
  kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return kib / 1024 / (1024 if sys.platform == "darwin" else 1)


def config_for(batch: int, dtype: str, *, data: int = 1, model: int = 1, microbatch: int = 0,
               **model_fields):
  """The paper's config (1000 classes, 224 crops) at `batch`, `dtype`, on a (data, model) mesh,
  the step in passes of `microbatch` images (0: the whole batch)."""
  from experiments import alexnet

  c = alexnet.get_config()
  c.batch_size = batch
  c.microbatch_size = microbatch
  c.eval_batch_size = batch
  c.model.compute_dtype = dtype
  c.mesh.data, c.mesh.model = data, model
  for k, v in model_fields.items():
    setattr(c.model, k, v)
  return c


def _flops(compiled) -> float | None:
  """FLOPs of one call from XLA's cost analysis (a dict, or a list of dicts on older jax)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - some backends don't implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def _bytes_in_use() -> dict:
  """Peak device memory from jax (GPU); empty where the backend doesn't report it."""
  import jax

  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001
    return {}
  return {k: stats[k] / 2**20 for k in ("peak_bytes_in_use", "bytes_in_use") if k in stats}


class OurTrainStep:
  """Our jitted train step on a fixed random batch: compile once, then timed calls."""

  def __init__(self, config, devices=None, seed: int = 0):
    import jax
    import numpy as np

    from alexnet_jax import optim, parallel, steps

    self.config = config
    self.batch_size = config.batch_size
    self.mesh = parallel.make_mesh(config, devices)
    layout = steps.state_layout(config, self.mesh)
    self.state = steps.create_train_state(config, layout)
    self.step = steps.make_train_step(config, layout,
                                      optim.make_schedule(config, steps_per_epoch=10_000))
    self.step_rng = steps.step_rng
    rng = np.random.default_rng(seed)
    s = config.model.input_size
    local = {"image": (rng.standard_normal((self.batch_size, s, s, 3)) * 60).astype(np.float32),
             "label": rng.integers(0, config.model.num_classes, self.batch_size).astype(np.int32)}
    self.batch = parallel.global_batch(self.mesh, local)
    t = time.perf_counter()
    self.compiled = self.step.lower(self.state, self.batch, self.step_rng(self.state)).compile()
    self.compile_s = time.perf_counter() - t
    self.flops = _flops(self.compiled)
    self.warmup_s = self.run(1)  # first call: allocations, thread pools
    jax.block_until_ready(self.state)

  def _one(self) -> float:
    import jax

    t = time.perf_counter()
    self.state, metrics = self.compiled(self.state, self.batch, self.step_rng(self.state))
    self.loss = float(jax.device_get(metrics["loss"]))  # a sync point
    return time.perf_counter() - t

  def run(self, steps: int) -> list[float]:
    return [self._one() for _ in range(steps)]

  def run_async(self, steps: int) -> float:
    """Mean seconds per step with steps dispatched back to back (one sync at the end):
    on a GPU a per-step read-back would leave the device idle between steps."""
    import jax

    t = time.perf_counter()
    metrics = None
    for _ in range(steps):
      self.state, metrics = self.compiled(self.state, self.batch, self.step_rng(self.state))
    self.loss = float(jax.device_get(metrics["loss"]))
    return (time.perf_counter() - t) / steps

  def flops_per_image(self) -> float:
    """XLA's count; cost analysis is per device, so times the devices of the mesh."""
    if not self.flops:
      return TRAIN_FLOPS_PER_IMAGE
    return self.flops * self.mesh.devices.size / self.batch_size


class OurEvalStep:
  """Our jitted ten-crop eval step (forward only) on `batch` images x 10 crops."""

  def __init__(self, config, devices=None, seed: int = 0, crops: int = 10):
    import numpy as np

    from alexnet_jax import parallel, steps

    self.batch_size = config.eval_batch_size
    mesh = parallel.make_mesh(config, devices)
    layout = steps.state_layout(config, mesh)
    self.state = steps.create_train_state(config, layout)
    step = steps.make_eval_step(config, layout)
    rng = np.random.default_rng(seed + 1)
    s = config.model.input_size
    b = self.batch_size
    local = {"image": (rng.standard_normal((b, crops, s, s, 3)) * 60).astype(np.float32),
             "label": rng.integers(0, config.model.num_classes, b).astype(np.int32),
             "mask": np.ones((b,), bool)}
    self.batch = parallel.global_batch(mesh, local)
    t = time.perf_counter()
    self.compiled = step.lower(self.state, self.batch).compile()
    self.compile_s = time.perf_counter() - t
    self.run(1)

  def run_async(self, steps: int) -> float:
    import jax

    t = time.perf_counter()
    outs = [self.compiled(self.state, self.batch) for _ in range(steps)]
    jax.block_until_ready(outs)
    return (time.perf_counter() - t) / steps

  def run(self, steps: int) -> list[float]:
    import jax

    out = []
    for _ in range(steps):
      t = time.perf_counter()
      jax.block_until_ready(self.compiled(self.state, self.batch))
      out.append(time.perf_counter() - t)
    return out


def images_per_s(batch: int, step_s: Sequence[float]) -> float:
  """Throughput from the median step (robust to a step hit by someone else's job)."""
  s = sorted(step_s)
  mid = len(s) // 2
  median = s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])
  return batch / median


def matmul_peak(n: int = 2048, reps: int = 5) -> dict:
  """GFLOP/s of an n x n jitted matmul: float32, and bfloat16 in / float32 accumulate."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  fns = {
      "float32": (jax.jit(lambda x, y: x @ y), a, b),
      "bfloat16": (jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32)),
                   a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)),
  }
  out = {}
  for name, (f, x, y) in fns.items():
    jax.block_until_ready(f(x, y))
    best = float("inf")
    for _ in range(reps):
      t = time.perf_counter()
      jax.block_until_ready(f(x, y))
      best = min(best, time.perf_counter() - t)
    out[name] = 2 * n**3 / best / 1e9
  return out


def run_json_subprocess(args: Sequence[str], env: dict | None = None,
                        timeout: float = 600.0) -> dict:
  """Runs `python args...` (the project's interpreter) and parses its last stdout line."""
  full_env = dict(os.environ)
  full_env.update(env or {})
  proc = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                        timeout=timeout, env=full_env, cwd=str(REPO))
  lines = [x for x in proc.stdout.strip().splitlines() if x.startswith("{")]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
  return json.loads(lines[-1])


def timed(fn: Callable[[], object]) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t
