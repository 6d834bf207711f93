"""alexnet_jax/kernels: oneDNN's convolutions through XLA's FFI (the optional extension).

Their values and gradients against XLA's are tests/test_model.py's
test_conv_and_its_gradients_equal_xlas_convolution[...-onednn]; mesh parity and exact
resume are tests/test_steps.py's and tests/test_train.py's, which run the default
model.conv_impl="auto" (oneDNN's where the extension is built). Here: determinism, the
primitive cache, vmap and shard_map, and the fallback when the extension is missing.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from alexnet_jax import config_checks, kernels
from alexnet_jax import model as model_lib
from experiments import alexnet

needs_onednn = pytest.mark.skipif(not kernels.available(),
                                  reason=f"oneDNN: {kernels.unavailable_reason()}")


def _value_and_grads(stride, padding):
  def f(x, kernel, probe):
    y, vjp = jax.vjp(lambda x, k: kernels.conv(x, k, stride, padding), x, kernel)
    return (y, *vjp(probe))
  return jax.jit(f)


@needs_onednn
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_onednn_conv_is_bit_identical_run_to_run(dtype):
  """Same inputs, same thread count: the same bits, in all three directions (oneDNN
  splits the work statically; the kernel gradient's reduction over the batch is
  split over threads the same way every call). A conv2-like shape, big enough that
  every direction is split over the threads."""
  rng = np.random.default_rng(0)
  dt = model_lib.DTYPES[dtype]
  x = jnp.asarray(rng.normal(size=(8, 13, 13, 48)), dt)
  kernel = jnp.asarray(rng.normal(size=(5, 5, 48, 64)), dt)
  probe = jnp.asarray(rng.normal(size=(8, 13, 13, 64)), dt)
  f = _value_and_grads(1, (2, 2))
  first = [np.asarray(a) for a in f(x, kernel, probe)]
  again = [np.asarray(a) for a in f(x, kernel, probe)]
  for name, a, b in zip(("value", "d_input", "d_kernel"), first, again, strict=True):
    assert a.tobytes() == b.tobytes(), name


@needs_onednn
def test_primitives_are_built_once_per_geometry():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 19, 19, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(11, 11, 3, 4)), jnp.float32)
  probe = jnp.zeros((2, 3, 3, 4), jnp.float32)
  f = _value_and_grads(4, (0, 3))
  jax.block_until_ready(f(x, kernel, probe))
  built = kernels.cache_size()
  jax.block_until_ready(f(x + 1, kernel, probe))
  assert kernels.cache_size() == built  # same geometry: no new primitive
  jax.block_until_ready(f(x[:1], kernel, probe[:1]))
  assert kernels.cache_size() == built + 3  # a new batch size: one per direction


@needs_onednn
def test_onednn_conv_under_vmap_and_shard_map():
  """vmap runs the calls in sequence; under shard_map (the towers), each device's
  convolution sees its own shard, and the gradient of a replicated kernel is summed."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(4, 2, 9, 9, 6)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 6, 5)), jnp.float32)

  def xla(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def ours(x, k):
    return kernels.conv(x, k, 1, (1, 1))

  np.testing.assert_allclose(jax.jit(jax.vmap(ours, (0, None)))(x, kernel),
                             jax.vmap(xla, (0, None))(x, kernel), rtol=1e-5, atol=1e-4)
  mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])

  def loss(f):
    def sharded(x, k):
      return jax.lax.psum((f(x[0], k) ** 2).sum(), "data")
    return jax.shard_map(sharded, mesh=mesh, in_specs=(P("data"), P()), out_specs=P())

  x = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data")))
  kernel = jax.device_put(kernel, jax.sharding.NamedSharding(mesh, P()))
  got = jax.jit(jax.value_and_grad(loss(ours), argnums=(0, 1)))(x, kernel)
  want = jax.jit(jax.value_and_grad(loss(xla), argnums=(0, 1)))(x, kernel)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4 * np.abs(w).max())


def test_without_the_extension_auto_is_xlas_with_one_line_and_onednn_is_a_config_error(
    monkeypatch, caplog):
  reason = "the oneDNN extension was not built (test)"
  monkeypatch.setattr(kernels, "_load", lambda: (None, reason))
  model_lib._auto_conv_impl.cache_clear()
  try:
    with caplog.at_level(logging.WARNING):
      assert model_lib.resolve_conv_impl("auto") == "xla"
      assert model_lib.resolve_conv_impl("auto") == "xla"
    lines = [r.getMessage() for r in caplog.records if "conv_impl" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0], lines
    assert model_lib.resolve_conv_impl("xla") == "xla"
    config = alexnet.get_config("smoke")
    config_checks.check_model(config.model)  # auto: fine
    config.model.conv_impl = "onednn"
    with pytest.raises(config_checks.ConfigError, match="model.conv_impl") as err:
      config_checks.check_model(config.model)
    assert reason in str(err.value) and "\n" not in str(err.value)
    config.model.conv_impl = "mkl"
    with pytest.raises(config_checks.ConfigError, match="model.conv_impl"):
      config_checks.check_model(config.model)
  finally:
    model_lib._auto_conv_impl.cache_clear()


@needs_onednn
def test_auto_is_onednn_on_cpu_where_built():
  model_lib._auto_conv_impl.cache_clear()
  assert model_lib.resolve_conv_impl("auto") == "onednn"
  assert model_lib._auto_conv_impl("gpu") == "xla"
