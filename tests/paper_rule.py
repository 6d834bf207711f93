"""The paper's update rule by hand, for tests that check a training step against it.

`hand_sgd` is the fidelity checks' numpy rule (experiments/results/fidelity/checks.py:
v <- momentum v - weight_decay lr w - lr grad; w <- w + v, float64, per leaf), the one
tests/test_fidelity.py checks the optimizer against; loaded from its file, so there is
one statement of the rule.
"""

import importlib.util
import os

import numpy as np

_CHECKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "experiments", "results", "fidelity", "checks.py")
_spec = importlib.util.spec_from_file_location("fidelity_checks", _CHECKS)
_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_checks)
hand_sgd = _checks.hand_sgd


def flat(params):
  """{layer: {kind: array}} -> {"layer/kind": float64 numpy array} (hand_sgd's keys)."""
  return {f"{layer}/{kind}": np.asarray(x, np.float64)
          for layer, leaves in params.items() for kind, x in leaves.items()}


def nest(flat_params, dtype=np.float32):
  """The inverse of `flat`, cast to `dtype` (the parameters a model holds)."""
  out = {}
  for key, x in flat_params.items():
    layer, kind = key.split("/")
    out.setdefault(layer, {})[kind] = np.asarray(x, dtype)
  return out


def paper_sgd(params0, grads, lrs, optim_config):
  """Parameters after the steps with `grads` (flat, one dict per step) at rates `lrs`,
  from `params0` (flat), under config.optim's momentum, decay and bias options."""
  o = optim_config
  assert list(o.layer_lr_multipliers) == [1.0] * len(o.layer_lr_multipliers)
  return hand_sgd(params0, grads, lrs, momentum=o.momentum, wd=o.weight_decay,
                  bias_decay=o.bias_weight_decay, bias_lr=o.bias_lr_multiplier)
