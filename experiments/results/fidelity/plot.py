r"""Learning curves of the ablation runs: curves.png and curves.csv beside this file.

  .venv/bin/python experiments/results/fidelity/plot.py runs/fid

Reads DIR/NAME.json (written by curve.py), copies each into curves/NAME.json here
(small: one row per step) and plots the training loss per step (raw and a 5-step
running mean) against ln 10.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
LABELS = {  # session 3's runs (alexnet.py then had inverted dropout) and session 4's
    "paper_std03": "paper (inverted dropout) + conv3-5 std 0.03",
    "paper_std03_sat": "paper + conv3-5 std 0.03 (= imagenette.py's start)",
    "paper": "alexnet.py (paper: std 0.01, scale-at-test dropout)",
    "paper_he": "paper with He init in conv2-fc7 (conv1, fc8 0.01), zero biases",
    "paper_fanin": "paper with a variance-preserving init from the pixels on, zero biases",
    "paper_fanin_warmup": "the same with the rate warmed up over 33 steps",
    "code": "alexnet_2012_code.py",
    "code_std01": "2012 code with the paper's std 0.01",
    "code_paper_lrn": "2012 code with the paper's LRN (alpha, after ReLU)",
    "code_no_cnorm2": "2012 code without cnorm2",
    "code_paper_bias": "2012 code with the paper's bias rate and decay",
    "code_no_div": "2012 code without the /1.1 divisor",
    "code_paper_pca": "2012 code with the paper's PCA scale",
    "code_inverted": "2012 code with inverted dropout",
}


def first_clear_drop(losses, margin=0.1, window=5):
  """First step whose `window`-step running mean is below ln 10 - margin, or None."""
  for i in range(window - 1, len(losses)):
    if sum(losses[i - window + 1:i + 1]) / window < math.log(10) - margin:
      return i + 1
  return None


def main():
  src = sys.argv[1] if len(sys.argv) > 1 else "runs/fid"
  os.makedirs(os.path.join(HERE, "curves"), exist_ok=True)
  runs = {}
  for name in LABELS:
    path = os.path.join(src, f"{name}.json")
    if os.path.exists(path):
      shutil.copy(path, os.path.join(HERE, "curves", f"{name}.json"))
    path = os.path.join(HERE, "curves", f"{name}.json")
    if os.path.exists(path):
      with open(path) as f:
        runs[name] = json.load(f)
  rows = []
  for name, r in runs.items():
    losses = [c["loss"] for c in r["curve"]]
    ev = r["eval"][-1] if r["eval"] else {}
    rows.append({"run": name, "steps": len(losses),
                 "first_step_mean5_below_ln10_minus_0.1": first_clear_drop(losses),
                 "loss_last5_mean": round(sum(losses[-5:]) / min(5, len(losses)), 4),
                 "max_loss": round(max(losses), 2),
                 "val_top1_error_centre": ev.get("top1_error"), "val_at_step": ev.get("step")})
  with open(os.path.join(HERE, "curves.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  for row in rows:
    print(row)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
  for name, r in runs.items():
    losses = [c["loss"] for c in r["curve"]]
    steps = [c["step"] for c in r["curve"]]
    smooth = [sum(losses[max(0, i - 4):i + 1]) / len(losses[max(0, i - 4):i + 1])
              for i in range(len(losses))]
    axes[0 if name.startswith("paper") else 1].plot(steps, smooth, label=LABELS[name])
  for ax, title in zip(axes, ("the paper's preset, changed one way", "the 2012 code's preset, "
                              "one difference switched to the paper's")):
    ax.axhline(math.log(10), color="k", ls=":", lw=1, label="ln 10")
    ax.set_xlabel("step (batch 128)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
  axes[0].set_ylabel("training loss (5-step mean)")
  fig.tight_layout()
  fig.savefig(os.path.join(HERE, "curves.png"), dpi=110)


if __name__ == "__main__":
  main()
