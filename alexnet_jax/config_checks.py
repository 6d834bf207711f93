"""Validation of a run's ConfigDict, before anything is compiled or read.

Every error is a `ConfigError` that names the offending field, says what was
found and what would work, so a bad sweep point fails in a second, not after
minutes of compilation.
"""

from __future__ import annotations

import ml_collections

from alexnet_jax import model as model_lib


# config.input.mean: subtract the training set's mean image (the paper), its mean colour,
# the published ImageNet mean colour, or nothing.
MEAN_MODES = ("per_pixel", "per_channel", "published", "none")
# input.jpeg_dct_method: TF's decode_jpeg `dct_method`; the first is TF's default (what a
# config written before the field existed decoded with).
DCT_METHODS = ("INTEGER_FAST", "INTEGER_ACCURATE")


class ConfigError(ValueError):
  """A config value that cannot work; the message starts with the field name."""

  def __init__(self, field: str, message: str):
    super().__init__(f"config.{field}: {message}")
    self.field = field


def _require(ok: bool, field: str, message: str) -> None:
  if not ok:
    raise ConfigError(field, message)


def _positive(config: ml_collections.ConfigDict, field: str, allow_zero: bool = False) -> None:
  value = config
  for part in field.split("."):
    value = value[part]
  bound_ok = value >= 0 if allow_zero else value > 0
  _require(bound_ok, field, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_model(m: ml_collections.ConfigDict, prefix: str = "model") -> None:
  """The network itself: widths, names, sizes, per-layer tuples."""
  f = lambda name: f"{prefix}.{name}"  # noqa: E731
  _require(m.towers in (1, 2), f("towers"), f"must be 1 or 2, got {m.towers!r}")
  _require(m.activation in model_lib.ACTIVATIONS, f("activation"),
           f"unknown activation {m.activation!r}; choose one of {sorted(model_lib.ACTIVATIONS)}")
  _require(m.compute_dtype in model_lib.DTYPES, f("compute_dtype"),
           f"unknown dtype {m.compute_dtype!r}; choose one of {sorted(model_lib.DTYPES)}")
  conv_impl = m.get("conv_impl", "auto")
  _require(conv_impl in model_lib.CONV_IMPLS, f("conv_impl"),
           f"unknown convolution {conv_impl!r}; choose one of {model_lib.CONV_IMPLS}")
  if conv_impl == "onednn":
    _require(model_lib.kernels.available(), f("conv_impl"),
             f"oneDNN's convolutions are unavailable: {model_lib.kernels.unavailable_reason()}"
             "; use 'auto' or 'xla'")
  _require(m.dropout_style in ("inverted", "scale_at_test"), f("dropout_style"),
           f"must be 'inverted' or 'scale_at_test', got {m.dropout_style!r}")
  _require(0.0 <= m.dropout_rate < 1.0, f("dropout_rate"),
           f"must be in [0, 1), got {m.dropout_rate!r}")
  n_conv, n_all = len(model_lib.CONV_LAYERS), len(model_lib.LAYERS)
  for name, length in (("conv_features", n_conv), ("conv_kernel_size", n_conv),
                       ("conv_stride", n_conv), ("fc_features", 2),
                       ("init_weight_std", n_all), ("init_bias", n_all)):
    _require(len(m[name]) == length, f(name), f"needs {length} values, got {len(m[name])}")
  widths = tuple(m.conv_features) + tuple(m.fc_features) + (m.num_classes,)
  for name, width in zip(model_lib.LAYERS, widths, strict=True):
    field = (f(f"conv_features[{model_lib.CONV_LAYERS.index(name)}]")
             if name.startswith("conv") else
             f("num_classes") if name == "fc8" else
             f(f"fc_features[{model_lib.FC_LAYERS.index(name)}]"))
    _require(width > 0, field, f"must be > 0, got {width}")
    _require(width % m.towers == 0, field,
             f"{name} width {width} does not split over {m.towers} towers "
             f"(each tower owns width / towers kernels)")
  unknown = set(m.cross_tower) - set(model_lib.LAYERS[1:])
  _require(not unknown, f("cross_tower"),
           f"unknown layers {sorted(unknown)}; choose from {model_lib.LAYERS[1:]}")
  unknown = set(m.lrn.layers) - set(model_lib.CONV_LAYERS)
  _require(not unknown, f("lrn.layers"), f"unknown layers {sorted(unknown)}")
  _require(len(m.conv1_padding) == 2, f("conv1_padding"), "needs (before, after)")
  _require(m.pool_window > 0 and m.pool_stride > 0, f("pool_window"),
           "pool window and stride must be > 0")
  _require(all(std > 0 for std in m.init_weight_std), f("init_weight_std"),
           "every std must be > 0")
  sizes = model_lib.spatial_sizes(m)
  _require(min(sizes.values()) >= 1, f("input_size"),
           f"{m.input_size} is too small for the stack of layers (spatial sizes {sizes}); "
           "AlexNet needs about 67 pixels or more")


def check_mesh(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """(data, model) mesh shape for `num_devices`; the global batch must split over data."""
  towers, model_axis = config.model.towers, config.mesh.model
  if model_axis == -1:  # auto: one tower per device where the devices allow it
    model_axis = towers if num_devices % towers == 0 else 1
  _require(model_axis >= 1 and towers % model_axis == 0, "mesh.model",
           f"{model_axis} devices per replica cannot hold {towers} tower(s); "
           f"use -1 (auto) or a divisor of model.towers ({'1 or 2' if towers == 2 else '1'})")
  data = config.mesh.data if config.mesh.data > 0 else num_devices // model_axis
  _require(data >= 1 and data * model_axis <= num_devices, "mesh.data",
           f"mesh data={data} x model={model_axis} needs {data * model_axis} devices; "
           f"{num_devices} are available")
  _require(config.batch_size % data == 0, "batch_size",
           f"global batch {config.batch_size} does not divide over the {data} devices of "
           f"the data axis; use a multiple of {data}")
  local = config.batch_size // data
  _require(config.microbatch_size >= 0 and local % max(config.microbatch_size, 1) == 0,
           "microbatch_size",
           f"{config.microbatch_size} does not divide the per-device batch {local} "
           f"(batch_size {config.batch_size} over {data} data devices); use a divisor or 0")
  _require(config.eval_batch_size % data == 0, "eval_batch_size",
           f"eval batch {config.eval_batch_size} does not divide over the {data} devices of "
           f"the data axis; use a multiple of {data}")
  return data, model_axis


def check_optim(config: ml_collections.ConfigDict) -> None:
  o = config.optim
  _require(o.schedule in ("constant", "piecewise", "plateau"), "optim.schedule",
           f"unknown schedule {o.schedule!r}; choose constant, piecewise or plateau")
  _require(o.optimizer in ("sgd", "adam"), "optim.optimizer",
           f"unknown optimizer {o.optimizer!r}; choose sgd (the paper's) or adam")
  _require(len(o.layer_lr_multipliers) == len(model_lib.LAYERS), "optim.layer_lr_multipliers",
           f"needs {len(model_lib.LAYERS)} values (conv1..fc8), got {len(o.layer_lr_multipliers)}")
  for name in ("learning_rate",):
    _positive(config, f"optim.{name}")
  for name in ("momentum", "weight_decay", "warmup_epochs", "bias_lr_multiplier"):
    _positive(config, f"optim.{name}", allow_zero=True)
  _require(0.0 < o.decay_factor < 1.0, "optim.decay_factor",
           f"must be in (0, 1), got {o.decay_factor}")
  _require(list(o.boundaries_epochs) == sorted(o.boundaries_epochs), "optim.boundaries_epochs",
           "boundaries must be increasing")
  _positive(config, "optim.plateau_patience")
  _positive(config, "optim.plateau_max_reductions", allow_zero=True)


def check_loop(config: ml_collections.ConfigDict) -> None:
  for name in ("batch_size", "eval_batch_size", "eval_every_steps",
               "checkpoint_every_steps", "keep_checkpoints", "log_every_steps"):
    _positive(config, name)
  _require(config.num_train_steps > 0 or config.num_epochs > 0, "num_epochs",
           "set num_epochs > 0 or num_train_steps > 0")
  _require(len(config.profile_steps) in (0, 2), "profile_steps",
           "give () or (first_step, last_step)")
  _require(config.on_nonfinite in ("halt", "rollback"), "on_nonfinite",
           f"must be 'halt' or 'rollback', got {config.on_nonfinite!r}")
  _positive(config, "nonfinite_max_rollbacks", allow_zero=True)


def _choice(value, field: str, choices: tuple[str, ...]) -> None:
  _require(value in choices, field,
           f"unknown value {value!r}; choose one of {', '.join(map(repr, choices))}")


def check_input(config: ml_collections.ConfigDict) -> None:
  """The input pipeline's fields (the pipeline trusts them: checked here, once)."""
  i = config.input
  _choice(i.mean, "input.mean", MEAN_MODES)
  _choice(i.stats, "input.stats", ("computed", "published"))
  _choice(i.pca_scale, "input.pca_scale", ("eigenvalues", "sqrt"))
  _choice(i.on_bad_image, "input.on_bad_image", ("skip", "error"))
  _choice(i.get("jpeg_dct_method", DCT_METHODS[0]), "input.jpeg_dct_method", DCT_METHODS)
  _positive(config, "input.train_divisor")
  _positive(config, "input.resize_size")
  _require(config.model.input_size <= i.resize_size, "model.input_size",
           f"{config.model.input_size} exceeds config.input.resize_size={i.resize_size}: "
           "crops are cut from the resized square")
  if i.get("mean_rgb") is not None:
    _require(len(i.mean_rgb) == 3, "input.mean_rgb", f"needs 3 values (R, G, B), got {i.mean_rgb}")


def check(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """All static checks; `num_devices` adds the mesh and batch-split checks."""
  check_model(config.model)
  check_optim(config)
  check_loop(config)
  check_input(config)
  if num_devices is not None:
    check_mesh(config, num_devices)
