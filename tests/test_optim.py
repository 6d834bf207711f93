"""The paper's update rule, its bias options and the schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet_jax import checkpoint, optim, steps
from experiments import alexnet


def _two_steps(config, lrs):
  optimizer = optim.make_optimizer(config)
  params = {"conv1": {"kernel": jnp.array([[1.0, -2.0]]), "bias": jnp.array([[0.5]])}}
  grads = [{"conv1": {"kernel": jnp.array([[0.3, 0.1]]), "bias": jnp.array([[-0.2]])}},
           {"conv1": {"kernel": jnp.array([[-0.4, 0.2]]), "bias": jnp.array([[0.7]])}}]
  state = optimizer.init(params)
  for g, lr in zip(grads, lrs, strict=True):
    state = optim.set_learning_rate(state, jnp.float32(lr))
    updates, state = optimizer.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, grads


@pytest.mark.parametrize("bias_decay,bias_mult,layer_mult", [(True, 1.0, 1.0), (False, 2.0, 0.5)])
def test_two_steps_equal_the_hand_computed_rule(bias_decay, bias_mult, layer_mult):
  config = alexnet.get_config()
  config.optim.bias_weight_decay = bias_decay
  config.optim.bias_lr_multiplier = bias_mult
  config.optim.layer_lr_multipliers = (layer_mult,) + (1.0,) * 7  # conv1's rate
  lrs = [0.1, 0.05]  # the rate changes between steps: lr sits inside the momentum
  got, grads = _two_steps(config, lrs)

  mom, wd = 0.9, 0.0005
  for name, mult, decay in (("kernel", layer_mult, wd),
                            ("bias", layer_mult * bias_mult, wd if bias_decay else 0.0)):
    w = np.array({"kernel": [[1.0, -2.0]], "bias": [[0.5]]}[name])
    v = np.zeros_like(w)
    for g, lr in zip(grads, lrs, strict=True):
      g = np.asarray(g["conv1"][name])
      v = mom * v - decay * (mult * lr) * w - (mult * lr) * g  # v <- 0.9v - wd*lr*w - lr*grad
      w = w + v
    np.testing.assert_allclose(np.asarray(got["conv1"][name]), w, rtol=1e-6)


def test_piecewise_schedule_and_warmup():
  config = alexnet.get_config()
  config.optim.schedule = "piecewise"
  config.optim.boundaries_epochs = (2.0, 3.0)
  plateau = optim.make_plateau(config).init(None)  # scale 1
  sched = optim.make_schedule(config, steps_per_epoch=10)
  assert [float(sched(s, plateau)) for s in (0, 19, 20, 29, 30)] == pytest.approx(
      [0.01, 0.01, 0.001, 0.001, 0.0001])
  config.optim.warmup_epochs = 1.0
  sched = optim.make_schedule(config, steps_per_epoch=10)
  assert float(sched(0, plateau)) == pytest.approx(0.001)
  assert float(sched(9, plateau)) == pytest.approx(0.01)
  lowered = plateau._replace(scale=plateau.scale * 0.1)  # the plateau rule multiplies in
  assert float(sched(29, lowered)) == pytest.approx(0.0001)


def test_plateau_divides_after_patience_and_stops_after_max_reductions():
  config = alexnet.get_config()
  config.optim.plateau_patience = 2
  config.optim.plateau_max_reductions = 2
  state = optim.make_plateau(config).init(None)
  scales = []
  for err in [0.9, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]:
    state = optim.plateau_update(config, state, err)
    scales.append(float(state.scale))
  # improvements at 0.9, 0.8, 0.7; two evaluations without -> /10; at most twice.
  np.testing.assert_allclose(scales, [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.01,
                                      0.01], rtol=1e-5)
  config.optim.schedule = "constant"  # other schedules ignore evaluations
  assert optim.plateau_update(config, state, 0.1) is state


def test_plateau_state_round_trips_through_a_checkpoint(tmp_path):
  config = alexnet.get_config("smoke")
  # A TrainState of the run's structure, zeros but for a fresh plateau state: the values
  # of the init are not under test (and its normal() draws compile for seconds on a CPU).
  shapes = jax.eval_shape(lambda: steps.init_state(config, optim.make_optimizer(config)))
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  state = state.replace(plateau=optim.make_plateau(config).init(None))
  for err in (0.5, 0.5, 0.5):
    state = state.replace(plateau=optim.plateau_update(config, state.plateau, err))
  assert float(state.plateau.scale) == pytest.approx(0.1)
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(state, config)
  ckpt.wait()
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  restored = checkpoint.Checkpointer(str(tmp_path)).restore(target)
  for a, b in zip(jax.tree.leaves(restored.plateau), jax.tree.leaves(state.plateau), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ckpt.close()


def test_adam_option_for_demos_updates_parameters():
  config = alexnet.get_config()
  config.optim.optimizer = "adam"
  got, _ = _two_steps(config, [1e-3, 1e-3])
  # Adam's steps move a weight by about the rate each, against the gradient's
  # sign: the second kernel weight had gradients +0.1 then +0.2.
  moved = np.asarray(got["conv1"]["kernel"]) - [[1.0, -2.0]]
  assert moved[0, 1] == pytest.approx(-2e-3, rel=0.05)
  assert abs(moved[0, 0]) < 2e-3
