r"""Figure 1 of the paper: a four-layer CNN reaches a training error sooner with ReLUs than tanh.

  python -m alexnet_jax.tools.figure1 --config=experiments/figure1.py --workdir=runs/figure1

The paper (section 3.1, Figure 1): "A four-layer convolutional neural network with ReLUs
(solid line) reaches a 25% training error rate on CIFAR-10 six times faster than an
equivalent network with tanh neurons (dashed line). The learning rates for each network
were chosen independently to make training as fast as possible. No regularization of any
kind was employed." It does not give the network; `experiments/figure1.py` uses the
layers of cuda-convnet's fast CIFAR-10 example: three 5x5 convolutions (32, 32, 64 maps,
each followed by the activation and a 3x3 stride-2 pooling) and one fully connected
layer. The network here is a pure function of a params pytree.

Both networks train on the same batches (the project's input pipeline, so any dataset it
reads: TFDS `cifar10`, or the built-in demo shapes) with the paper's SGD
(`optim.make_optimizer`), each at its own learning rate. The training error of an epoch
is the mean error of its training batches as they were trained on (what cuda-convnet
printed, and what the paper plots).

Writes WORKDIR/figure1.json (per-epoch training error of each activation, the epochs each
takes to reach `figure1.target_error`, and tanh's over ReLU's) and WORKDIR/figure1.png.
Expected (demo data, the default config): a few minutes on a 2-core CPU; ReLU reaches the
target within a few epochs and tanh several times later (figure1.json's `ratio`).
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from alexnet_jax import data as input_pipeline  # noqa: E402
from alexnet_jax import optim  # noqa: E402

# Named like AlexNet's layers so that `optim.make_optimizer`'s per-layer options (looked up
# by layer name) apply: three convolutions and the classifier, which is AlexNet's fc8.
CONV_LAYERS = ("conv1", "conv2", "conv3")
LAYERS = CONV_LAYERS + ("fc8",)
ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh}

Params = dict[str, dict[str, jax.Array]]


# ------------------------------------------------------------------ the network


def _pooled_size(n: int, stride: int) -> int:
  # cuda-convnet's pooling covers the whole map: ceil(n / stride) outputs, the last
  # windows clipped at the edge.
  return -(-n // stride)


def feature_sizes(cfg: ml_collections.ConfigDict) -> list[int]:
  """Side of the maps after each conv layer's pooling."""
  sizes, n = [], cfg.input_size
  for _ in CONV_LAYERS:
    n = _pooled_size(n, cfg.pool_stride)
    sizes.append(n)
  return sizes


def init_params(cfg: ml_collections.ConfigDict, rng: jax.Array) -> Params:
  """Weights ~ N(0, init_weight_std[layer]), biases = init_bias[layer]; float32.

  conv kernels [k, k, cin, cout]; fc8 kernel [side * side * 64, num_classes].
  """
  keys = jax.random.split(rng, len(LAYERS))
  shapes, cin = [], 3
  for width in cfg.conv_features:
    shapes.append((cfg.conv_kernel_size, cfg.conv_kernel_size, cin, width))
    cin = width
  shapes.append((feature_sizes(cfg)[-1] ** 2 * cin, cfg.num_classes))
  return {name: {"kernel": cfg.init_weight_std[i] * jax.random.normal(keys[i], shape),
                 "bias": jnp.full((shape[-1],), cfg.init_bias[i], jnp.float32)}
          for i, (name, shape) in enumerate(zip(LAYERS, shapes, strict=True))}


def pool(x: jax.Array, kind: str, window: int, stride: int) -> jax.Array:
  """Max or average pooling of [B, H, W, C] with ceil(H / stride) outputs a side."""
  n = x.shape[1]
  extra = max(0, (_pooled_size(n, stride) - 1) * stride + window - n)
  dims, strides = (1, window, window, 1), (1, stride, stride, 1)
  padding = ((0, 0), (0, extra), (0, extra), (0, 0))
  if kind == "max":
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, padding)
  if kind == "avg":
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, padding)
    # Clipped windows at the edge average what they cover, not the padding.
    count = jax.lax.reduce_window(jnp.ones(x.shape[1:3], x.dtype)[None, :, :, None], 0.0,
                                  jax.lax.add, dims, strides, padding)
    return total / count
  raise ValueError(f"pool kind must be 'max' or 'avg', got {kind!r}")


def apply(cfg: ml_collections.ConfigDict, params: Params, images: jax.Array, activation: str,
          *, capture: bool = False) -> Any:
  """Logits [B, num_classes] (and, with `capture`, {layer: its activated output}).

  conv (SAME) -> activation -> pool, three times; then the fully connected classifier.
  """
  act = ACTIVATIONS[activation]
  captured = {}
  # The pipeline's images are on the 0-255 scale minus the mean; one SGD learning rate
  # suits every layer only when the input is on the scale of the hidden activations.
  x = images * cfg.input_scale
  for i, name in enumerate(CONV_LAYERS):
    p = params[name]
    x = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
    x = act(x)
    captured[name] = x
    x = pool(x, cfg.pool_kinds[i], cfg.pool_window, cfg.pool_stride)
  x = x.reshape(x.shape[0], -1)
  logits = x @ params["fc8"]["kernel"] + params["fc8"]["bias"]
  captured["fc8"] = logits
  return (logits, captured) if capture else logits


# ------------------------------------------------------------------ training


def make_train_step(config: ml_collections.ConfigDict, activation: str,
                    tx: optax.GradientTransformation):
  """(params, opt_state, images, labels) -> (params, opt_state, loss, error); jitted."""

  def loss_fn(params, images, labels):
    logits = apply(config.model, params, images, activation)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) != labels)

  @jax.jit
  def step(params, opt_state, images, labels):
    (loss, error), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, error

  return step


def config_for(config: ml_collections.ConfigDict, activation: str) -> ml_collections.ConfigDict:
  """The config with `activation`'s learning rate as optim.learning_rate."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.optim.learning_rate = float(config.figure1.learning_rate[activation])
  return c


def train_curve(config: ml_collections.ConfigDict, activation: str,
                log=print) -> dict[str, list[float]]:
  """Trains one network for config.num_epochs; per-epoch mean training error and loss."""
  c = config_for(config, activation)
  info = input_pipeline.dataset_info(c)
  spe = input_pipeline.steps_per_epoch(c, info)
  params = init_params(c.model, jax.random.key(c.seed))
  tx = optim.make_optimizer(c)
  opt_state = tx.init(params)
  step = make_train_step(c, activation, tx)
  # The same stream (a pure function of seed and step) for both activations.
  batches = input_pipeline.train_batches(c, start_step=0)
  errors, losses = [], []
  for epoch in range(int(c.num_epochs)):
    started, epoch_err, epoch_loss = time.perf_counter(), [], []
    for _ in range(spe):
      batch = next(batches)
      params, opt_state, loss, err = step(params, opt_state, batch["image"], batch["label"])
      epoch_err.append(err)
      epoch_loss.append(loss)
    errors.append(float(np.mean(jax.device_get(epoch_err))))
    losses.append(float(np.mean(jax.device_get(epoch_loss))))
    if not np.isfinite(losses[-1]):
      raise FloatingPointError(f"{activation}: loss {losses[-1]} in epoch {epoch + 1}; "
                               f"lower figure1.learning_rate.{activation}")
    log(f"{activation} epoch {epoch + 1}/{int(c.num_epochs)}: training error {errors[-1]:.4f}, "
        f"loss {losses[-1]:.4f} ({time.perf_counter() - started:.1f}s, lr "
        f"{c.optim.learning_rate:g})")
  return {"training_error": errors, "loss": losses}


def epochs_to_target(errors: Sequence[float], target: float) -> tuple[int | None, float | None]:
  """(first epoch, 1-based, whose training error is <= target; the same, interpolated).

  The interpolated value is linear between the last epoch above the target and the
  first at or below it (epoch 1 if the very first is already there); None if never.
  """
  for i, e in enumerate(errors):
    if e <= target:
      if i == 0:
        return 1, 1.0
      before = errors[i - 1]
      return i + 1, i + (before - target) / (before - e)
  return None, None


def summarise(curves: dict[str, dict[str, list[float]]], target: float) -> dict[str, Any]:
  """Epochs to target per activation and tanh's over ReLU's (a lower bound if tanh never
  got there)."""
  first, interp = {}, {}
  for name, curve in curves.items():
    first[name], interp[name] = epochs_to_target(curve["training_error"], target)
  out: dict[str, Any] = {"target_error": target, "first_epoch_at_target": first,
                         "epochs_to_target": interp, "ratio": None, "ratio_is_lower_bound": False}
  relu, tanh = interp.get("relu"), interp.get("tanh")
  if relu is not None and tanh is not None:
    out["ratio"] = tanh / relu
  elif relu is not None and "tanh" in curves:
    out["ratio"] = len(curves["tanh"]["training_error"]) / relu
    out["ratio_is_lower_bound"] = True
  return out


def plot(curves: dict[str, dict[str, list[float]]], summary: dict[str, Any], path: str,
         title: str) -> None:
  """Training error vs epoch, ReLU solid and tanh dashed as in the paper, and the target."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6, 4.5), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  styles = {"relu": dict(color="#1f77b4", ls="-"), "tanh": dict(color="#d62728", ls="--")}
  for name, curve in curves.items():
    errors = curve["training_error"]
    at = summary["epochs_to_target"].get(name)
    label = f"{name} ({f'{at:.1f} epochs' if at is not None else 'not reached'} to target)"
    ax.plot(range(1, len(errors) + 1), errors, marker="o", ms=3, label=label,
            **styles.get(name, {}))
  ax.axhline(summary["target_error"], color="grey", lw=0.8, ls=":",
             label=f"target {summary['target_error']:.0%}")
  ratio = summary["ratio"]
  if ratio is not None:
    title += f"\ntanh / ReLU epochs to target: {'>' if summary['ratio_is_lower_bound'] else ''}" \
             f"{ratio:.1f}x"
  ax.set_title(title, fontsize=10)
  ax.set_xlabel("epochs")
  ax.set_ylabel("training error rate")
  ax.set_ylim(0, 1)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)


def run(config: ml_collections.ConfigDict, workdir: str, log=print) -> dict[str, Any]:
  """Trains every configured activation; writes figure1.json and figure1.png in workdir."""
  os.makedirs(workdir, exist_ok=True)
  started = time.perf_counter()
  curves = {a: train_curve(config, a, log) for a in config.figure1.activations}
  summary = summarise(curves, float(config.figure1.target_error))
  result = {**summary, "dataset": config.dataset.name, "num_epochs": int(config.num_epochs),
            "learning_rate": {a: float(config.figure1.learning_rate[a]) for a in curves},
            "curves": curves, "seconds": round(time.perf_counter() - started, 1),
            "config": json.loads(config.to_json_best_effort())}
  with open(os.path.join(workdir, "figure1.json"), "w") as f:
    json.dump(result, f, indent=2)
  plot(curves, summary, os.path.join(workdir, "figure1.png"),
       f"Figure 1: four-layer CNN on {config.dataset.name}")
  log(f"epochs to {summary['target_error']:.0%} training error: {summary['epochs_to_target']}; "
      f"tanh / ReLU = {summary['ratio']}{' (lower bound)' if summary['ratio_is_lower_bound'] else ''}"
      f"; {workdir}/figure1.json, figure1.png")
  return result


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags

  config = flags.FLAGS.config
  run(config, flags.FLAGS.workdir)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  flags.DEFINE_string("workdir", None, "Output directory: figure1.json, figure1.png.")
  config_flags.DEFINE_config_file("config", None, "experiments/figure1.py", lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
