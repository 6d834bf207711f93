"""The paper's figures: kernel grid layout and normalisation, colour numbers, nearest
neighbours against brute force, and write_all on a tiny trained run."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from alexnet_jax.tools import figures
from test_evaluate import trained_run  # one tiny trained run for every module that needs one

LAYOUT = dict(per_row=16, scale=4, pad=2, tower_gap=12)


def _grey(rng, shape):
  """Random kernels with R = G = B at every pixel: [..., kh, kw, 3, K]."""
  one = rng.uniform(-1, 1, shape[:-2] + (1, shape[-1]))
  return np.repeat(one, 3, axis=-2)


def _corner(tower, k, *, kh, rows, per_row, scale, pad, tower_gap):
  """Top-left pixel of kernel k of `tower`, from the layout's definition."""
  block_h = rows * kh * scale + (rows - 1) * pad
  y = pad + tower * (block_h + tower_gap) + (k // per_row) * (kh * scale + pad)
  x = pad + (k % per_row) * (kh * scale + pad)
  return y, x


def test_kernel_grid_layout_red_kernel_and_colour_numbers(tmp_path):
  rng = np.random.default_rng(0)
  kernels = _grey(rng, (2, 11, 11, 3, 20))  # 20 kernels a tower: 2 rows of 16
  red = 17  # tower 2, row 1, column 1
  kernels[1, :, :, :, red] = 0.0
  kernels[1, :, :, 0, red] = 1.0
  image, corners = figures.kernel_grid(kernels, **LAYOUT)

  cell = 11 * 4
  block_h = 2 * cell + 2
  assert image.shape == (2 + 2 * block_h + 12 + 2, 2 + 16 * cell + 15 * 2 + 2, 3)
  y, x = _corner(1, red, kh=11, rows=2, **LAYOUT)
  assert (y, x) == (2 + block_h + 12 + cell + 2, 2 + cell + 2) == tuple(corners[1, red])
  block = image[y:y + cell, x:x + cell].astype(int)
  assert (block[..., 0] - block[..., 1] > 100).all() and (block[..., 1] == block[..., 2]).all()
  # Grey kernels stay grey; the spacing is background.
  gy, gx = _corner(0, 3, kh=11, rows=2, **LAYOUT)
  grey = image[gy:gy + cell, gx:gx + cell]
  assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
  assert (image[:2] == figures.BACKGROUND).all() and (image[y - 2:y, x:x + cell] == 255).all()
  # Nearest-neighbour enlargement: each weight is a 4 x 4 square.
  first = image[gy:gy + 4, gx:gx + 4, 0]
  assert (first == first[0, 0]).all()

  path = str(tmp_path / "figures" / "conv1.png")
  colour = figures.conv1_kernels({"conv1": {"kernel": kernels}}, path)
  assert colour["tower_1"] == pytest.approx(0.0, abs=1e-12)
  assert colour["tower_2"] == pytest.approx(np.sqrt(2 / 3) / 20)  # one red kernel of 20
  assert json.load(open(tmp_path / "figures" / "conv1_colour.json")) == colour
  written = np.asarray(Image.open(path))
  # The written file uses the default layout (16 a row, 4x): the paper's layout.
  default_image, _ = figures.kernel_grid(kernels)
  np.testing.assert_array_equal(written, default_image)


def test_paper_shaped_grid_size_and_single_tower(tmp_path):
  rng = np.random.default_rng(1)
  kernels = rng.normal(size=(2, 11, 11, 3, 48))  # the paper's conv1: 48 a tower
  image, _ = figures.kernel_grid(kernels, **LAYOUT)
  block_h = 3 * 44 + 2 * 2
  assert image.shape == (4 + 2 * block_h + 12, 4 + 16 * 44 + 15 * 2, 3)
  colour = figures.conv1_kernels({"conv1": {"kernel": kernels[:1]}}, str(tmp_path / "k.png"))
  assert set(colour) == {"tower_1", "definition"}
  assert colour["tower_1"] == pytest.approx(np.sqrt(2 / 3), abs=0.02)  # random weights


def test_one_min_max_for_all_kernels():
  rng = np.random.default_rng(2)
  pattern = rng.normal(size=(11, 11, 3))
  kernels = np.stack([pattern, 2 * pattern], axis=-1)[None]  # [1, 11, 11, 3, 2]
  image, corners = figures.kernel_grid(kernels, **LAYOUT)
  half, full = (image[y:y + 44:4, x:x + 44:4].astype(float) for y, x in corners[0])
  lo, hi = kernels.min(), kernels.max()
  np.testing.assert_array_equal(full, np.round((2 * pattern - lo) / (hi - lo) * 255))
  # Per-kernel normalisation would make the two identical; here the x2 kernel has
  # twice the contrast around the common zero level.
  zero = (0 - lo) / (hi - lo) * 255
  assert np.abs(full - zero).mean() == pytest.approx(2 * np.abs(half - zero).mean(), rel=0.02)


def test_nearest_equals_brute_force():
  rng = np.random.default_rng(3)
  queries, bank = rng.normal(size=(7, 32)), rng.normal(size=(1000, 32))
  brute = np.linalg.norm(queries[:, None] - bank[None], axis=-1)
  want = np.argsort(brute, axis=1, kind="stable")[:, :6]
  for block in (64, 999, 4096):  # across, exactly at and without block boundaries
    index, dist = figures.nearest(queries, bank, 6, block=block)
    np.testing.assert_array_equal(index, want)
    np.testing.assert_allclose(dist, np.take_along_axis(brute, want, axis=1), rtol=1e-9)
  # An exact duplicate is at distance 0; ties go to the lower index; k is capped at n.
  bank2 = np.concatenate([bank[:3], queries[:1], queries[:1]])
  index, dist = figures.nearest(queries[:1], bank2, 10, block=2)
  assert index.shape == (1, 5) and list(index[0, :2]) == [3, 4] and dist[0, 0] < 1e-6


def test_evenly_spaced_is_deterministic_and_bounded():
  np.testing.assert_array_equal(figures.evenly_spaced(10, 3), [0, 4, 9])
  assert len(figures.evenly_spaced(5, 100)) == 5 and len(figures.evenly_spaced(0, 3)) == 0


@pytest.fixture
def trained(tmp_path_factory):
  """The smoke net trained 4 steps on the demo data, evaluated at steps 2 and 4: the run
  test_evaluate.py also uses (trained once per pytest process)."""
  return trained_run(tmp_path_factory)


def test_write_all_on_a_trained_run(trained):
  config, workdir = trained
  paths = figures.write_all(config, workdir, num_queries=3, max_train_images=24)
  out = os.path.join(workdir, "figures")
  names = ["conv1_kernels.png", "conv1_colour.json", "neighbours.png", "neighbours.json",
           "training_curves.png"]
  assert paths == [os.path.join(out, n) for n in names]
  for p in paths:
    assert os.path.getsize(p) > 0
  towers, count = config.model.towers, config.model.conv_features[0] // config.model.towers
  kernels = Image.open(os.path.join(out, "conv1_kernels.png"))
  cols = min(figures.KERNELS_PER_ROW, count)
  assert kernels.size == (4 + cols * 44 + (cols - 1) * 2, 4 + towers * 44 + 12)
  colour = json.load(open(os.path.join(out, "conv1_colour.json")))
  assert set(colour) == {"tower_1", "tower_2", "definition"}

  result = json.load(open(os.path.join(out, "neighbours.json")))
  assert result["num_train_searched"] == 24 and len(result["queries"]) == 3
  for q in result["queries"]:
    probs = [p for _, p in q["top5"]]
    assert len(probs) == 5 and probs == sorted(probs, reverse=True)
    assert isinstance(q["label"], int) and isinstance(q["label_name"], str)
    dists = [n["distance"] for n in q["neighbours"]]
    assert len(dists) == 6 and dists == sorted(dists)
    assert all("/train/" in n["path"] for n in q["neighbours"])
  assert Image.open(os.path.join(out, "neighbours.png")).size[0] > 800

  curves = figures.training_curves(workdir, os.path.join(out, "curves_again.png"))
  assert list(curves["train/loss"][0]) == [1, 2, 3, 4]
  assert list(curves["eval/top1_error"][0]) == [2, 4]
  assert (curves["train/learning_rate"][1] > 0).all()


def test_training_curves_without_events_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no training scalars"):
    figures.training_curves(str(tmp_path), str(tmp_path / "c.png"))
