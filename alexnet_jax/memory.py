"""Will the train step fit? Its memory per device, estimated from shapes before compiling.

A batch too large for the machine otherwise shows only after XLA has compiled the step,
as RESOURCE_EXHAUSTED or the kernel's OOM killer. The estimate, per device:

  state (parameters and optimizer state: `layout.abstract`, this device's shard)
  + gradients (one copy; two when micro-batches are summed)
  + the input batch (this device's share of it)
  + local batch x (activations autodiff keeps for the backward pass, from `jax.vjp`'s
    residuals, traced with `jax.eval_shape`: nothing is allocated or compiled
    + with XLA's convolutions (model.conv_impl="xla"), the largest convolution's input
      patches: XLA CPU's convolution gradients materialise them, e.g. conv1's
      55 x 55 x 11 x 11 x 3 floats = 4.4 MB an image; oneDNN's do not).

Measured against XLA's own `compiled.memory_analysis()` on the CPU (temporaries +
arguments, one device): the demo net at batch 16, 64 and 2,000 and the paper's net at
32: within 8% (0.92-1.01x; tests/test_memory.py checks the demo net); with oneDNN's
convolutions (XLA's analysis then leaves out oneDNN's small scratchpads) the demo net at
16 and the paper's at 32: 1.04x. A net as narrow as
the smoke config's is under-estimated by up to 40% (XLA then keeps conv1's patches once
per tower): the check refuses what cannot fit, it does not promise what will.
Micro-batching does not lower XLA CPU's peak (it schedules the chunks' forward passes
together: batch 64 in micro-batches of 16 took 3.8x the memory of one micro-batch), so
the estimate counts the whole local batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax

from alexnet_jax import config_checks
from alexnet_jax import model as model_lib
from alexnet_jax.parallel import DATA, MODEL

_TRACE_BATCH = 7  # any batch size no parameter has as its leading dimension


@dataclasses.dataclass(frozen=True)
class Estimate:
  fixed: int  # bytes per device that do not grow with the batch
  per_example: int  # bytes per device per example of the local batch
  local_batch: int

  @property
  def total(self) -> int:
    return self.fixed + self.per_example * self.local_batch


def _bytes(leaves) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in leaves)


def _per_example_activations(config: ml_collections.ConfigDict) -> int:
  """Bytes per example that one train step keeps and works in: vjp residuals plus the
  largest convolution's input patches (all towers; one device)."""
  net = model_lib.AlexNet(config.model)
  params = jax.eval_shape(net.init, jax.random.key(0))
  b, size = _TRACE_BATCH, int(config.model.input_size)
  images = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((b,), jnp.int32)
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b))

  def backward_function(p, x, y, k):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        net.apply(p, x, train=True, rng=k), y).mean()
    return jax.vjp(loss, p)[1]

  residuals = jax.tree.leaves(jax.eval_shape(backward_function, params, images, labels, keys))
  per_example = _bytes(r for r in residuals if r.ndim and r.shape[0] == b) // b
  if model_lib.resolve_conv_impl(config.model.get("conv_impl", "auto")) != "xla":
    return per_example  # oneDNN's convolutions work in place, with a small scratchpad
  _, outputs = jax.eval_shape(lambda p, x: net.apply(p, x, train=False, capture=True),
                              params, images)
  itemsize = jnp.dtype(model_lib.DTYPES[config.model.compute_dtype]).itemsize
  patches = 0
  for name, out in outputs.items():  # [towers, b, h, w, c]
    if name.startswith("conv"):
      _, kh, kw, cin, _ = params[name]["kernel"].shape  # [towers, kh, kw, cin, cout]
      _, _, h, w, _ = out.shape
      # One tower's patches: the peak is one convolution's gradient at a time.
      patches = max(patches, h * w * kh * kw * cin * itemsize)
  return per_example + patches


def train_step_bytes(config: ml_collections.ConfigDict, layout) -> Estimate:
  """The estimate for `steps.make_train_step(config, layout, ...)` on one device."""
  mesh = layout.mesh
  data, model = mesh.shape[DATA], mesh.shape[MODEL]
  local_batch = int(config.batch_size) // data
  state = [jax.ShapeDtypeStruct(s.sharding.shard_shape(s.shape), s.dtype)
           for s in jax.tree.leaves(layout.abstract)]
  params = [jax.ShapeDtypeStruct(s.sharding.shard_shape(s.shape), s.dtype)
            for s in jax.tree.leaves(layout.abstract.params)]
  micro = int(config.microbatch_size or local_batch)
  grads = _bytes(params) * (2 if micro < local_batch else 1)
  size = int(config.model.input_size)
  per_example = size * size * 3 * 4 + _per_example_activations(config) // model
  return Estimate(fixed=_bytes(state) + grads, per_example=per_example,
                  local_batch=local_batch)


def available_bytes(device: jax.Device) -> int | None:
  """Memory the device can still allocate: the accelerator's own limit, or for the CPU the
  host's available memory (within a cgroup's limit); None where unknown."""
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
      return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return None
  try:
    with open("/proc/meminfo") as f:
      info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    free = info["MemAvailable"]
  except (OSError, KeyError, ValueError):
    return None
  for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                  "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
    try:
      with open(limit_file) as f, open(usage_file) as g:
        limit = f.read().strip()
        if limit != "max":
          free = min(free, int(limit) - int(g.read()))
      break
    except (OSError, ValueError):
      continue
  return free


def check_train_step_fits(config: ml_collections.ConfigDict, layout) -> Estimate:
  """Raises ConfigError("batch_size") when the step cannot fit in this host's memory
  (CPU devices share it) or the accelerator's; the message gives the largest batch that
  fits. `config.memory_check=False` skips it (an estimate can be wrong elsewhere)."""
  estimate = train_step_bytes(config, layout)
  if not config.get("memory_check", True):
    return estimate
  devices = [d for d in layout.mesh.devices.flat if d.process_index == jax.process_index()]
  shared = devices[0].platform == "cpu"
  free = available_bytes(devices[0])
  if free is None:
    return estimate
  copies = len(devices) if shared else 1  # CPU devices of a process share its RAM
  need = estimate.total * copies
  if need <= free:
    return estimate
  data = layout.mesh.shape[DATA]
  fits = max(0, (free // copies - estimate.fixed) // estimate.per_example) * data
  micro = int(config.microbatch_size or 0)
  step = data * micro if micro else data
  fits -= fits % step
  where = (f"host memory, shared by this process's {len(devices)} CPU device(s)" if shared
           else "each device")
  hint = (f"at most batch_size={fits}" if fits > 0 else
          "nothing fits: free memory or use a smaller model")
  raise config_checks.ConfigError(
      "batch_size", f"{config.batch_size} needs about {need / 2**30:.1f} GiB for a train "
      f"step ({where}; estimated before compiling), but {free / 2**30:.1f} GiB is "
      f"available: use {hint} (--config.memory_check=False skips this check)")
