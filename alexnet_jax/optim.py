"""The paper's SGD and learning-rate schedules, as optax transformations.

The paper's rule (section 5), with lr inside the momentum buffer:

    v <- momentum * v - weight_decay * lr * w - lr * grad
    w <- w + v

is `chain(add_decayed_weights, scale_by_learning_rate, trace)`: decay, then
the learning rate, then momentum. (`optax.sgd` scales after momentum, which
differs from the paper whenever the rate changes.) The 2012 code's bias options
(no decay, 2x rate) are a `multi_transform` over kernel and bias leaves.

The learning rate is an injected hyperparameter, set every step to
`make_schedule(...)(step, plateau)` = base schedule x plateau scale; the plateau state (the paper's "divide
by 10 when the validation error stops improving") is optax's
`reduce_on_plateau` state, fed validation top-1 error at each evaluation and
kept in the train state so it survives checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
import optax.contrib

from alexnet_jax import model as model_lib


def _leaf_label(path, _) -> str:
  """'<layer>/<kernel|bias>' for a parameter leaf."""
  layer, leaf = path[0].key, path[-1].key
  return f"{layer}/{'bias' if leaf == 'bias' else 'kernel'}"


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The paper's SGD with an injected `learning_rate` (set by the train step).

  Per leaf, before the learning rate: weight decay (biases optional) and a
  constant multiplier = the layer's `layer_lr_multipliers` entry (cuda-convnet's
  per-layer epsW) times `bias_lr_multiplier` for biases.
  """
  o = config.optim
  multipliers = dict(zip(model_lib.LAYERS, o.layer_lr_multipliers, strict=True))

  def per_leaf(layer: str, kind: str) -> optax.GradientTransformation:
    decay = o.weight_decay if (kind == "kernel" or o.bias_weight_decay) else 0.0
    scale = multipliers[layer] * (o.bias_lr_multiplier if kind == "bias" else 1.0)
    return optax.chain(optax.add_decayed_weights(decay), optax.scale(scale))

  def paper_sgd(learning_rate):
    per_kind = optax.multi_transform(
        {f"{layer}/{kind}": per_leaf(layer, kind)
         for layer in model_lib.LAYERS for kind in ("kernel", "bias")},
        lambda params: jax.tree_util.tree_map_with_path(_leaf_label, params))
    if o.optimizer == "adam":  # not the paper's: for small fast demos (see demo.py)
      return optax.chain(per_kind, optax.scale_by_adam(), optax.scale_by_learning_rate(
          learning_rate))
    return optax.chain(per_kind, optax.scale_by_learning_rate(learning_rate),
                       optax.trace(decay=o.momentum))

  return optax.inject_hyperparams(paper_sgd)(learning_rate=o.learning_rate)


def set_learning_rate(opt_state, learning_rate: jax.Array):
  """The injected-hyperparameter state with a new learning rate."""
  hyperparams = dict(opt_state.hyperparams, learning_rate=learning_rate)
  return opt_state._replace(hyperparams=hyperparams)


# The learning rate of a step: schedule(step, plateau_state) -> float32 [].
Schedule = Callable[[jax.Array, Any], jax.Array]


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Schedule:
  """The whole learning-rate rule: base schedule (constant or piecewise, with warm-up)
  times the plateau state's scale (1 unless `optim.schedule == "plateau"` lowered it)."""
  o = config.optim
  if o.schedule == "piecewise":
    boundaries = {round(e * steps_per_epoch): o.decay_factor for e in o.boundaries_epochs}
    base = optax.piecewise_constant_schedule(o.learning_rate, boundaries)
  else:
    base = optax.constant_schedule(o.learning_rate)
  warmup_steps = round(o.warmup_epochs * steps_per_epoch)

  def schedule(step: jax.Array, plateau_state) -> jax.Array:
    rate = base(step) * plateau_state.scale
    if warmup_steps:
      rate = rate * jnp.minimum(1.0, (step + 1) / warmup_steps)
    return rate

  return schedule


def make_plateau(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  """Divide by `decay_factor` after `plateau_patience` evaluations without improvement.

  Improvement means top-1 error falling by more than `plateau_min_delta`; the
  scale stops at decay_factor ** plateau_max_reductions.
  """
  o = config.optim
  return optax.contrib.reduce_on_plateau(
      factor=o.decay_factor, patience=o.plateau_patience, rtol=0.0, atol=o.plateau_min_delta,
      cooldown=0, accumulation_size=1, min_scale=o.decay_factor ** o.plateau_max_reductions)


def plateau_update(config: ml_collections.ConfigDict, state, validation_error: float):
  """Feed one evaluation's top-1 error to the plateau state (only under "plateau")."""
  if config.optim.schedule != "plateau":
    return state
  _, state = make_plateau(config).update(jnp.zeros(()), state, value=validation_error)
  return state
