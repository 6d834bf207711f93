"""The sweep runner: real main.py subprocesses on a 2-point smoke sweep; the ablations file.

  .venv/bin/python -m pytest -q tests/test_sweep.py

Expected: all pass in about 2-3 minutes on 2 cores (two 2-step training runs).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap

import pytest
from absl import app

from alexnet_jax.tools import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SWEEP_FILE = textwrap.dedent('''
    def get_sweep(variant=""):
      return {
          "title": "smoke sweep",
          "config": "experiments/alexnet.py",
          "config_variant": "smoke",
          "reference_sources": {"paper": "the paper"},
          "points": [
              {"name": "baseline", "overrides": {},
               "reference": {"paper": {"top1": 40.7, "top5": 18.2}}},
              {"name": "no_lrn", "overrides": {"model.lrn.enabled": False},
               "description": "LRN off", "note": "a note",
               "reference": {"paper": {"delta_top1": 1.4, "delta_top5": 1.2}}},
          ],
      }
''')


def _sweep_cmd(tmp_path, *extra: str) -> list[str]:
  return [sys.executable, "-m", "alexnet_jax.tools.sweep", f"--sweep={tmp_path / 'smoke_sweep.py'}",
          f"--workdir={tmp_path / 'sweep'}", f"--config.dataset.cache_dir={tmp_path / 'cache'}",
          *extra]


@pytest.fixture
def sweep_file(tmp_path):
  (tmp_path / "smoke_sweep.py").write_text(SWEEP_FILE)
  return tmp_path


def test_format_value_round_trips_through_config_flags():
  assert sweep.format_value(False) == "False"
  assert sweep.format_value((16, 32, 48)) == "(16,32,48)"
  assert sweep.format_value((3,)) == "(3,)"
  assert sweep.format_value(0.0) == "0.0"
  assert sweep.format_value("tanh") == "tanh"
  assert sweep.override_flags({"model.towers": 1}) == ["--config.model.towers=1"]


def test_split_config_flags():
  own, passed = sweep.split_config_flags(["prog", "--sweep=x", "--config.a.b=1", "--workdir=w"])
  assert own == ["prog", "--sweep=x", "--workdir=w"] and passed == ["--config.a.b=1"]
  with pytest.raises(app.UsageError):
    sweep.split_config_flags(["prog", "--config.a.b", "1"])


def test_ablations_file_points_and_one_tower_widths():
  for variant, widths in (("", (48, 128, 192, 192, 256)), ("demo", (16, 32, 48, 48, 64))):
    s = sweep.load_sweep(f"experiments/ablations.py:{variant}" if variant
                         else "experiments/ablations.py")
    points = {p["name"]: p for p in s["points"]}
    dropout = "no_dropout" if variant == "" else "with_dropout"  # the demo has none
    assert list(points) == ["baseline", "no_lrn", "non_overlapping_pool", "one_tower",
                            dropout, "tanh"]
    one = points["one_tower"]["overrides"]
    assert one["model.towers"] == 1 and one["mesh.model"] == 1
    assert one["model.conv_features"] == widths
    sweep.check_overrides(s, [])  # every override names a real field, with a valid value
  assert sweep.config_arg(sweep.load_sweep("experiments/ablations.py:smoke")) == \
      "experiments/alexnet.py:smoke"


def test_misspelt_override_fails_before_running():
  s = sweep.load_sweep("experiments/ablations.py:smoke")
  with pytest.raises(app.UsageError, match="lrnx"):
    sweep.check_overrides(s, ["--config.model.lrnx.enabled=False"])


def test_print_only_prints_one_command_per_point(sweep_file):
  out = subprocess.run(_sweep_cmd(sweep_file, "--print_only"), cwd=REPO, capture_output=True,
                       text=True, check=True).stdout.strip().splitlines()
  assert len(out) == 2
  assert all(line.startswith("python main.py --workdir=") for line in out)
  assert "--config=experiments/alexnet.py:smoke" in out[0]
  assert out[1].endswith("--config.model.lrn.enabled=False")
  assert all("--config.dataset.cache_dir=" in line for line in out)
  assert not (sweep_file / "sweep").exists()  # printing runs and writes nothing


@pytest.mark.slow
def test_sweep_runs_points_tabulates_and_skips_finished_ones(sweep_file):
  # Sweep-wide flags reach every point; no ten-crop eval keeps it short (and tests the
  # centre-crop fallback of the table).
  cmd = _sweep_cmd(sweep_file, "--config.eval_ten_crop=False")
  first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  wd = sweep_file / "sweep"
  finals = [wd / name / "final_metrics.json" for name in ("baseline", "no_lrn")]
  assert all(f.is_file() for f in finals)
  for name in ("results.md", "results.csv", "results.png", "commands.sh"):
    assert (wd / name).is_file(), name
  table = (wd / "results.md").read_text()
  assert "`baseline`" in table and "`no_lrn`" in table and "centre crop" in table
  assert "40.7 / 18.2" in table and "(+1.4 / +1.2)" in table and "a note" in table
  with open(wd / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["name"] for r in rows] == ["baseline", "no_lrn"]
  assert all(r["status"] == "finished" and r["step"] == "2" for r in rows)
  assert 0.0 <= float(rows[1]["top1"]) <= 100.0 and float(rows[0]["paper_top1"]) == 40.7
  assert (wd / "no_lrn" / "config.json").read_text().count('"enabled": false') >= 1

  mtimes = [os.stat(f).st_mtime_ns for f in finals]
  second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  assert second.returncode == 0, second.stderr[-3000:]
  assert second.stdout.count("finished, skipped") == 2
  assert "main.py" not in second.stdout  # no point was launched again
  assert [os.stat(f).st_mtime_ns for f in finals] == mtimes
  assert (wd / "results.md").read_text() == table
