"""The sweep runner on a 2-point smoke sweep (the sweep in this process, its point a real
main.py subprocess, as the runner launches it); the ablations file.

  .venv/bin/python -m pytest -q tests/test_sweep.py

Expected: all pass in about a minute on 2 cores (one 2-step training run in main.py; the
other point is the session's finished smoke run, copied in).
"""

from __future__ import annotations

import csv
import os
import shutil
import textwrap

import pytest
from absl import app
from absl.testing import flagsaver

from alexnet_jax.tools import sweep
from conftest import SMOKE_GEOMETRY, SMOKE_STEPS

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
              {"name": "no_flip", "overrides": {"input.flip": False},
               "description": "no flips", "note": "a note",
               "reference": {"paper": {"delta_top1": 1.4, "delta_top5": 1.2}}},
          ],
      }
''')


def _sweep_flags(tmp_path, cache_dir, *extra: str) -> list[str]:
  return [f"--sweep={tmp_path / 'smoke_sweep.py'}", f"--workdir={tmp_path / 'sweep'}",
          f"--config.dataset.cache_dir={cache_dir}", *extra]


@pytest.fixture
def run_sweep(capsys):
  """`python -m alexnet_jax.tools.sweep ARGS` in this process (its flag parsing and main;
  the global absl flags restored after) -> (exit status, stdout)."""
  def run(*argv: str) -> tuple[int, str]:
    capsys.readouterr()
    with flagsaver.flagsaver():
      code = sweep.main(sweep._parse_flags(["sweep", *argv]))  # what app.run calls
    return code, capsys.readouterr().out

  return run


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


def test_print_only_prints_one_command_per_point(sweep_file, run_sweep):
  code, out = run_sweep(*_sweep_flags(sweep_file, sweep_file / "cache"), "--print_only")
  out = out.strip().splitlines()
  assert code == 0 and len(out) == 2
  assert all(line.startswith("python main.py --workdir=") for line in out)
  assert "--config=experiments/alexnet.py:smoke" in out[0]
  assert out[1].endswith("--config.input.flip=False")
  assert all("--config.dataset.cache_dir=" in line for line in out)
  assert not (sweep_file / "sweep").exists()  # printing runs and writes nothing


@pytest.mark.slow
def test_sweep_runs_points_tabulates_and_skips_finished_ones(sweep_file, run_sweep, smoke_cache,
                                                             finished_run, monkeypatch):
  """The baseline point is the session's finished smoke run (4 steps, ten crops), copied
  in: the sweep skips it and launches main.py for the other point only, as a subprocess,
  with the shared run's geometry and one-device mesh (neither under test) and an override
  that changes no computation, so that its compilations come from the session's cache."""
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  wd = sweep_file / "sweep"
  shutil.copytree(finished_run, wd / "baseline")
  # Sweep-wide flags reach the point; no ten-crop eval keeps it short (and tests the
  # centre-crop fallback of the table).
  flags = _sweep_flags(sweep_file, smoke_cache, "--config.eval_ten_crop=False",
                       "--config.mesh.data=1", "--config.mesh.model=1",
                       *(f"--config.{k}={v}" for k, v in SMOKE_GEOMETRY.items()))
  code, out = run_sweep(*flags)
  assert code == 0, out[-3000:]
  assert "[sweep] baseline: finished, skipped" in out
  (launch,) = [line for line in out.splitlines() if "main.py" in line]
  assert launch.startswith("[sweep] no_flip: ") and "--config.eval_ten_crop=False" in launch
  finals = [wd / name / "final_metrics.json" for name in ("baseline", "no_flip")]
  assert all(f.is_file() for f in finals)
  for name in ("results.md", "results.csv", "results.png", "commands.sh"):
    assert (wd / name).is_file(), name
  table = (wd / "results.md").read_text()
  assert "`baseline`" in table and "`no_flip`" in table and "centre crop" in table
  assert "40.7 / 18.2" in table and "(+1.4 / +1.2)" in table and "a note" in table
  with open(wd / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["name"] for r in rows] == ["baseline", "no_flip"]
  assert all(r["status"] == "finished" for r in rows)
  assert [r["step"] for r in rows] == [str(SMOKE_STEPS), "2"]
  assert [r["eval"] for r in rows] == ["10 crops", "centre crop"]
  assert 0.0 <= float(rows[1]["top1"]) <= 100.0 and float(rows[0]["paper_top1"]) == 40.7
  assert '"flip": false' in (wd / "no_flip" / "config.json").read_text()

  mtimes = [os.stat(f).st_mtime_ns for f in finals]
  code, out = run_sweep(*flags)
  assert code == 0, out[-3000:]
  assert out.count("finished, skipped") == 2
  assert "main.py" not in out  # no point was launched again
  assert [os.stat(f).st_mtime_ns for f in finals] == mtimes
  assert (wd / "results.md").read_text() == table
