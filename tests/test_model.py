"""The model: exact counts, LRN, parity with an independent formulation, init, checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from alexnet_jax import config_checks, parallel
from alexnet_jax import model as model_lib
from experiments import alexnet, alexnet_2012_code, single_column


def _totals(config):
  model = model_lib.AlexNet(config.model)
  params = model.init(jax.random.key(0))
  return model, params, model_lib.layer_stats(model, params)


def test_paper_counts_from_the_parameter_pytree():
  model, params, rows = _totals(alexnet.get_config())
  assert sum(x.size for x in jax.tree.leaves(params)) == 60_965_224
  assert sum(r.params for r in rows) == 60_965_224
  assert [r.neurons for r in rows] == [290_400, 186_624, 64_896, 64_896, 43_264,
                                       4_096, 4_096, 1_000]
  assert sum(r.macs for r in rows) == 724_406_816
  assert rows[0].output_per_tower == (55, 55, 48)
  table = model_lib.format_summary(model, params)
  assert "60,965,224" in table and "724,406,816" in table


def test_single_column_counts():
  _, params, rows = _totals(single_column.get_config())
  assert sum(x.size for x in jax.tree.leaves(params)) == 61_100_840
  assert sum(r.macs for r in rows) == 714_188_480


def _lrn_numpy(a, k, n, alpha, beta):
  """The paper's formula, literally: a sum over channels max(0, i-n/2)..min(N-1, i+n/2)."""
  out = np.empty_like(a)
  channels = a.shape[-1]
  for i in range(channels):
    lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
    out[..., i] = a[..., i] / (k + alpha * np.sum(a[..., lo:hi + 1] ** 2, axis=-1)) ** beta
  return out


@pytest.mark.parametrize("alpha_over_n", [False, True])
def test_lrn_matches_the_formula(alpha_over_n):
  rng = np.random.default_rng(0)
  a = rng.normal(0, 40, size=(2, 3, 3, 11)).astype(np.float64)  # big values: LRN bites
  got = model_lib.lrn(jnp.asarray(a, jnp.float32), k=2.0, n=5, alpha=1e-4, beta=0.75,
                      alpha_over_n=alpha_over_n)
  alpha = 1e-4 / 5 if alpha_over_n else 1e-4
  np.testing.assert_allclose(np.asarray(got), _lrn_numpy(a, 2.0, 5, alpha, 0.75), rtol=1e-5)
  # The 2012-code form is the weaker one: 5x smaller alpha.
  assert not np.allclose(_lrn_numpy(a, 2.0, 5, 1e-4, 0.75), _lrn_numpy(a, 2.0, 5, 2e-5, 0.75))


def test_cnorm2_matches_the_formula():
  rng = np.random.default_rng(1)
  a = rng.normal(0, 30, size=(1, 7, 6, 2))
  got = model_lib.spatial_norm(jnp.asarray(a, jnp.float32), size=5, k=1.0, alpha=0.001,
                               beta=0.75, alpha_over_size=True)
  want = np.empty_like(a)
  for y in range(7):
    for x in range(6):
      win = a[:, max(0, y - 2):y + 3, max(0, x - 2):x + 3, :]
      want[:, y, x, :] = a[:, y, x, :] / (1 + 0.001 / 25 * np.sum(win ** 2, axis=(1, 2))) ** 0.75
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


def _reference_forward(cfg, params, images):
  """The same net in the usual single-column layout: grouped convolutions with
  channels ordered [tower A | tower B], weights copied across. Written
  independently of the tower loop (no exchanges, no per-tower lists)."""
  towers = cfg.towers
  whole = lambda p: jnp.concatenate(list(p), axis=-1)  # noqa: E731  [T, ..., o] -> [..., T*o]
  x = images
  for i, name in enumerate(model_lib.CONV_LAYERS):
    groups = 1 if (i == 0 or name in cfg.cross_tower) else towers
    pad = model_lib.conv_padding(cfg, i)
    x = jax.lax.conv_general_dilated(
        x, whole(params[name]["kernel"]), (cfg.conv_stride[i],) * 2, (pad, pad),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision="highest") + whole(params[name]["bias"])
    x = jax.nn.relu(x)
    if name in cfg.lrn.layers:
      halves = jnp.split(x, towers, axis=-1)  # windows stop at tower boundaries
      x = jnp.concatenate([model_lib.lrn(h, k=cfg.lrn.k, n=cfg.lrn.n, alpha=cfg.lrn.alpha,
                                         beta=cfg.lrn.beta, alpha_over_n=cfg.lrn.alpha_over_n)
                           for h in halves], axis=-1)
    if name in model_lib.POOLED_LAYERS:
      x = model_lib.max_pool(x, cfg.pool_window, cfg.pool_stride)
  x = x.reshape(x.shape[0], -1)
  for name in model_lib.FC_LAYERS:
    x = jnp.dot(x, whole(params[name]["kernel"]), precision="highest") + whole(
        params[name]["bias"])
    if name != "fc8":
      x = jax.nn.relu(x)
  return x


@functools.cache
def _small_two_tower():
  config = alexnet.get_config("smoke")
  model = model_lib.AlexNet(config.model)
  params = model.init(jax.random.key(3))
  images = jax.random.normal(jax.random.key(4), (4, 224, 224, 3)) * 60
  return config, model, params, images


def test_two_towers_equal_the_grouped_convolution_formulation():
  config, model, params, images = _small_two_tower()
  with jax.default_matmul_precision("highest"):
    got = model.apply(params, images, train=False)
  want = _reference_forward(config.model, params, images)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(want).max()))


@pytest.mark.parametrize("train", [False, True])
def test_one_tower_per_device_equals_both_on_one(train):
  config, model, params, images = _small_two_tower()
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.model = 1, 2
  mesh = parallel.make_mesh(config)
  rng = jax.random.key(7)
  both = model.apply(params, images, train=train, rng=rng)
  split = jax.shard_map(
      lambda p, x: model.apply(p, x, train=train, rng=rng, tower_axis=parallel.MODEL),
      mesh=mesh, in_specs=(P(parallel.MODEL), P()), out_specs=P(), check_vma=False)
  got = jax.jit(split)(params, images)
  np.testing.assert_allclose(np.asarray(got), np.asarray(both), rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(both).max()))


def test_dropout_masks_differ_across_examples_and_towers():
  config, model, params, images = _small_two_tower()
  same = jnp.repeat(images[:1], 2, axis=0)
  _, acts = model.apply(params, same, train=True, rng=jax.random.key(0), capture=True)
  logits_a = model.apply(params, same, train=True, rng=jax.random.key(0))
  logits_b = model.apply(params, same, train=True, rng=jax.random.key(0))
  np.testing.assert_array_equal(logits_a, logits_b)  # reproducible from the key
  assert not np.allclose(logits_a[0], logits_a[1])  # same image, different masks
  # Inverted dropout: expectation preserved, so eval logits differ from train ones.
  assert not np.allclose(model.apply(params, same, train=False)[0], logits_a[0])


@pytest.mark.parametrize("make_config,stds,biases", [
    (alexnet.get_config, [0.01] * 8, [0, 1, 0, 1, 1, 1, 1, 0]),
    (alexnet_2012_code.get_config, [0.01, 0.01, 0.03, 0.03, 0.03, 0.01, 0.01, 0.01],
     [0, 1, 0, 1, 1, 1, 1, 0]),
])
def test_init_statistics_match_the_config(make_config, stds, biases):
  config = make_config()
  params = model_lib.AlexNet(config.model).init(jax.random.key(0))
  for name, std, bias in zip(model_lib.LAYERS, stds, biases, strict=True):
    kernel = np.asarray(params[name]["kernel"])
    assert abs(kernel.std() / std - 1) < 0.05, name
    assert abs(kernel.mean()) < 0.05 * std, name
    np.testing.assert_array_equal(np.asarray(params[name]["bias"]), bias)


def _variant(**changes):
  config = alexnet.get_config("smoke")
  config.update_from_flattened_dict(changes)
  return config


@pytest.mark.parametrize("changes", [
    {"model.activation": "tanh"},
    {"model.towers": 1, "mesh.model": 1},
    {"model.lrn.enabled": False},
    {"model.pool_window": 2, "model.pool_stride": 2},
    {"model.lrn.per_tower": False},
    {"model.lrn.before_relu_in_conv1": True, "model.cnorm2.enabled": True},
    {"model.input_size": 227, "model.conv1_padding": (0, 0)},
    {"model.compute_dtype": "bfloat16"},
    {"model.dropout_style": "scale_at_test"},
])
def test_variants_build_and_run(changes):
  config = _variant(**changes)
  config_checks.check(config, num_devices=8)
  model = model_lib.AlexNet(config.model)
  params = model.init(jax.random.key(0))
  size = config.model.input_size
  images = jnp.ones((2, size, size, 3)) * 20
  logits = jax.jit(lambda p, x: model.apply(p, x, train=True, rng=jax.random.key(1)))(
      params, images)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_single_column_variant_runs():
  config = single_column.get_config("smoke")
  model = model_lib.AlexNet(config.model)
  params = model.init(jax.random.key(0))
  assert model_lib.spatial_sizes(config.model)["conv1"] == 55
  assert model.apply(params, jnp.zeros((1, 224, 224, 3)), train=False).shape == (1, 10)


@pytest.mark.parametrize("changes,field", [
    ({"model.conv_features": (8, 15, 16, 16, 16)}, "model.conv_features[1]"),
    ({"model.activation": "swish"}, "model.activation"),
    ({"model.input_size": 40}, "model.input_size"),
    ({"model.towers": 3}, "model.towers"),
    ({"model.num_classes": 7}, "model.num_classes"),
    ({"model.cross_tower": ("conv9",)}, "model.cross_tower"),
    ({"model.dropout_style": "gaussian"}, "model.dropout_style"),
])
def test_bad_model_config_names_the_field(changes, field):
  with pytest.raises(config_checks.ConfigError) as err:
    config_checks.check(_variant(**changes))
  assert str(err.value).startswith(f"config.{field}:")
