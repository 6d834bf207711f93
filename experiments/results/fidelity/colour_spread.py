"""Per-kernel spread of the conv1 colour metric (Figure 3) and a permutation test of the
towers' difference, at initialisation and at a run's last checkpoint (issue 13).

  .venv/bin/python experiments/results/fidelity/colour_spread.py runs/imagenette_s4 > \
      experiments/results/fidelity/imagenette_run/conv1_colour_spread.json
"""

import json
import os
import sys

import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..")))

from alexnet_jax import checkpoint, parallel, steps  # noqa: E402
from alexnet_jax.tools import figures  # noqa: E402


def spread(kernels: np.ndarray, permutations: int = 20_000) -> dict:
  """kernels: conv1's [T, kh, kw, 3, K]. Mean, sd and standard error per tower, and the
  share of random splits of all 2K kernels whose tower means differ at least as much."""
  c = figures.colour_specificity(kernels)  # [T, K]
  out = {f"tower_{t + 1}": {"mean": float(c[t].mean()), "sd": float(c[t].std(ddof=1)),
                            "se": float(c[t].std(ddof=1) / np.sqrt(c.shape[1])),
                            "n": int(c.shape[1])} for t in range(c.shape[0])}
  a, b = c[0], c[1]
  both, d = np.concatenate([a, b]), a.mean() - b.mean()
  rng = np.random.default_rng(0)
  shuffled = np.stack([rng.permutation(both) for _ in range(permutations)])
  null = np.abs(shuffled[:, :len(a)].mean(1) - shuffled[:, len(a):].mean(1))
  out["diff_tower1_minus_tower2"] = float(d)
  out["permutation_p_two_sided"] = float(np.mean(null >= abs(d)))
  return out


def main(workdir: str) -> None:
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.mesh.data, config.mesh.model = 1, 1
  layout = steps.state_layout(config, parallel.make_mesh(config, jax.devices()[:1]))
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  last = jax.device_get(ckpt.restore(layout.abstract))
  init = jax.device_get(steps.create_train_state(config, layout))  # same seed: the run's init
  print(json.dumps({"init": spread(np.asarray(init.params["conv1"]["kernel"])),
                    f"step_{int(last.step)}": spread(np.asarray(last.params["conv1"]["kernel"]))},
                   indent=1))


if __name__ == "__main__":
  main(sys.argv[1])
