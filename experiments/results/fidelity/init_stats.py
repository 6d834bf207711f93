r"""What the initialisation does, per layer, on one batch of real training images.

For each variant (a preset plus overrides), at step 0 on the same 64 imagenette
training images (each variant's own pipeline: its PCA scale and divisor):

  rms       root-mean-square of the layer's pre-activation output (conv/fc + bias)
  input%    input-dependent share of it: sum over units of the variance across the
            batch / sum over units of the mean square (0 = the same for every image)
  |g|/|w|   norm of the loss gradient of the layer's kernel / norm of the kernel
            (x lr 0.01 = the relative size of the first update)
  logits    rms of the logits' input-dependent part, initial loss

Train mode (dropout on, the training pipeline's crops). Writes init_stats.json and a
Markdown table beside this file:

  nice -n 19 .venv/bin/python experiments/results/fidelity/init_stats.py
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..")))
sys.path.insert(0, HERE)

from curve import load_config  # noqa: E402

PAPER, CODE = "experiments/alexnet.py", "experiments/alexnet_2012_code.py"
STD_PAPER = (0.01,) * 8
STD_CODE = (0.01, 0.01, 0.03, 0.03, 0.03, 0.01, 0.01, 0.01)
# Fan-in (He, gain sqrt 2) for conv2..fc7; conv1 and fc8 keep the paper's 0.01 (conv1 sees
# 0-255 pixels, std ~60, so fan-in there would give ~60x larger activations; a small fc8
# keeps the initial logits, and so the initial loss, near ln 10).
FAN_IN = (1200, 2304, 1728, 1728, 9216, 4096)
STD_HE = (0.01,) + tuple(round(math.sqrt(2.0 / f), 4) for f in FAN_IN) + (0.01,)

VARIANTS = {
    "paper": (PAPER, {}),
    "code": (CODE, {}),
    "paper+std03": (PAPER, {"model.init_weight_std": STD_CODE}),
    "code+std01": (CODE, {"model.init_weight_std": STD_PAPER}),
    "paper+he": (PAPER, {"model.init_weight_std": STD_HE}),
    "paper+he+bias0": (PAPER, {"model.init_weight_std": STD_HE, "model.init_bias": (0.0,) * 8}),
    "paper+std03+scale_at_test": (PAPER, {"model.init_weight_std": STD_CODE,
                                          "model.dropout_style": "scale_at_test"}),
    "code+inverted": (CODE, {"model.dropout_style": "inverted"}),
    "paper+std03+lrn_code": (PAPER, {"model.init_weight_std": STD_CODE,
                                     "model.lrn.alpha_over_n": True,
                                     "model.lrn.before_relu_in_conv1": True,
                                     "model.cnorm2.enabled": True}),
    "paper+std03+input_code": (PAPER, {"model.init_weight_std": STD_CODE,
                                       "input.pca_scale": "sqrt",
                                       "input.train_divisor": 1.1}),
}


def overrides(d):
  return [f"{k}={v!r}" for k, v in d.items()]


def measure(name, path, over, n=64):
  from alexnet_jax import data as input_pipeline
  from alexnet_jax import model as model_lib
  config = load_config(path, overrides(over))
  config.batch_size = n
  batch = next(iter(input_pipeline.train_batches(config)))
  images, labels = jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
  model = model_lib.AlexNet(config.model)
  params = model.init(jax.random.fold_in(jax.random.key(config.seed), 0))
  rng = jax.random.key(1)

  def loss_fn(p):
    logits, cap = model.apply(p, images, train=True, rng=rng, capture=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, cap)

  (loss, (logits, cap)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  # Without dropout (test mode): what varies across images is then the image alone.
  logits_eval, cap_eval = jax.jit(lambda p: model.apply(p, images, train=False, capture=True))(
      params)
  rows = {}
  for layer in model_lib.LAYERS:
    x = np.asarray(cap[layer], np.float64)  # [T, B, ...]
    x = np.moveaxis(x, 1, 0).reshape(x.shape[1], -1)  # [B, units]
    ms = float(np.mean(x ** 2))
    var = float(np.mean(x.var(axis=0)))
    xe = np.asarray(cap_eval[layer], np.float64)
    xe = np.moveaxis(xe, 1, 0).reshape(xe.shape[1], -1)
    share_eval = float(np.mean(xe.var(axis=0)) / np.mean(xe ** 2))
    w = np.asarray(params[layer]["kernel"])
    g = np.asarray(grads[layer]["kernel"])
    gb = np.asarray(grads[layer]["bias"])
    rows[layer] = {"rms": math.sqrt(ms), "input_share": var / ms if ms else 0.0,
                   "input_share_no_dropout": share_eval,
                   "relu_alive": float(np.mean(x > 0)),
                   "grad_over_weight": float(np.linalg.norm(g) / np.linalg.norm(w)),
                   "grad_norm": float(np.linalg.norm(g)), "bias_grad_norm": float(
                       np.linalg.norm(gb))}
  lg = np.asarray(logits, np.float64)
  lge = np.asarray(logits_eval, np.float64)
  out = {"loss": float(loss), "logit_rms": float(np.sqrt(np.mean(lg ** 2))),
         "logit_input_rms": float(np.sqrt(np.mean(lg.var(axis=0)))),
         "logit_input_rms_no_dropout": float(np.sqrt(np.mean(lge.var(axis=0)))),
         "logit_mean_abs_class_offset": float(np.mean(np.abs(lg.mean(0) - lg.mean()))),
         "layers": rows, "config": path, "overrides": {k: str(v) for k, v in over.items()}}
  print(name, f"loss {out['loss']:.3f} logit rms {out['logit_rms']:.3g} "
        f"input-dependent {out['logit_input_rms']:.3g}", flush=True)
  return out


def table(results) -> str:
  lines = []
  for name, r in results.items():
    lines.append(f"\n**{name}**: initial loss {r['loss']:.3f} (ln 10 = 2.303); logits rms "
                 f"{r['logit_rms']:.3g}; rms of their variation across images "
                 f"{r['logit_input_rms']:.3g} with dropout, "
                 f"{r.get('logit_input_rms_no_dropout', float('nan')):.3g} without\n")
    lines.append("| layer | rms | varying share (dropout on) | input-dependent share "
                 "(no dropout) | ReLU alive | lr*abs(g)/abs(w) |")
    lines.append("|---|---|---|---|---|---|")
    for layer, s in r["layers"].items():
      lines.append(f"| {layer} | {s['rms']:.3g} | {100 * s['input_share']:.2f}% | "
                   f"{100 * s.get('input_share_no_dropout', float('nan')):.2f}% | "
                   f"{100 * s['relu_alive']:.0f}% | {0.01 * s['grad_over_weight']:.2e} |")
  return "\n".join(lines) + "\n"


def main():
  names = sys.argv[1:] or list(VARIANTS)
  path = os.path.join(HERE, "init_stats.json")
  results = {}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  for name in names:
    cfg, over = VARIANTS[name]
    results[name] = measure(name, cfg, over)
    with open(path, "w") as f:
      json.dump(results, f, indent=1)
  with open(os.path.join(HERE, "init_stats.md"), "w") as f:
    f.write(table({k: results[k] for k in VARIANTS if k in results}))


if __name__ == "__main__":
  main()
