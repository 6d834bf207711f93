"""Figure 1: the four-layer CNN, the ReLU/tanh switch, epochs to target, a 2-epoch run.

  .venv/bin/python -m pytest -q tests/test_figure1.py

Expected: all pass in under a minute on 2 cores.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import paper_rule
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from alexnet_jax import data as input_pipeline
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
  images = np.random.default_rng(0).normal(0, 60, (2, 32, 32, 3)).astype(np.float32)
  for activation in ("relu", "tanh"):
    logits = figure1.apply(cfg, params, jnp.asarray(images), activation)
    assert logits.shape == (2, 10)
    want = _numpy_forward(cfg, params, images, activation)
    np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4,
                               atol=1e-4 * np.abs(want).max(), err_msg=activation)


def _numpy_forward(cfg, params, images, activation):
  """The network in float64 numpy: 5x5 convolutions with 2 pixels of zero padding, the
  activation, then cuda-convnet's pooling: ceil(n / stride) windows a side, starting at
  multiples of the stride, clipped at the map's edge (an average over the pixels they
  cover); the classifier on the (h, w, c)-flattened maps."""
  act = {"relu": lambda x: np.maximum(x, 0.0), "tanh": np.tanh}[activation]
  x = np.asarray(images, np.float64) * cfg.input_scale
  for i, name in enumerate(figure1.CONV_LAYERS):
    kernel = np.asarray(params[name]["kernel"], np.float64)
    half = kernel.shape[0] // 2
    padded = np.pad(x, ((0, 0), (half, half), (half, half), (0, 0)))
    windows = sliding_window_view(padded, kernel.shape[:2], axis=(1, 2))  # b h w c i j
    x = act(np.einsum("bhwcij,ijco->bhwo", windows, kernel) + np.asarray(params[name]["bias"]))
    side, stride, window = x.shape[1], cfg.pool_stride, cfg.pool_window
    reduce = np.max if cfg.pool_kinds[i] == "max" else np.mean
    x = np.stack([np.stack([reduce(x[:, r:r + window, c:c + window], axis=(1, 2))
                            for c in range(0, side, stride)], axis=1)
                  for r in range(0, side, stride)], axis=1)
  return x.reshape(len(x), -1) @ np.asarray(params["fc8"]["kernel"], np.float64) + np.asarray(
      params["fc8"]["bias"])


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


def _replay(config, activation):
  """Per-epoch mean training error and loss of `activation`'s network trained again here:
  the same batch stream, jax.grad of the mean cross-entropy of `figure1.apply`, the
  paper's rule by hand (tests/paper_rule.py); each batch scored before its update."""
  o, lr = config.optim, float(config.figure1.learning_rate[activation])
  info = input_pipeline.dataset_info(config)
  steps_per_epoch = info.num_train // config.batch_size  # the remainder is dropped

  @jax.jit
  def loss_and_grads(params, images, labels):
    def loss(p):
      logits = figure1.apply(config.model, p, images, activation)
      return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
              jnp.mean(jnp.argmax(logits, -1) != labels))
    return jax.value_and_grad(loss, has_aux=True)(params)

  params0 = paper_rule.flat(figure1.init_params(config.model, jax.random.key(config.seed)))
  params, grads, errors, losses = params0, [], [], []
  batches = input_pipeline.train_batches(config, start_step=0)
  try:
    for _ in range(int(config.num_epochs)):
      epoch = []
      for _ in range(steps_per_epoch):
        batch = next(batches)
        (loss, error), g = loss_and_grads(paper_rule.nest(params), batch["image"],
                                          batch["label"])
        epoch.append((float(error), float(loss)))
        grads.append(paper_rule.flat(g))
        params = paper_rule.paper_sgd(params0, grads, [lr] * len(grads), o)
      errors.append(np.mean([e for e, _ in epoch]))
      losses.append(np.mean([loss for _, loss in epoch]))
  finally:
    batches.close()
  return errors, losses


@pytest.mark.slow
def test_two_epoch_run_writes_json_and_png(tmp_path):
  config = figure1_config.get_config("smoke")
  with config.unlocked():
    config.dataset.cache_dir = str(tmp_path / "cache")
    # A target these 2 epochs reach (measured: ReLU 0.900, 0.887; tanh 0.950, 0.925), so
    # that the epochs to target below are numbers, interpolated for tanh.
    config.figure1.target_error = 0.93
  result = figure1.run(config, str(tmp_path / "out"), log=lambda _: None)
  with open(tmp_path / "out" / "figure1.json") as f:
    saved = json.load(f)
  assert (tmp_path / "out" / "figure1.png").stat().st_size > 0
  assert saved["num_epochs"] == result["num_epochs"] == 2
  assert saved["learning_rate"] == dict(config.figure1.learning_rate)
  curves = saved["curves"]
  assert set(curves) == {"relu", "tanh"}
  for name, curve in curves.items():
    assert len(curve["training_error"]) == len(curve["loss"]) == config.num_epochs, name
    # What the network gives on those batches, trained again here by the paper's rule.
    errors, losses = _replay(config, name)
    np.testing.assert_allclose(curve["training_error"], errors, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(curve["loss"], losses, rtol=1e-4, err_msg=name)
  # Two networks, not one trained twice.
  assert curves["relu"]["loss"] != curves["tanh"]["loss"]
  # The summary is the curves' (recomputed from the saved curves).
  target = config.figure1.target_error
  assert saved["target_error"] == target
  for name, curve in curves.items():
    first, interpolated = figure1.epochs_to_target(curve["training_error"], target)
    assert saved["first_epoch_at_target"][name] == first, name
    assert saved["epochs_to_target"][name] == pytest.approx(interpolated), name
  assert saved["epochs_to_target"]["relu"] is not None  # else the checks above are vacuous
  relu, tanh = saved["epochs_to_target"]["relu"], saved["epochs_to_target"]["tanh"]
  if tanh is not None:
    assert saved["ratio"] == pytest.approx(tanh / relu) and not saved["ratio_is_lower_bound"]
  else:
    assert saved["ratio"] == pytest.approx(2 / relu) and saved["ratio_is_lower_bound"]
