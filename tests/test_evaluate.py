"""--mode=eval and --mode=predict end to end on one tiny trained run (no ../shared needed),
and ImageNet's class words.

  .venv/bin/python -m pytest -q tests/test_evaluate.py
"""

import glob
import importlib.util
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from alexnet_jax import cli, data
from alexnet_jax.data import demo
from alexnet_jax.run import evaluate
from experiments import demo as demo_config


_TRAINED = []  # the run, once made


def trained_run(tmp_path_factory):
  """(config, workdir): one tiny run per pytest process, also drawn by test_figures.py.
  Tests read it and write only into its eval/ and figures/ folders.

  The smoke net trained 4 steps on the demo data, checkpointed and evaluated (centre
  crop) at steps 2 and 4. The smoke net's unit biases and 0.01 stds would score every
  image alike (one class: 90% / 50% error at any step); He stds, no biases and a high
  Adam rate make predictions depend on the image and the two checkpoints differ."""
  if _TRAINED:
    return _TRAINED[0]
  workdir = str(tmp_path_factory.mktemp("run"))
  config = demo_config.get_config("smoke")
  fan_in = (11 * 11 * 3, 5 * 5 * 4, 3 * 3 * 16, 3 * 3 * 8, 3 * 3 * 8, 6 * 6 * 16, 32, 32)
  config.update_from_flattened_dict({
      "dataset.cache_dir": str(tmp_path_factory.mktemp("cache")), "num_train_steps": 4,
      "eval_every_steps": 2, "checkpoint_every_steps": 2, "keep_checkpoints": 3,
      "eval_ten_crop": False, "optim.learning_rate": 0.01, "mesh.data": 1, "mesh.model": 1,
      "model.init_weight_std": tuple(float(np.sqrt(2 / n)) for n in fan_in),
      "model.init_bias": (0.0,) * 8})
  assert cli.run("train", config, workdir) == 0
  config.lock()
  _TRAINED.append((config, workdir))
  return config, workdir


@pytest.fixture
def trained(tmp_path_factory):
  return trained_run(tmp_path_factory)


def _training_evals(workdir):
  """{step: {"top1_error": .., "top5_error": .., "loss": ..}} as the training loop logged
  them (the loss tells two checkpoints apart where 40 images' error rates may not)."""
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  acc.Reload()
  out = {}
  for key in ("top1_error", "top5_error", "loss"):
    for e in acc.Tensors(f"eval/{key}"):
      out.setdefault(e.step, {})[key] = float(tf.make_ndarray(e.tensor_proto))
  return out


def test_eval_of_an_older_step_reports_that_checkpoint(trained):
  config, workdir = trained
  logged = _training_evals(workdir)
  assert set(logged) == {2, 4}
  # The two checkpoints score differently, so the older one's report is not the latest's.
  assert logged[2] != logged[4]
  assert cli.run("eval", config, workdir, step=2) == 0
  assert os.listdir(os.path.join(workdir, "eval")) == ["2.json"]
  with open(os.path.join(workdir, "eval", "2.json")) as f:
    report = json.load(f)
  assert report["step"] == 2 and report["num_examples"] == 40
  # The training loop's evaluation of the same weights, by another code path.
  for key, value in logged[2].items():
    assert report["center_crop"][key] == pytest.approx(value), key
  assert 0.0 <= report["ten_crop"]["top5_error"] <= report["ten_crop"]["top1_error"] <= 1.0


def test_predict_on_files_outside_any_dataset(trained, tmp_path, capsys):
  config, workdir = trained
  root = demo.ensure_demo_tree(config)
  paths = sorted(glob.glob(os.path.join(root, "val", "*", "*.JPEG")))[::13][:2]
  # And a non-square JPEG and a PNG written here: any size is resized and centre-cropped.
  rng = np.random.default_rng(0)
  for name, size in (("wide.jpg", (300, 170)), ("small.png", (90, 120))):
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / name)
    paths.append(str(tmp_path / name))

  def top5(step=None):
    capsys.readouterr()
    assert cli.run("predict", config, workdir, step=step, images=paths) == 0
    out = capsys.readouterr().out
    result = {}
    for path in paths:
      lines = out.split(path + "\n")[1].splitlines()[:5]
      result[path] = [(line.split("%", 1)[1].strip(), float(line.split("%")[0]))
                      for line in lines]
    return result

  latest = top5()
  for path, rows in latest.items():
    names = [n for n, _ in rows]
    probs = [p for _, p in rows]
    assert len(set(names)) == 5 and set(names) <= set(demo.CLASS_NAMES), path
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.01, path
  assert len({tuple(rows) for rows in latest.values()}) == len(paths)  # per image
  assert top5(step=2) != latest  # --step reaches predict too
  # A missing file is a user error, not a crash.
  assert cli.run("predict", config, workdir, images=[str(tmp_path / "nope.jpg")]) == 2


def test_imagenet_words_in_tfds_label_order():
  # The wnids come from TFDS's own label list, the words from ImageNet's well-known
  # class indices (0 tench ... 999 toilet tissue), not from our resource file.
  spec = importlib.util.find_spec("tensorflow_datasets")
  with open(os.path.join(spec.submodule_search_locations[0], "datasets", "imagenet2012",
                         "labels.txt")) as f:
    wnids = f.read().split()
  words = evaluate.readable_names(wnids)
  assert len(words) == 1000
  for index, word in [(0, "tench, Tinca tinca"), (1, "goldfish, Carassius auratus"),
                      (207, "golden retriever"), (281, "tabby, tabby cat"),
                      (409, "analog clock"),
                      (999, "toilet tissue, toilet paper, bathroom tissue")]:
    assert words[index] == word, index
  assert not set(words) & set(wnids)  # every wnid has its words
  # Other folder names pass through unchanged.
  assert evaluate.readable_names(["cat", "n01440764"]) == ["cat", "tench, Tinca tinca"]


def test_predict_works_in_chunks_with_the_same_output(trained, tmp_path, capsys, monkeypatch):
  """Predict decodes and classifies config.eval_batch_size files at a time, so its memory
  does not grow with the number of files (benchmarks/predict_memory.py measures it):
  chunks of 2 give what one chunk of all the files gives, in order, unusable files too."""
  config, workdir = trained
  root = demo.ensure_demo_tree(config)
  photos = sorted(glob.glob(os.path.join(root, "val", "*", "*.JPEG")))[::9][:4]
  bad = tmp_path / "not_an_image.jpg"
  bad.write_bytes(b"no JPEG here")
  paths = [str(bad), *photos[:3], str(bad), photos[3]]
  chunks = []
  decode = data.preprocess_image_files
  monkeypatch.setattr(data, "preprocess_image_files",
                      lambda c, p, **kw: chunks.append(len(p)) or decode(c, p, **kw))

  def predict(batch):
    capsys.readouterr()
    c = config.copy_and_resolve_references()
    c.eval_batch_size = batch
    results = evaluate.predict(c, workdir, paths)
    return results, capsys.readouterr().out

  whole, whole_out = predict(64)
  chunked, chunked_out = predict(2)
  assert chunks == [6, 2, 2, 2]
  assert [len(r) for r in whole] == [0, 5, 5, 5, 0, 5]
  for a, b in zip(whole, chunked, strict=True):
    assert [n for n, _ in a] == [n for n, _ in b]
    np.testing.assert_allclose([p for _, p in a], [p for _, p in b], rtol=1e-5)

  def order(out):  # the file and skip lines; probabilities may differ in the last digit
    return [line for line in out.splitlines() if "%" not in line]

  assert order(chunked_out) == order(whole_out)
  skip = [line for line in order(whole_out) if line.startswith("  skipped: ")]
  assert order(whole_out) == [str(bad), skip[0], *photos[:3], str(bad), skip[0], photos[3]]
