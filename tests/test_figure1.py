"""Figure 1: the four-layer CNN, the ReLU/tanh switch, epochs to target, a 2-epoch run.

  .venv/bin/python -m pytest -q tests/test_figure1.py

Expected: all pass in under a minute on 2 cores.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alexnet_jax.tools import figure1
from experiments import figure1 as figure1_config


@pytest.fixture
def cfg():
  return figure1_config.get_config().model


def test_four_layers_with_cuda_convnet_shapes(cfg):
  params = figure1.init_params(cfg, jax.random.key(0))
  assert list(params) == ["conv1", "conv2", "conv3", "fc8"]
  assert params["conv1"]["kernel"].shape == (5, 5, 3, 32)
  assert params["conv2"]["kernel"].shape == (5, 5, 32, 32)
  assert params["conv3"]["kernel"].shape == (5, 5, 32, 64)
  # 32 -> 16 -> 8 -> 4 (cuda-convnet's ceil pooling): 4 * 4 * 64 inputs to the classifier.
  assert figure1.feature_sizes(cfg) == [16, 8, 4]
  assert params["fc8"]["kernel"].shape == (4 * 4 * 64, 10)
  logits = figure1.apply(cfg, params, jnp.ones((2, 32, 32, 3)), "relu")
  assert logits.shape == (2, 10)


def test_activation_switch_changes_the_activations(cfg):
  params = figure1.init_params(cfg, jax.random.key(0))
  images = 60.0 * jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  relu_logits, relu = figure1.apply(cfg, params, images, "relu", capture=True)
  tanh_logits, tanh = figure1.apply(cfg, params, images, "tanh", capture=True)
  for layer in figure1.CONV_LAYERS:
    assert float(relu[layer].min()) == 0.0  # rectified: some exactly zero, none negative
    assert float(tanh[layer].min()) < 0.0 and float(jnp.abs(tanh[layer]).max()) < 1.0
  assert not np.allclose(relu_logits, tanh_logits)


def test_pooling_covers_the_map():
  x = jnp.arange(25.0).reshape(1, 5, 5, 1)
  mx = figure1.pool(x, "max", 3, 2)
  avg = figure1.pool(x, "avg", 3, 2)
  assert mx.shape == avg.shape == (1, 3, 3, 1)
  assert float(mx[0, 2, 2, 0]) == 24.0
  assert float(avg[0, 2, 2, 0]) == 24.0  # the clipped corner window holds one pixel
  assert float(avg[0, 0, 0, 0]) == pytest.approx(np.mean([0, 1, 2, 5, 6, 7, 10, 11, 12]))


def test_epochs_to_target_on_a_hand_made_curve():
  assert figure1.epochs_to_target([0.8, 0.5, 0.3, 0.2, 0.1], 0.25) == (4, pytest.approx(3.5))
  assert figure1.epochs_to_target([0.8, 0.25], 0.25) == (2, pytest.approx(2.0))
  assert figure1.epochs_to_target([0.2, 0.1], 0.25) == (1, 1.0)
  assert figure1.epochs_to_target([0.9, 0.8], 0.25) == (None, None)
  curves = {"relu": {"training_error": [0.5, 0.2]},  # 1.5 epochs (interpolated)
            "tanh": {"training_error": [0.9, 0.7, 0.5, 0.4, 0.3, 0.25]}}  # 6 epochs
  s = figure1.summarise(curves, 0.25)
  assert s["first_epoch_at_target"] == {"relu": 2, "tanh": 6}
  assert s["ratio"] == pytest.approx(6 / (1 + 0.25 / 0.3))
  assert not s["ratio_is_lower_bound"]
  curves["tanh"]["training_error"][-1] = 0.26  # never reached: at least 6 epochs
  s = figure1.summarise(curves, 0.25)
  assert s["ratio_is_lower_bound"] and s["ratio"] == pytest.approx(6 / (1 + 0.25 / 0.3))


def test_two_epoch_run_writes_json_and_png(tmp_path):
  config = figure1_config.get_config("smoke")
  with config.unlocked():
    config.dataset.cache_dir = str(tmp_path / "cache")
  result = figure1.run(config, str(tmp_path / "out"), log=lambda _: None)
  with open(tmp_path / "out" / "figure1.json") as f:
    saved = json.load(f)
  assert (tmp_path / "out" / "figure1.png").stat().st_size > 0
  for name in ("relu", "tanh"):
    errors = saved["curves"][name]["training_error"]
    assert len(errors) == 2 and all(0.0 <= e <= 1.0 for e in errors)
  assert saved["target_error"] == config.figure1.target_error
  assert set(saved["epochs_to_target"]) == {"relu", "tanh"}
  assert result["num_epochs"] == 2
