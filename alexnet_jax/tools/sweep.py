r"""Flag sweeps: run one config file at several points, each a set of --config.* overrides.

  python -m alexnet_jax.tools.sweep --sweep=experiments/ablations.py[:variant] --workdir=runs/abl \
      [--config.a.b=value ...] [--print_only]

A sweep file (e.g. `experiments/ablations.py`) defines `get_sweep(variant: str = "")`
returning a dict:

  {"config": "experiments/alexnet.py",       # base config file, relative to the repo root
   "config_variant": "",                     # its variant ("smoke", ...); "" for none
   "title": "...",                           # heading of results.md (optional)
   "reference_sources": {"paper": "the paper, ILSVRC-2012 val", ...},  # optional
   "points": [
     {"name": "no_lrn",                      # the point's workdir is WORKDIR/no_lrn
      "overrides": {"model.lrn.enabled": False},   # --config.model.lrn.enabled=False
      "description": "LRN off",             # optional
      "reference": {"paper": {"top1": 42.1, "top5": 19.4, "delta_top1": 1.4}},  # optional, %
      "note": "..."},                        # optional footnote
     ...]}

Each point runs as the real command line a cluster user would type, a subprocess of the
repo's `main.py` in the repo root:

  python main.py --workdir=WORKDIR/<name> --config=<config>[:variant] \
      <--config.* flags given to the sweep> <the point's overrides>

(point overrides come last, so they win over sweep-wide ones). Points run one after
another. A point whose WORKDIR/<name>/final_metrics.json exists is finished and is
skipped; an interrupted one is rerun with the same command, and main.py resumes it from
its checkpoints. Every override is checked against the base config (a misspelt field or a
value of the wrong type) before anything runs.

Outputs in WORKDIR: `commands.sh` (every point's command), and after the runs
`results.md` (a Markdown table: ours, the change against the first point, and beside them
the reference numbers of the sweep file), `results.csv` (the same numbers, in percent) and
`results.png` (top-1 and top-5 error per point). Our numbers are the ten-crop ones when the
run evaluated ten crops (as the paper's are), else the centre crop's.

`--print_only` prints each point's command, one line each, and runs nothing.

Expected: `python -m alexnet_jax.tools.sweep --sweep=experiments/ablations.py:smoke
--workdir=/tmp/abl` runs six 2-step points in about a minute each on a 2-core CPU and
writes /tmp/abl/results.{md,csv,png}; running it again prints "finished, skipped" six
times and rewrites the tables without training.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from alexnet_jax import config_files

FLAGS = flags.FLAGS
flags.DEFINE_string("sweep", None, "Sweep file, optionally with a variant: path.py[:variant].")
flags.DEFINE_string("workdir", None, "Directory of the sweep; point P runs in WORKDIR/P.")
flags.DEFINE_bool("print_only", False, "Print each point's command line; run nothing.")
flags.DEFINE_list("only", [], "Run (and tabulate) only these points, by name.")

REPO_ROOT = config_files.REPO_ROOT
MAIN = "main.py"  # relative to REPO_ROOT, where the commands run
FINAL_METRICS = "final_metrics.json"
# Metric keys of final_metrics.json, best first: the paper's numbers are ten-crop ones.
PRIMARY_METRICS = (("ten_crop_top1_error", "ten_crop_top5_error"), ("top1_error", "top5_error"))


# ------------------------------------------------------------------ the sweep file


def load_sweep(spec: str) -> dict[str, Any]:
  """`path.py[:variant]` -> the dict its get_sweep(variant) returns, checked."""
  path, _, variant = spec.partition(":")
  module = config_files.load_module(path)
  sweep = module.get_sweep(variant) if variant else module.get_sweep()
  points = sweep.get("points") or []
  names = [p["name"] for p in points]
  if not points or "config" not in sweep:
    raise ValueError(f"{path}: get_sweep() must return 'config' and a non-empty 'points'")
  if len(set(names)) != len(names):
    raise ValueError(f"{path}: point names repeat: {names}")
  for name in names:
    if not name or "/" in name or name.startswith("."):
      raise ValueError(f"{path}: point name {name!r} is not a plain folder name")
  return sweep


def config_arg(sweep: dict[str, Any]) -> str:
  """The --config value of the sweep's base: path[:variant]."""
  variant = sweep.get("config_variant", "")
  return f"{sweep['config']}:{variant}" if variant else sweep["config"]


def format_value(value: Any) -> str:
  """A Python value as ml_collections' config flags parse it back."""
  if isinstance(value, (tuple, list)):
    inner = ",".join(format_value(v) if not isinstance(v, str) else repr(v) for v in value)
    return f"({inner}{',' if len(value) == 1 else ''})"
  if isinstance(value, float):
    return repr(value)
  return str(value)  # bool -> True/False, int, str as is


def override_flags(overrides: dict[str, Any]) -> list[str]:
  return [f"--config.{key}={format_value(value)}" for key, value in overrides.items()]


def command(sweep: dict[str, Any], point: dict[str, Any], workdir: str,
            extra_flags: Sequence[str] = (), python: str = "python") -> list[str]:
  """The argv of one point: main.py in the repo root, sweep-wide flags, then the point's."""
  return [python, MAIN, f"--workdir={os.path.join(workdir, point['name'])}",
          f"--config={config_arg(sweep)}", *extra_flags,
          *override_flags(point.get("overrides", {}))]


def check_overrides(sweep: dict[str, Any], extra_flags: Sequence[str]) -> None:
  """Parses every point's flags against the base config: a misspelt field fails here."""
  from ml_collections import config_flags

  cwd = os.getcwd()
  os.chdir(REPO_ROOT)  # the config path is relative to the repo root, as in the commands
  try:
    for point in sweep["points"]:
      argv = ["sweep", f"--config={config_arg(sweep)}", *extra_flags,
              *override_flags(point.get("overrides", {}))]
      fv = flags.FlagValues()
      # sys_argv: the flag finds its overrides there, not in this process's sys.argv.
      config_flags.DEFINE_config_file("config", None, "base config", flag_values=fv,
                                      lock_config=True, sys_argv=argv)
      try:
        fv(argv)
        _ = fv.config  # the overrides are applied (and checked) on first access
      except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise app.UsageError(f"point {point['name']!r}: {message}") from err
  finally:
    os.chdir(cwd)


# ------------------------------------------------------------------ running


def workdir_for_commands(workdir: str) -> str:
  """WORKDIR as the commands (run in the repo root) must spell it."""
  absolute = os.path.abspath(workdir)
  relative = os.path.relpath(absolute, REPO_ROOT)
  return absolute if relative.startswith("..") else relative


def read_final(point_dir: str) -> dict[str, Any] | None:
  path = os.path.join(point_dir, FINAL_METRICS)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_points(sweep: dict[str, Any], workdir: str, extra_flags: Sequence[str],
               only: Sequence[str] = ()) -> dict[str, str]:
  """Runs the unfinished points in order; {name: status} with status finished|failed|..."""
  cmd_workdir = workdir_for_commands(workdir)
  status = {}
  for point in sweep["points"]:
    name = point["name"]
    if only and name not in only:
      continue
    point_dir = os.path.join(workdir, name)
    if read_final(point_dir) is not None:
      print(f"[sweep] {name}: finished, skipped", flush=True)
      status[name] = "finished"
      continue
    argv = command(sweep, point, cmd_workdir, extra_flags, python=sys.executable)
    print(f"[sweep] {name}: {shlex.join(argv)}", flush=True)
    started = time.perf_counter()
    rc = subprocess.run(argv, cwd=REPO_ROOT, check=False).returncode
    minutes = (time.perf_counter() - started) / 60
    if rc != 0:
      print(f"[sweep] {name}: FAILED (exit {rc}) after {minutes:.1f} min", flush=True)
      status[name] = f"failed (exit {rc})"
    elif read_final(point_dir) is None:
      # main.py exits 0 without final metrics only when it was stopped (SIGTERM/Ctrl-C,
      # which reached this process group too): stop the sweep; a rerun resumes the point.
      print(f"[sweep] {name}: stopped; rerun the same command to resume", flush=True)
      status[name] = "stopped"
      break
    else:
      print(f"[sweep] {name}: done in {minutes:.1f} min", flush=True)
      status[name] = "finished"
  return status


# ------------------------------------------------------------------ results


def primary(final: dict[str, Any]) -> tuple[float, float, str]:
  """(top-1, top-5) error in % and which evaluation they come from."""
  for (k1, k5), label in zip(PRIMARY_METRICS, ("10 crops", "centre crop"), strict=True):
    if k1 in final and k5 in final:
      return 100 * final[k1], 100 * final[k5], label
  raise KeyError(f"no top-1/top-5 error in {sorted(final)}")


def collect(sweep: dict[str, Any], workdir: str,
            status: dict[str, str] | None = None) -> list[dict[str, Any]]:
  """One row per point: our numbers (%), deltas against the first point, references."""
  status = status or {}
  rows = []
  for point in sweep["points"]:
    name = point["name"]
    final = read_final(os.path.join(workdir, name))
    row: dict[str, Any] = {"name": name, "description": point.get("description", ""),
                           "overrides": " ".join(override_flags(point.get("overrides", {}))),
                           "status": "finished" if final else status.get(name, "not run")}
    if final:
      row["top1"], row["top5"], row["eval"] = primary(final)
      row["centre_top1"] = 100 * final["top1_error"]
      row["centre_top5"] = 100 * final["top5_error"]
      row["loss"] = final.get("loss")
      row["step"] = final.get("step")
    for source, ref in (point.get("reference") or {}).items():
      for key in ("top1", "top5", "delta_top1", "delta_top5"):
        if ref.get(key) is not None:
          row[f"{source}_{key}"] = ref[key]
    rows.append(row)
  base = rows[0]
  for row in rows:
    if "top1" in row and "top1" in base:
      row["delta_top1"] = row["top1"] - base["top1"]
      row["delta_top5"] = row["top5"] - base["top5"]
  return rows


def _pair(a: float | None, b: float | None, fmt: str = "{:.2f}") -> str:
  if a is None and b is None:
    return ""
  return " / ".join("–" if v is None else fmt.format(v) for v in (a, b))


def _signed_pair(a: float | None, b: float | None) -> str:
  return _pair(a, b, "{:+.2f}")


def markdown(sweep: dict[str, Any], rows: list[dict[str, Any]]) -> str:
  """results.md: a table of ours beside the sweep file's reference numbers."""
  sources = sweep.get("reference_sources") or {}
  used = [s for s in sources if any(f"{s}_top1" in r or f"{s}_delta_top1" in r for r in rows)]
  evals = sorted({r["eval"] for r in rows if "eval" in r}) or ["-"]
  head = ["point", "change", f"ours top-1 / top-5 ({', '.join(evals)})",
          f"ours Δ vs {rows[0]['name']}", "centre crop top-1 / top-5"]
  head += [f"{s}: top-1 / top-5 (Δ)" for s in used] + ["steps", "status"]
  lines = [f"# {sweep.get('title', 'Sweep results')}", "",
           f"Base config: `{config_arg(sweep)}`. Errors in %; Δ = point minus "
           f"`{rows[0]['name']}` (positive: the change hurts).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [f"`{r['name']}`", r["description"] or r["overrides"] or "-",
             _pair(r.get("top1"), r.get("top5")),
             _signed_pair(r.get("delta_top1"), r.get("delta_top5")),
             _pair(r.get("centre_top1"), r.get("centre_top5"))]
    for s in used:
      absolute = _pair(r.get(f"{s}_top1"), r.get(f"{s}_top5"), "{:g}")
      delta = _pair(r.get(f"{s}_delta_top1"), r.get(f"{s}_delta_top5"), "{:+g}")
      cells.append(" ".join(x for x in (absolute, f"({delta})" if delta else "") if x))
    cells += [str(r.get("step", "")), r["status"]]
    lines.append("| " + " | ".join(cells) + " |")
  if used:
    lines += ["", "Reference columns:"]
    lines += [f"- {s}: {sources[s]}" for s in used]
  notes = [(p["name"], p["note"]) for p in sweep["points"] if p.get("note")]
  if notes:
    lines += ["", "Notes:"] + [f"- `{name}`: {note}" for name, note in notes]
  lines += ["", "Overrides of each point (after the sweep-wide flags):", ""]
  lines += [f"- `{r['name']}`: `{r['overrides'] or '(none)'}`" for r in rows]
  return "\n".join(lines) + "\n"


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
  fixed = ["name", "description", "overrides", "status", "step", "eval", "top1", "top5",
           "delta_top1", "delta_top5", "centre_top1", "centre_top5", "loss"]
  extra = sorted({k for r in rows for k in r} - set(fixed))
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fixed + extra)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})


def bar_plot(sweep: dict[str, Any], rows: list[dict[str, Any]], path: str) -> None:
  """results.png: our top-1 and top-5 error per point, the first point's as lines."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.5), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  xs = range(len(rows))
  width = 0.38
  for offset, key, colour in ((-width / 2, "top1", "#1f77b4"), (width / 2, "top5", "#ff7f0e")):
    values = [r.get(key, 0.0) for r in rows]
    bars = ax.bar([x + offset for x in xs], values, width, color=colour,
                  label=f"{key[:3]}-{key[3:]} error")
    for bar, r in zip(bars, rows, strict=True):
      label = f"{r[key]:.1f}" if key in r else r["status"]
      ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                  va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    if key in rows[0]:
      ax.axhline(rows[0][key], color=colour, lw=0.8, ls="--")
  ax.set_xticks(list(xs), [r["name"] for r in rows], rotation=20, ha="right")
  evals = ", ".join(sorted({r["eval"] for r in rows if "eval" in r}))
  ax.set_ylabel(f"error, % ({evals})" if evals else "error, %")
  ax.set_title(sweep.get("title", "Sweep results"), fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(True, axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)


def write_results(sweep: dict[str, Any], workdir: str,
                  status: dict[str, str] | None = None) -> list[dict[str, Any]]:
  """results.md, results.csv and results.png in workdir; returns the rows."""
  rows = collect(sweep, workdir, status)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(markdown(sweep, rows))
  write_csv(rows, os.path.join(workdir, "results.csv"))
  bar_plot(sweep, rows, os.path.join(workdir, "results.png"))
  return rows


# ------------------------------------------------------------------ main


def split_config_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(the sweep's own argv, the --config.* flags passed on to every point)."""
  own, passed = [argv[0]], []
  for arg in argv[1:]:
    if arg.startswith("--config."):
      if "=" not in arg:
        raise app.UsageError(f"write {arg}=VALUE (with '='): sweep flags pass on verbatim")
      passed.append(arg)
    else:
      own.append(arg)
  return own, passed


def _parse_flags(argv: list[str]) -> list[str]:
  own, passed = split_config_flags(argv)
  FLAGS(own)
  return [argv[0], *passed]


def main(argv: Sequence[str]) -> int:
  extra_flags = list(argv[1:])
  if not FLAGS.sweep or not FLAGS.workdir:
    raise app.UsageError("--sweep and --workdir are required")
  sweep = load_sweep(FLAGS.sweep)
  unknown = set(FLAGS.only) - {p["name"] for p in sweep["points"]}
  if unknown:
    raise app.UsageError(f"--only: no such point(s) {sorted(unknown)}")
  check_overrides(sweep, extra_flags)
  cmd_workdir = workdir_for_commands(FLAGS.workdir)
  commands = [shlex.join(command(sweep, p, cmd_workdir, extra_flags)) for p in sweep["points"]
              if not FLAGS.only or p["name"] in FLAGS.only]
  if FLAGS.print_only:
    print("\n".join(commands))
    return 0
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, "commands.sh"), "w") as f:
    f.write(f"# Run from {REPO_ROOT}; written by python -m alexnet_jax.tools.sweep "
            f"--sweep={FLAGS.sweep}\n" + "\n".join(commands) + "\n")
  status = run_points(sweep, FLAGS.workdir, extra_flags, FLAGS.only)
  write_results(sweep, FLAGS.workdir, status)
  print(f"[sweep] results: {os.path.join(FLAGS.workdir, 'results.md')} (.csv, .png)")
  return 0 if all(s == "finished" for s in status.values()) else 1


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
