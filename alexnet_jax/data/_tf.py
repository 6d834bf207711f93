"""TensorFlow for the input pipeline only: imported once, kept off any GPU.

The accelerator belongs to JAX; TF runs tf.data on the host CPUs. The caller sets
TF_CPP_MIN_LOG_LEVEL before the first import if it wants quiet logs.
"""

import tensorflow as tf

try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF's runtime was initialised before us; it keeps its devices.
  pass

AUTOTUNE = tf.data.AUTOTUNE


def parallel_calls(config) -> int:
  """`config.input.num_parallel_calls`, with -1 meaning tf.data.AUTOTUNE."""
  n = int(config.input.num_parallel_calls)
  return AUTOTUNE if n == -1 else n


__all__ = ["tf", "AUTOTUNE", "parallel_calls"]
