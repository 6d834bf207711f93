r"""Issue 19's table and plot: our runs beside the PyTorch peer's, held-out error per epoch.

  .venv/bin/python experiments/results/fidelity/peer_compare.py \
      [--ours_step_s=S --torch_step_s=T]   # CPU seconds per step of 128, measured together

Reads our runs' `train.log` ("eval at step N: top-1 error ..." lines, the ten-crop line)
under `runs/` below, and the peer's `torch_peer_gpu/<run>/log.jsonl`; writes
`peer_compare.md` (the table) and `peer_curves.png` (one plot) beside this file. With the
two step times, "time to accuracy" converts steps into CPU wall-clock for both.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
STEPS_PER_EPOCH = 66
# label -> train.log of our runs (experiments/imagenette.py; "paper": std 0.01 in conv3-5)
OURS = {
    "ours, preset, seed 0": HERE / "imagenette_run" / "train.log",
    "ours, preset, seed 1": HERE / "runs" / "preset_s1" / "train.log",
    "ours, preset, exact IDCT, seed 0": HERE / "runs" / "preset_accurate_s0" / "train.log",
    "ours, paper init, seed 0": HERE / "runs" / "paper_s0" / "train.log",
}
TORCH = {f"PyTorch, {init}, seed {s}": HERE / "torch_peer_gpu" / f"{init}_s{s}" / "log.jsonl"
         for init in ("preset", "paper") for s in range(4)}
EVAL = re.compile(r"eval at step (\d+): top-1 error ([\d.]+), top-5 error ([\d.]+)")
TEN = re.compile(r"ten-crop eval at step (\d+): top-1 error ([\d.]+), top-5 error ([\d.]+)")


def read_ours(path: pathlib.Path) -> dict | None:
  if not path.exists():
    return None
  centre, ten = {}, None
  for line in path.read_text().splitlines():
    if (m := TEN.search(line)):
      ten = (float(m.group(2)), float(m.group(3)))
    elif (m := EVAL.search(line)):
      centre[int(m.group(1))] = (float(m.group(2)), float(m.group(3)))
  return {"centre": centre, "ten": ten}


def read_torch(path: pathlib.Path) -> dict | None:
  if not path.exists():
    return None
  centre, ten = {}, None
  for line in path.read_text().splitlines():
    r = json.loads(line)
    if r["event"] == "eval":
      centre[r["step"]] = (r["top1_error"], r["top5_error"])
    elif r["event"] == "ten_crop":
      ten = (r["top1_error"], r["top5_error"])
  return {"centre": centre, "ten": ten}


def first_step_below(run: dict, error: float) -> int | None:
  return next((s for s in sorted(run["centre"]) if run["centre"][s][0] <= error), None)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--ours_step_s", type=float, default=None)
  p.add_argument("--torch_step_s", type=float, default=None)
  a = p.parse_args()
  runs = {k: r for k, r in ({k: read_ours(v) for k, v in OURS.items()}
                            | {k: read_torch(v) for k, v in TORCH.items()}).items() if r}
  epochs = list(range(1, 8))
  lines = ["| run | " + " | ".join(f"ep {e}" for e in epochs) + " | ten crops top-1 / top-5 |",
           "|---|" + "---|" * (len(epochs) + 1)]
  for name, r in runs.items():
    cells = [f"{r['centre'][e * STEPS_PER_EPOCH][0]:.1%}" if e * STEPS_PER_EPOCH in r["centre"]
             else "" for e in epochs]
    ten = f"{r['ten'][0]:.1%} / {r['ten'][1]:.1%}" if r["ten"] else "(running)"
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {ten} |")
  # Mean and spread of the peer's seeds, per init.
  summary = ["", "| group | runs | ten-crop top-1, mean +- std (min-max) | centre top-1 at epoch 7 |",
             "|---|---|---|---|"]
  groups = {"ours, preset": [k for k in runs if k.startswith("ours, preset, seed")],
            "PyTorch, preset": [k for k in runs if k.startswith("PyTorch, preset")],
            "ours, paper init": [k for k in runs if k.startswith("ours, paper")],
            "PyTorch, paper init": [k for k in runs if k.startswith("PyTorch, paper")]}
  for group, names in groups.items():
    tens = np.array([runs[n]["ten"][0] for n in names if runs[n]["ten"]])
    last = np.array([runs[n]["centre"][462][0] for n in names if 462 in runs[n]["centre"]])
    if len(tens):
      summary.append(f"| {group} | {len(tens)} | {tens.mean():.1%} +- {tens.std(ddof=1) if len(tens) > 1 else 0:.1%} "
                     f"({tens.min():.1%}-{tens.max():.1%}) | {last.mean():.1%} |")
  timing = []
  if a.ours_step_s and a.torch_step_s:
    timing = ["", f"Time to accuracy on the 2-core CPU (steps x the CPU step time measured "
              f"together: ours {a.ours_step_s:.2f} s, PyTorch {a.torch_step_s:.2f} s a step of "
              f"128; evaluation time not counted):", "",
              "| run | centre top-1 <= 60% | <= 50% | <= 40% |", "|---|---|---|---|"]
    for name, r in runs.items():
      step_s = a.ours_step_s if name.startswith("ours") else a.torch_step_s
      cells = []
      for target in (0.6, 0.5, 0.4):
        s = first_step_below(r, target)
        cells.append(f"step {s}, {s * step_s / 60:.0f} min" if s else "not reached")
      timing.append(f"| {name} | " + " | ".join(cells) + " |")
  (HERE / "peer_compare.md").write_text("\n".join(lines + summary + timing) + "\n")
  print("\n".join(lines + summary + timing))

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  colours = {"ours, preset": "tab:blue", "ours, paper": "tab:orange",
             "PyTorch, preset": "tab:green", "PyTorch, paper": "tab:red",
             "ours, preset, exact": "tab:purple"}
  for name, r in runs.items():
    key = next(k for k in sorted(colours, key=len, reverse=True) if name.startswith(k))
    steps = sorted(r["centre"])
    style = "-" if name.startswith("ours") else "--"
    first = not any(line.get_label() == key for line in ax.lines)
    ax.plot([s / STEPS_PER_EPOCH for s in steps], [r["centre"][s][0] for s in steps], style,
            color=colours[key], marker="o", ms=3, alpha=0.85, label=key if first else None)
    if r["ten"]:
      ax.plot([7.15], [r["ten"][0]], marker="*", color=colours[key], ms=8)
  ax.axhline(0.9, color="grey", lw=0.8, ls=":")
  ax.set_xlabel("epoch (66 steps of 128)")
  ax.set_ylabel("held-out top-1 error (centre crop; * ten crops)")
  ax.set_title("imagenette, 953 held-out photos: ours vs the PyTorch peer, same recipe")
  ax.set_ylim(0.2, 0.95)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(HERE / "peer_curves.png", dpi=110)


if __name__ == "__main__":
  main()
