"""The built-in demo data: deterministic, real JPEGs in an image-folder tree, drawn once."""

import os

import numpy as np
from PIL import Image

from alexnet_jax import data as ip
from alexnet_jax.data import demo
from experiments.alexnet import get_config


def demo_config(cache_dir):
  c = get_config("smoke")
  c.dataset.cache_dir = str(cache_dir)
  c.dataset.demo_train_per_class = 6
  c.dataset.demo_val_per_class = 2
  c.dataset.demo_image_size = 64
  return c


def tree_files(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, fs in os.walk(root) for f in fs)


def test_demo_tree_is_deterministic_real_jpegs_drawn_once(tmp_path, monkeypatch):
  drawn = []
  draw = demo.draw_example
  monkeypatch.setattr(demo, "draw_example", lambda *a: drawn.append(a) or draw(*a))
  roots = [demo.ensure_demo_tree(demo_config(tmp_path / f"cache{i}")) for i in (0, 1)]
  assert len(drawn) == 2 * 10 * (6 + 2)  # each image drawn once per tree, nothing else
  files = tree_files(roots[0])
  assert files == tree_files(roots[1])
  assert len(files) == 10 * (6 + 2)
  for f in files:
    a, b = (open(os.path.join(r, f), "rb").read() for r in roots)
    assert a == b, f  # byte-identical
    assert a[:3] == b"\xff\xd8\xff" and f.endswith(".JPEG")
  with Image.open(os.path.join(roots[0], files[0])) as im:
    assert im.format == "JPEG" and im.size == (64, 64) and im.mode == "RGB"
  # The name encodes the parameters; no temporary directories are left behind.
  assert "64px-6train-2val" in os.path.basename(roots[0])
  assert os.listdir(os.path.dirname(roots[0])) == [os.path.basename(roots[0])]
  # A second call reuses the tree: nothing is drawn or written.
  mtime = os.path.getmtime(roots[0])
  drawn.clear()
  assert demo.ensure_demo_tree(demo_config(tmp_path / "cache0")) == roots[0]
  assert os.path.getmtime(roots[0]) == mtime and not drawn


def test_demo_through_the_pipeline(tmp_path):
  c = demo_config(tmp_path)
  info = ip.dataset_info(c)
  assert info.class_names == demo.CLASS_NAMES and info.num_classes == 10
  assert (info.num_train, info.num_eval) == (60, 20)
  b = next(ip.train_batches(c))
  assert b["image"].shape == (8, 224, 224, 3) and np.isfinite(b["image"]).all()
  ev = list(ip.eval_batches(c, ten_crop=False))
  assert sum(e["mask"].sum() for e in ev) == 20


def test_colour_does_not_give_the_class_away():
  # Mean image colour per class, over many draws, is about the same for every class.
  means = np.array([[demo.draw_example(label, "train", i, 32).reshape(-1, 3).mean(0)
                     for i in range(60)] for label in range(10)])
  class_means = means.mean(1)
  spread_between = class_means.std(0)
  spread_within = means.std(1).mean(0) / np.sqrt(60)
  assert np.all(spread_between < 4 * spread_within)
