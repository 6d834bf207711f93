"""The sharded train and eval steps: the same numbers on every mesh, real sharding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import paper_rule
import pytest
from jax.sharding import PartitionSpec as P

from alexnet_jax import config_checks, optim, parallel, steps
from alexnet_jax import model as model_lib
from experiments import alexnet

# (data, model, microbatch_size): every way to split a step must agree with (1, 1, 0).
MESHES = [(1, 1, 0), (1, 2, 0), (4, 2, 0), (8, 1, 0), (1, 1, 4), (4, 2, 2)]
# The smoke network on 96x96 inputs: every layer and exchange of the 224 one (conv1 23x23,
# pool5 2x2, so fc6 still gathers maps), compiled and run in half the time. The 224
# geometry itself is tests/test_model.py's.
SIZE = 96


def _config(data, model, microbatch=0):
  config = alexnet.get_config("smoke")
  config.model.input_size = SIZE
  config.batch_size = 16
  config.eval_batch_size = 8
  config.microbatch_size = microbatch
  config.mesh.data, config.mesh.model = data, model
  return config


def _batches(n, batch_size=16, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.normal(0, 50, (batch_size, SIZE, SIZE, 3)).astype(np.float32),
           "label": rng.integers(0, 10, batch_size).astype(np.int32)} for _ in range(n)]


@functools.cache
def _run(data, model, microbatch=0, num_steps=2):
  """Steps on one mesh: final params, per-step metrics, the step function, state, mesh, and
  the params before each step and after the last, and each step's key."""
  config = _config(data, model, microbatch)
  mesh = parallel.make_mesh(config)
  layout = steps.state_layout(config, mesh)
  state = steps.create_train_state(config, layout)
  train_step = steps.make_train_step(config, layout, optim.make_schedule(config, 100))
  history, params, rngs = [], [jax.device_get(state.params)], []
  for batch in _batches(num_steps):
    rngs.append(steps.step_rng(state))
    state, metrics = train_step(state, parallel.global_batch(mesh, batch), rngs[-1])
    history.append(jax.device_get(metrics))
    params.append(jax.device_get(state.params))
  return params[-1], history, train_step, state, mesh, params, rngs


@functools.cache
def _unsharded():
  """What `_run` must give on every mesh, without the step: per step, the loss and the
  gradient of the plain model on one device (no shard_map: the tower exchanges are
  concatenations; plain jax.grad of the batch's mean cross-entropy), and the parameters
  after the paper's rule by hand (tests/paper_rule.py) in float64. Same start, same
  batches, and the same dropout masks: the step's key folded with each example's index
  in the global batch."""
  *_, params, rngs = _run(1, 1)
  config = _config(1, 1)
  model = model_lib.AlexNet(config.model)

  @jax.jit
  def loss_and_grads(p, images, labels, rng):
    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.arange(len(labels)))

    def loss(p):
      logits = model.apply(p, images, train=True, rng=keys)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    return jax.value_and_grad(loss)(p)

  lr = config.optim.learning_rate  # constant over these steps (see the metrics test)
  start = paper_rule.flat(params[0])
  losses, grads, after = [], [], [start]
  for batch, rng in zip(_batches(len(rngs)), rngs, strict=True):
    loss, g = loss_and_grads(paper_rule.nest(after[-1]), batch["image"], batch["label"], rng)
    losses.append(float(loss))
    grads.append(paper_rule.flat(g))
    after.append(paper_rule.paper_sgd(start, grads, [lr] * len(grads), config.optim))
  return losses, grads, after


@pytest.mark.parametrize("data,model,microbatch", MESHES[1:])
def test_every_mesh_gives_the_same_step(data, model, microbatch):
  ref_params, ref_metrics, *_ = _run(1, 1)
  params, metrics, *_ = _run(data, model, microbatch)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(ref_params),
                               jax.tree.leaves(params), strict=True):
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=str(path))
  for want, got in zip(ref_metrics, metrics, strict=True):
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("data,model,microbatch", MESHES)
def test_step_is_the_paper_rule_on_jax_grad_of_the_unsharded_loss(data, model, microbatch):
  """The sharded loss and gradients (one tower per device, all_gathers, the pmean over
  `data`, micro-batches) against plain jax.grad of the unsharded model's loss, and the
  update against the paper's rule by hand: v <- 0.9 v - 0.0005 lr w - lr grad; w <- w + v.
  After step 1 the change is -lr (grad + 0.0005 w): the gradient itself; step 2 adds the
  momentum. (A jax.grad of a loss replicated over the model axis, not divided by it,
  doubles the towers' gradients on model=2 meshes.)"""
  _, metrics, *_, params, _ = _run(data, model, microbatch)
  losses, grads, want = _unsharded()
  for step in (1, 2):
    assert metrics[step - 1]["loss"] == pytest.approx(losses[step - 1], rel=1e-5), (
        f"step {step}: loss")
    norm = np.sqrt(sum(np.sum(g ** 2) for g in grads[step - 1].values()))
    assert metrics[step - 1]["grad_norm"] == pytest.approx(norm, rel=1e-5), (
        f"step {step}: gradient norm")
    got = paper_rule.flat(params[step])
    for name, w in want[step].items():
      # Per leaf: 1e-4 of this step's change, plus float32 rounding of the values (the
      # unit biases move by ~1e-5 a step, stored to 1.2e-7).
      change = np.abs(w - want[step - 1][name]).max()
      tol = 1e-4 * change + 4 * np.finfo(np.float32).eps * np.abs(w).max()
      err = np.abs(got[name] - w).max()
      assert err <= tol, (step, name, f"error {err:.3g}, change {change:.3g}, tol {tol:.3g}")


def test_step_reports_its_metrics():
  _, metrics, *_ = _run(1, 1)
  _, _, want = _unsharded()
  assert set(metrics[0]) >= {"loss", "top1_error", "top5_error", "learning_rate",
                             "grad_norm", "param_norm", "update_norm", "finite"}
  assert 2.0 < metrics[0]["loss"] < 2.7  # ~log(10) at init
  norm = lambda tree: np.sqrt(sum(np.sum(x ** 2) for x in tree.values()))  # noqa: E731
  for step, m in enumerate(metrics, start=1):
    assert m["learning_rate"] == pytest.approx(0.01)
    assert m["finite"] == 1.0
    assert m["param_norm"] == pytest.approx(norm(want[step]), rel=1e-5)
    update = {k: want[step][k] - want[step - 1][k] for k in want[step]}
    assert m["update_norm"] == pytest.approx(norm(update), rel=1e-5)
    assert 0.0 <= m["top5_error"] <= m["top1_error"] <= 1.0


def test_tower_parameters_are_sharded_not_replicated():
  *_, state, mesh, _, _ = _run(4, 2)
  kernel = state.params["conv2"]["kernel"]  # [2 towers, 5, 5, 4, 8]
  assert kernel.sharding.spec == P(parallel.MODEL)
  shard_shapes = {s.data.shape for s in kernel.addressable_shards}
  assert shard_shapes == {(1, *kernel.shape[1:])}  # each device: one tower only
  # Device (d, m) holds tower m.
  for shard in kernel.addressable_shards:
    tower = shard.index[0].start
    assert mesh.devices[:, tower].tolist().count(shard.device) == 1
  momentum = jax.tree.leaves(state.opt_state.inner_state)
  tower_leaves = [x for x in momentum if x.ndim > 0]
  assert tower_leaves and all(x.sharding.spec == P(parallel.MODEL) for x in tower_leaves)


def test_step_compiles_once():
  _, _, train_step, state, mesh, *_ = _run(1, 2)
  for batch in _batches(2, seed=1):
    state, _ = train_step(state, parallel.global_batch(mesh, batch), steps.step_rng(state))
  assert train_step._cache_size() == 1


def test_indivisible_batch_is_rejected():
  config = _config(4, 2)
  config.batch_size = 10
  with pytest.raises(config_checks.ConfigError, match=r"config.batch_size: .*10.* 4 devices"):
    parallel.make_mesh(config)


def test_microbatch_that_does_not_divide_the_device_batch_is_rejected():
  config = _config(4, 2, microbatch=3)  # 16 over 4 data devices = 4 per device
  with pytest.raises(config_checks.ConfigError, match=r"config.microbatch_size: 3 .* batch 4"):
    parallel.make_mesh(config)


def _lively(params, seed):
  """Weights N(0, 2 / fan_in), biases N(0, 1): outputs that depend on the image. (At the
  paper's init with unit biases every image gets about the same logits, so ways of
  combining ten crops could not be told apart.) Drawn by numpy: XLA would compile a
  sampler per shape."""
  rng = np.random.default_rng(seed)
  return {name: {"kernel": rng.normal(0, np.sqrt(2 / np.prod(p["kernel"].shape[1:-1])),
                                      p["kernel"].shape).astype(np.float32),
                 "bias": rng.normal(0, 1, p["bias"].shape).astype(np.float32)}
          for name, p in params.items()}


def test_eval_step_counts_only_unmasked_examples_and_averages_ten_crops_softmaxes():
  *_, state, mesh, _, _ = _run(4, 2)
  config = _config(4, 2)
  layout = steps.state_layout(config, mesh)
  params = _lively(jax.device_get(state.params), 9)
  state = state.replace(params=jax.device_put(params, layout.shardings.params))
  eval_step = steps.make_eval_step(config, layout)
  rng = np.random.default_rng(5)
  crops = rng.normal(0, 50, (8, 10, SIZE, SIZE, 3)).astype(np.float32)  # ten different crops
  labels = rng.integers(0, 10, 8).astype(np.int32)
  mask = np.array([True] * 5 + [False] * 3)
  got = jax.device_get(eval_step(state, parallel.global_batch(
      mesh, {"image": crops, "label": labels, "mask": mask})))
  assert got["count"] == 5

  # The paper's rule from the model's logits, crop by crop, on one device.
  model = model_lib.AlexNet(config.model)
  logits = np.asarray(jax.jit(lambda p, x: model.apply(p, x, train=False))(
      params, crops.reshape(80, SIZE, SIZE, 3))).reshape(8, 10, -1).astype(np.float64)

  def sums(probs):
    label_prob = probs[np.arange(8), labels]
    rank = (probs > label_prob[:, None]).sum(-1)  # classes scored above the label
    return {"loss": -np.log(label_prob)[mask].sum(), "top1_errors": (rank >= 1)[mask].sum(),
            "top5_errors": (rank >= 5)[mask].sum()}

  softmax = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(  # noqa: E731
      z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  want = sums(softmax(logits).mean(axis=1))
  assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
  assert (got["top1_errors"], got["top5_errors"]) == (want["top1_errors"], want["top5_errors"])
  # The alternatives give other numbers: mean of the logits, or the first crop alone.
  for other in (sums(softmax(logits.mean(axis=1))), sums(softmax(logits[:, 0]))):
    assert abs(other["loss"] - want["loss"]) > 0.01 * want["loss"]

  centre = jax.device_get(eval_step(state, parallel.global_batch(
      mesh, {"image": crops[:, 0], "label": labels, "mask": mask})))
  assert centre["count"] == 5
  assert centre["loss"] == pytest.approx(sums(softmax(logits[:, 0]))["loss"], rel=1e-4)


def test_plateau_lowers_the_train_steps_learning_rate():
  _, _, train_step, _, mesh, *_ = _run(1, 1)  # its compiled step
  config = _config(1, 1)
  o = config.optim
  assert o.schedule == "plateau" and o.plateau_patience == 2
  state = steps.create_train_state(config, steps.state_layout(config, mesh))
  batch = parallel.global_batch(mesh, _batches(1)[0])
  rates = []
  # As the loop does: one evaluation, then steps. 0.6 improves on nothing yet; two
  # evaluations without improvement (the patience) divide the rate by 10.
  for error in (0.6, 0.6, 0.6, 0.6, 0.5):
    state = state.replace(plateau=optim.plateau_update(config, state.plateau, error))
    state, metrics = train_step(state, batch, steps.step_rng(state))
    rates.append(float(metrics["learning_rate"]))
  lr = o.learning_rate
  assert rates == pytest.approx([lr, lr, lr * o.decay_factor, lr * o.decay_factor,
                                 lr * o.decay_factor])
  assert train_step._cache_size() == 1  # the plateau state is data, not a recompile


def test_bfloat16_step_keeps_float32_parameters_and_optimizer_state():
  config = _config(1, 1)
  config.model.compute_dtype = "bfloat16"
  mesh = parallel.make_mesh(config)
  layout = steps.state_layout(config, mesh)
  train_step = steps.make_train_step(config, layout, optim.make_schedule(config, 100))
  batch = {"image": jax.ShapeDtypeStruct((16, SIZE, SIZE, 3), np.float32),
           "label": jax.ShapeDtypeStruct((16,), np.int32)}
  new_state, metrics = jax.eval_shape(train_step, layout.abstract, batch, jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(new_state.params)} == {np.dtype(np.float32)}
  moments = [x for x in jax.tree.leaves(new_state.opt_state) if x.ndim > 0]
  assert moments and {x.dtype for x in moments} == {np.dtype(np.float32)}
  assert metrics["loss"].dtype == np.float32
