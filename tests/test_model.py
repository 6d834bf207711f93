"""The model: exact counts, LRN, parity with an independent formulation, init, checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from alexnet_jax import config_checks, kernels, parallel
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
  # Per tower, the paper's section 3.5 and Figure 2: 48 kernels of 11x11x3 at stride 4 (55x55
  # after the 3-pixel overhang), 128 of 5x5x48, conv3's 192 of 3x3x256 over both towers'
  # maps, 192 of 3x3x192, 128 of 3x3x192, then 2048, 2048 and 500 units.
  assert [r.output_per_tower for r in rows] == [
      (55, 55, 48), (27, 27, 128), (13, 13, 192), (13, 13, 192), (13, 13, 128), (2048,),
      (2048,), (500,)]
  assert {name: p["kernel"].shape for name, p in params.items()} == {
      "conv1": (2, 11, 11, 3, 48), "conv2": (2, 5, 5, 48, 128), "conv3": (2, 3, 3, 256, 192),
      "conv4": (2, 3, 3, 192, 192), "conv5": (2, 3, 3, 192, 128), "fc6": (2, 6 * 6 * 256, 2048),
      "fc7": (2, 4096, 2048), "fc8": (2, 4096, 500)}
  assert [r.params for r in rows] == [34_944, 307_456, 885_120, 663_936, 442_624,
                                      37_752_832, 16_781_312, 4_097_000]
  table = model_lib.format_summary(model, params)
  assert "60,965,224" in table and "724,406,816" in table


def test_single_column_counts():
  model, params, rows = _totals(single_column.get_config())
  assert sum(x.size for x in jax.tree.leaves(params)) == 61_100_840
  # torchvision's widths in one tower; conv1 padding (2, 2): (224 + 4 - 11) // 4 + 1 = 55.
  assert [r.output_per_tower for r in rows] == [
      (55, 55, 64), (27, 27, 192), (13, 13, 384), (13, 13, 256), (13, 13, 256), (4096,),
      (4096,), (1000,)]
  assert model_lib.spatial_sizes(model.config)["pool5"] == 6
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
  # The tolerance tells the two forms apart (the 2012 code's alpha is 5x smaller): a
  # model that ignored `alpha_over_n` would fail one of the two cases.
  other = 1e-4 if alpha_over_n else 1e-4 / 5
  assert not np.allclose(np.asarray(got), _lrn_numpy(a, 2.0, 5, other, 0.75), rtol=1e-5)


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


def _lrn_reference(x, *, k, n, alpha, beta, alpha_over_n):
  """The paper's LRN as a sliding sum over zero-padded channels (so the window is clipped
  at the edges), not the model's banded matmul."""
  half, channels = n // 2, x.shape[-1]
  squares = jnp.pad(x * x, [(0, 0)] * (x.ndim - 1) + [(half, half)])
  window = sum(squares[..., j:j + channels] for j in range(2 * half + 1))
  return x / (k + (alpha / n if alpha_over_n else alpha) * window) ** beta


def _cnorm2_reference(x, *, size, k, alpha, beta, alpha_over_size):
  """The 2012 code's cnorm2 from its formula: a size x size box sum of squares per map
  (zero padding = the window clipped at the borders), as shifted slices."""
  lo, hi = (size - 1) // 2, size // 2
  h, w = x.shape[1:3]
  squares = jnp.pad(x * x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
  window = sum(squares[:, i:i + h, j:j + w] for i in range(size) for j in range(size))
  return x / (k + (alpha / size ** 2 if alpha_over_size else alpha) * window) ** beta


def _reference_forward(cfg, params, images):
  """The same net in the usual single-column layout: grouped convolutions with
  channels ordered [tower A | tower B], weights copied across. Written
  independently of the tower loop (no exchanges, no per-tower lists) and of the
  model's LRN, cnorm2, pooling and dropout code; the 2012 code's layer order
  where the config asks for it. Padding from the paper's rule (conv1's from the
  config, "same" for conv2-5), not from the model's helper."""
  act = {"relu": jax.nn.relu, "tanh": jnp.tanh}[cfg.activation]
  towers = cfg.towers
  whole = lambda p: jnp.concatenate(list(p), axis=-1)  # noqa: E731  [T, ..., o] -> [..., T*o]
  lrn_opts = {f: cfg.lrn[f] for f in ("k", "n", "alpha", "beta", "alpha_over_n")}

  def lrn(x):
    if not cfg.lrn.per_tower:
      return _lrn_reference(x, **lrn_opts)
    # Windows stop at tower boundaries.
    return jnp.concatenate([_lrn_reference(h, **lrn_opts)
                            for h in jnp.split(x, towers, axis=-1)], axis=-1)

  def pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, cfg.pool_window,
                                                            cfg.pool_window, 1),
                                 (1, cfg.pool_stride, cfg.pool_stride, 1), "VALID")

  x = images
  for i, name in enumerate(model_lib.CONV_LAYERS):
    groups = 1 if (i == 0 or name in cfg.cross_tower) else towers
    pad = tuple(cfg.conv1_padding) if i == 0 else (cfg.conv_kernel_size[i] // 2,) * 2
    x = jax.lax.conv_general_dilated(
        x, whole(params[name]["kernel"]), (cfg.conv_stride[i],) * 2, (pad, pad),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision="highest") + whole(params[name]["bias"])
    use_lrn = cfg.lrn.enabled and name in cfg.lrn.layers
    if name == "conv1" and use_lrn and cfg.lrn.before_relu_in_conv1:
      x = act(pool(lrn(x)))  # the 2012 code's layer 1: conv, LRN, pool, ReLU
      continue
    x = act(x)
    if use_lrn:
      x = lrn(x)
    if name == "conv2" and cfg.cnorm2.enabled:
      x = _cnorm2_reference(x, **{f: cfg.cnorm2[f] for f in ("size", "k", "alpha", "beta",
                                                             "alpha_over_size")})
    if name in model_lib.POOLED_LAYERS:
      x = pool(x)
  x = x.reshape(x.shape[0], -1)
  for name in model_lib.FC_LAYERS:
    x = jnp.dot(x, whole(params[name]["kernel"]), precision="highest") + whole(
        params[name]["bias"])
    if name != "fc8":
      x = act(x)
      if cfg.dropout_style == "scale_at_test":  # test time: all units, times (1 - p)
        x = x * (1.0 - cfg.dropout_rate)
  return x


def _lively_params(model, seed):
  """Weights N(0, 2 / fan_in) and biases N(0, 1): activations keep the input's scale
  (~60) through every layer, so LRN (alpha * sum a^2 ~ k) and cnorm2 change the
  logits by 4-90%. With the paper's N(0, 0.01) init and unit biases, at these
  widths they change the logits by ~1e-7: no test could see them. Drawn by numpy:
  XLA compiles a sampler per shape, ~1-5 s each on 2 cores."""
  rng = np.random.default_rng(seed)
  return {name: {"kernel": jnp.asarray(rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])),
                                                  (model.towers, *shape)), jnp.float32),
                 "bias": jnp.asarray(rng.normal(0, 1, (model.towers, shape[-1])), jnp.float32)}
          for name, shape in model.kernel_shapes().items()}


def _lively_images(n, size, seed=4):
  return jnp.asarray(np.random.default_rng(seed).normal(0, 60, (n, size, size, 3)), jnp.float32)


@functools.cache
def _small_two_tower():
  config = alexnet.get_config("smoke")
  model = model_lib.AlexNet(config.model)
  return config, model, _lively_params(model, 3), _lively_images(4, 224)


def _with_model(config, **changes):
  config = config.copy_and_resolve_references()
  config.model.update_from_flattened_dict(changes)
  return config


# Smoke-sized configs (make_config, model changes) whose forward pass is checked against
# the reference; the first three also have their gradients checked.
_CASES = {
    "paper": (alexnet.get_config, {}),
    # One window over both towers' channels: the extra exchange.
    "lrn_across_towers": (alexnet.get_config, {"lrn.per_tower": False}),
    # alpha / n, LRN before ReLU in conv1, cnorm2, scale-at-test dropout, 0.03 stds.
    "code_2012": (alexnet_2012_code.get_config, {}),
    "inverted_dropout": (alexnet.get_config, {"dropout_style": "inverted"}),
    "tanh": (alexnet.get_config, {"activation": "tanh"}),
    "one_tower": (alexnet.get_config, {"towers": 1}),
    "no_lrn": (alexnet.get_config, {"lrn.enabled": False}),
    "pool_2x2": (alexnet.get_config, {"pool_window": 2, "pool_stride": 2}),
    "input_227": (alexnet.get_config, {"input_size": 227, "conv1_padding": (0, 0)}),
    # One tower, torchvision's widths and conv1 padding (2, 2), no LRN, inverted dropout.
    "single_column": (single_column.get_config, {}),
}


def _case_config(case, **extra):
  make_config, changes = _CASES[case]
  return _with_model(make_config("smoke"), **changes, **extra)


@pytest.mark.parametrize("case", list(_CASES))
def test_forward_equals_an_independent_grouped_convolution_formulation(case):
  config = _case_config(case)
  config_checks.check(config, num_devices=8)
  model = model_lib.AlexNet(config.model)
  size = config.model.input_size
  _, paper, params, images = _small_two_tower()
  images = images[:2]
  if model.kernel_shapes() != paper.kernel_shapes() or size != images.shape[1]:
    params, images = _lively_params(model, 3), _lively_images(2, size)
  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda p, x: model.apply(p, x, train=False))(params, images)
    want = jax.jit(functools.partial(_reference_forward, config.model))(params, images)
  assert got.shape == (2, config.model.num_classes) and got.dtype == jnp.float32
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


@functools.cache
def _dropout_probe(style):
  """(relu(fc6), fc6 after dropout at test, after dropout at train [2 keys]) for the same
  image four times. fc7 is made the identity on the gathered fc6 units (and fc6's bias
  large, so every unit is active), so fc7's captured output is fc6's dropout output."""
  config, _, params, images = _small_two_tower()
  model = model_lib.AlexNet(_with_model(config, dropout_style=style).model)
  towers, width = params["fc7"]["kernel"].shape[0], params["fc7"]["kernel"].shape[-1]
  eye = jnp.eye(towers * width)
  params = dict(params, fc6=dict(params["fc6"], bias=params["fc6"]["bias"] + 1000.0),
                fc7={"kernel": jnp.stack([eye[:, t * width:(t + 1) * width]
                                          for t in range(towers)]),
                     "bias": jnp.zeros_like(params["fc7"]["bias"])})
  same = jnp.repeat(images[:1], 4, axis=0)
  run = jax.jit(lambda p, x, key, train: model.apply(p, x, train=train, rng=key, capture=True)[1],
                static_argnums=3)
  both = lambda a: np.concatenate(list(np.asarray(a)), axis=-1)  # noqa: E731  towers -> units
  at_test = run(params, same, None, False)
  trains = [both(run(params, same, jax.random.key(k), True)["fc7"]) for k in (0, 0, 1)]
  return np.maximum(both(at_test["fc6"]), 0.0), both(at_test["fc7"]), trains, width


@pytest.mark.parametrize("style", ["inverted", "scale_at_test"])
def test_dropout_scaling_and_masks(style):
  hidden, at_test, (train, again, other_key), width = _dropout_probe(style)
  assert (hidden > 0).all()
  rate = 0.5
  kept_scale, test_scale = (1 / (1 - rate), 1.0) if style == "inverted" else (1.0, 1 - rate)
  # Test time: inverted is the identity; the 2012 code's style multiplies by (1 - p).
  np.testing.assert_allclose(at_test, hidden * test_scale, rtol=1e-5)
  # Train time: every unit is either dropped or kept, scaled by 1/(1-p) or not at all.
  kept = train != 0
  np.testing.assert_allclose(train[kept], hidden[kept] * kept_scale, rtol=1e-5)
  assert 0.35 < kept.mean() < 0.65  # 128 units at p = 0.5
  np.testing.assert_array_equal(train, again)  # a function of the key
  assert not np.array_equal(train, other_key)
  # Independent masks: for each copy of the image, and for each tower.
  assert len({row.tobytes() for row in kept}) == len(kept)
  assert not np.array_equal(kept[:, :width], kept[:, width:])


@functools.cache
def _loss_and_grads(case, compute_dtype="float32", reference=False):
  """((loss, logits), grads) of the mean cross-entropy of the 4 lively images at test time
  (no dropout), through the model or (float32) through the reference forward."""
  _, _, params, images = _small_two_tower()
  # fc8 / 30: logits of order 1 (loss ~ log 10), as in training, not a saturated softmax.
  params = dict(params, fc8=jax.tree.map(lambda x: x / 30, params["fc8"]))
  cfg = _case_config(case, compute_dtype=compute_dtype).model
  labels = jnp.arange(4) % cfg.num_classes
  if reference:
    forward = functools.partial(_reference_forward, cfg)
  else:
    model = model_lib.AlexNet(cfg)
    forward = functools.partial(model.apply, train=False)

  def loss(p):
    logits = forward(p, images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("case", ["paper", "lrn_across_towers", "code_2012"])
def test_gradients_equal_the_independent_formulations(case):
  """float32 against float32: the model's backward pass (custom VJPs of max pool and
  conv1, LRN's and cnorm2's autodiff, the exchanges' transposes) against autodiff of the
  reference forward. Only summation order differs, so the match is tight."""
  (loss, logits), grads = _loss_and_grads(case)
  (want_loss, want_logits), want = _loss_and_grads(case, reference=True)
  assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(want_logits).max()))
  for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(grads),
                          strict=True):
    w, g = np.asarray(w), np.asarray(g)
    # Measured: within 2e-6 of the leaf's largest entry.
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max(),
                               err_msg=jax.tree_util.keystr(path))


def test_bfloat16_compute_is_float32_within_bfloat16_rounding():
  (loss32, logits32), grads32 = _loss_and_grads("paper", "float32")
  (loss16, logits16), grads16 = _loss_and_grads("paper", "bfloat16")
  assert logits16.dtype == loss16.dtype == jnp.float32
  # The parameters' gradients stay float32, so the optimiser state and updates do.
  assert {g.dtype for g in jax.tree.leaves(grads16)} == {jnp.dtype(jnp.float32)}

  def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

  # bfloat16 keeps 8 significant bits (~0.4% per rounding); measured through the 8
  # layers: logits 0.7%, loss 0.007%.
  err = rel(logits16, logits32)
  assert 2e-3 < err < 0.05, err  # the lower bound: bfloat16 really was used
  assert float(loss16) == pytest.approx(float(loss32), rel=0.01)
  # Why the loose bound: fc8's gradient sees no rounding-flipped ReLU (measured 0.3-0.8%);
  # below it, a pre-activation within rounding of 0 switches its ReLU (or a max pool's
  # winner) and re-routes its gradient (measured per leaf on these 4 images: fc6-7
  # 0.3-0.7%, conv1-5 2-27%). So this says only that bfloat16 compute still trains: a
  # zeroed, doubled or transposed gradient is off by 100% or more. The backward pass
  # itself is checked tightly in float32 against the reference (test above).
  for (path, g32), g16 in zip(jax.tree_util.tree_leaves_with_path(grads32),
                              jax.tree.leaves(grads16), strict=True):
    bound = 0.05 if path[0].key == "fc8" else 0.6
    assert rel(g16, g32) < bound, (jax.tree_util.keystr(path), rel(g16, g32))


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


@pytest.mark.parametrize("changes,field", [
    ({"model.conv_features": (8, 15, 16, 16, 16)}, "model.conv_features[1]"),
    ({"model.activation": "swish"}, "model.activation"),
    ({"model.input_size": 40}, "model.input_size"),
    ({"model.towers": 3}, "model.towers"),
    ({"model.num_classes": 7}, "model.num_classes"),
    ({"model.cross_tower": ("conv9",)}, "model.cross_tower"),
    ({"model.dropout_style": "gaussian"}, "model.dropout_style"),
    ({"input.jpeg_dct_method": "INTEGER_SLOW"}, "input.jpeg_dct_method"),
])
def test_bad_model_config_names_the_field(changes, field):
  with pytest.raises(config_checks.ConfigError) as err:
    config_checks.check(_variant(**changes))
  assert str(err.value).startswith(f"config.{field}:")


# Each layer's geometry (kernel, stride, padding, input side) at few channels.
_CONV_GEOMETRY = {"conv1": (11, 4, (2, 1), 35), "conv2": (5, 1, (2, 2), 13),
                  "conv3": (3, 1, (1, 1), 9), "conv4": (3, 1, (1, 1), 9),
                  "conv5": (3, 1, (1, 1), 9)}


@pytest.mark.parametrize("impl", ["xla", "onednn"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layer", list(_CONV_GEOMETRY))
def test_conv_and_its_gradients_equal_xlas_convolution(layer, dtype, impl):
  """model.conv (xla: conv1's kernel gradient is our im2col + matmul on CPU; onednn:
  oneDNN's three kernels through XLA's FFI) against lax.conv_general_dilated and its own
  autodiff: values and both gradients."""
  if impl == "onednn" and not kernels.available():
    pytest.skip(kernels.unavailable_reason())
  kernel_size, stride, padding, side = _CONV_GEOMETRY[layer]
  rng = np.random.default_rng(7)  # numpy: XLA would compile a sampler per shape
  dt = model_lib.DTYPES[dtype]
  x = jnp.asarray(rng.normal(size=(3, side, side, 6)), dt)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 6, 5)), dt)
  bias = jnp.asarray(rng.normal(size=(5,)), dt)
  y_shape = jax.eval_shape(lambda: model_lib.conv(x, kernel, bias, stride, padding)).shape
  probe = jnp.asarray(rng.normal(size=y_shape), dt)  # a cotangent with no structure

  def xla(x, kernel, bias):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), (padding, padding),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias

  def ours(x, kernel, bias):
    return model_lib.conv(x, kernel, bias, stride, padding, impl)

  def value_and_grads(f):
    y, vjp = jax.vjp(f, x, kernel, bias)
    return (y, *vjp(probe))

  got = jax.jit(lambda: value_and_grads(ours))()
  want = jax.jit(lambda: value_and_grads(xla))()
  # float32: summation order only; bfloat16: our dW is a bf16 matmul (oneDNN's: float32,
  # rounded once), XLA's conv accumulates differently (a few bf16 roundings of a sum of
  # ~kh*kw*C*B*H*W terms).
  tol = 1e-5 if dtype == "float32" else 2e-2
  for name, g, w in zip(("value", "d_input", "d_kernel", "d_bias"), got, want, strict=True):
    assert g.dtype == w.dtype and g.shape == w.shape, name
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    np.testing.assert_allclose(g, w, rtol=tol, atol=tol * np.abs(w).max(), err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_max_pool_and_its_gradient_equal_reduce_window(dtype):
  """Our max over strided views, custom VJP, against reduce_window's select_and_scatter:
  on integer-valued inputs (many ties, as after ReLU) the gradient must go to the same
  first maximum, so the two agree exactly (routing a tie elsewhere fails this)."""
  dt = model_lib.DTYPES[dtype]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 3, (2, 13, 13, 4)), dt)
  # Integer cotangents: where windows overlap a position's gradient is a sum, exact
  # in either order.
  probe = jnp.asarray(rng.integers(-3, 4, (2, 6, 6, 4)), dt)

  def xla(x):
    return jax.lax.reduce_window(x, np.array(-np.inf, dt), jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 "VALID")

  def value_and_grad(f):
    y, vjp = jax.vjp(f, x)
    return y, vjp(probe)[0]

  got = jax.jit(lambda: value_and_grad(lambda x: model_lib.max_pool(x, 3, 2)))()
  want = jax.jit(lambda: value_and_grad(xla))()
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
