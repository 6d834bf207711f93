"""Issue 13's cheap checks: the paper's update rule by hand, the hold-out split, and the
imagenette preset's deviations from the paper (each named in its docstring)."""

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIDELITY = os.path.join(ROOT, "experiments", "results", "fidelity")


def test_optimizer_matches_the_paper_rule_by_hand():
  sys.path.insert(0, FIDELITY)
  try:
    import checks
    checks.RESULTS.clear()
    checks.check_update()
    assert checks.RESULTS and all(r["ok"] for r in checks.RESULTS.values()), checks.RESULTS
  finally:
    sys.path.remove(FIDELITY)


def test_holdout_split_is_deterministic_and_disjoint(tmp_path):
  from alexnet_jax.data import holdout
  src = tmp_path / "src"
  for cls, n in (("a", 10), ("b", 3)):
    (src / cls).mkdir(parents=True)
    for i in range(n):
      (src / cls / f"{i:03d}.JPEG").write_bytes(b"x")
  (src / "b" / "notes.txt").write_text("not an image")
  counts = holdout.make(str(src), str(tmp_path / "dst"), fraction=0.1)
  assert counts == {"train": 9 + 2, "val": 1 + 1}
  assert sorted(os.listdir(tmp_path / "dst" / "val" / "a")) == ["009.JPEG"]
  assert sorted(os.listdir(tmp_path / "dst" / "val" / "b")) == ["002.JPEG"]
  assert os.path.realpath(tmp_path / "dst" / "train" / "a" / "000.JPEG") == str(
      src / "a" / "000.JPEG")
  assert holdout.make(str(src), str(tmp_path / "dst"), fraction=0.1) == counts  # rerun: no-op
  with pytest.raises(ValueError, match="was made from"):
    holdout.make(str(src), str(tmp_path / "dst"), fraction=0.2)


def test_imagenette_preset_deviates_from_the_paper_only_where_documented():
  from experiments import alexnet, imagenette
  paper, ours = alexnet.get_config(), imagenette.get_config()
  flat = lambda c: {k: v for k, v in _flatten(c.to_dict()).items()}  # noqa: E731
  a, b = flat(paper), flat(ours)
  changed = {k for k in a if a[k] != b[k]}
  assert changed <= {
      "dataset.name", "dataset.image_folder", "model.num_classes", "model.init_weight_std",
      "input.square_cache", "microbatch_size", "optim.schedule",
      "optim.boundaries_epochs", "num_epochs", "eval_every_steps", "eval_batch_size",
      "checkpoint_every_steps", "log_every_steps", "figures.max_train_images"}, changed
  # The paper's SGD, architecture and augmentation are untouched.
  for k in ("optim.optimizer", "optim.learning_rate", "optim.momentum", "optim.weight_decay",
            "batch_size", "model.towers", "model.lrn.alpha_over_n", "input.pca_jitter",
            "input.pca_scale", "model.init_bias", "eval_ten_crop"):
    assert a[k] == b[k], k
  assert np.allclose(b["model.init_weight_std"], (0.01, 0.01, 0.03, 0.03, 0.03, 0.01, 0.01, 0.01))
  assert b["model.dropout_style"] == "scale_at_test"
  for phrase in ("conv3-5 weight std 0.03", "scale_at_test", "schedule:", "held out"):
    assert phrase in imagenette.__doc__, phrase


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
