r"""Imports torchvision's AlexNet weights into the single-column config.

torchvision's `alexnet` is the single-column network of "One weird trick"
(experiments/single_column.py): one tower, widths 64-192-384-256-256, conv1
padding 2, no LRN, fc 4096-4096-1000. torch is not a dependency of this
project, so the import has two halves in two interpreters:

  # 1. under any Python that has torch (e.g. the benchmark's .venv-torch):
  #    the state_dict's arrays -> a plain .npz with torchvision's key names
  .venv-torch/bin/python -m alexnet_jax.tools.convert_torchvision \
      --state_dict=alexnet-owt-7be5be79.pth --out=alexnet_tv.npz

  # 2. under the project's venv: the .npz -> a checkpoint (step 0) in a workdir
  .venv/bin/python -m alexnet_jax.tools.convert_torchvision \
      --npz=alexnet_tv.npz --workdir=runs/torchvision

  # then evaluate it with this project's pipeline:
  .venv/bin/python main.py --mode=eval --workdir=runs/torchvision \
      --config=experiments/single_column.py --config.dataset.manual_dir=... \
      --config.input.mean=per_channel \
      --config.input.mean_rgb="(123.675,116.28,103.53)" \
      [--config.input.resize_antialias=True]

Input scale. torchvision feeds (x/255 - mean) / std per channel with mean (0.485,
0.456, 0.406), std (0.229, 0.224, 0.225); this project feeds x - mean_rgb on the
0-255 scale. The conversion folds 1 / (255 std_c) into conv1's input channels, so
the imported network is exact only if the pipeline subtracts exactly 255 * mean
per channel: `input.mean='per_channel'` with `input.mean_rgb=TORCHVISION_MEAN_RGB`
(the computed or published means differ by a few levels). Zero padding then
matches too: 0 in torchvision's normalised space is 0 in ours. torchvision's
resize is antialiased (its eval transform: Resize(256), CenterCrop(224)).

Layouts. conv weight [O, I, kh, kw] -> kernel [1, kh, kw, I, O]; linear weight
[out, in] -> kernel [1, in, out]; biases [n] -> [1, n]. torchvision flattens pool5
in (C, H, W) order, this model in (H, W, C): fc6's rows are permuted accordingly.

This module's top level imports only numpy and the standard library so that
half 1 runs in a torch-only environment; JAX is imported inside the functions
of half 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

# torchvision's ImageNet input normalisation (0-1 scale).
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
# What this project's pipeline must subtract (0-255 scale) for imported weights.
TORCHVISION_MEAN_RGB = tuple(255.0 * m for m in TORCHVISION_MEAN)

# Our layer -> torchvision's module prefix.
TORCHVISION_LAYERS = {
    "conv1": "features.0", "conv2": "features.3", "conv3": "features.6",
    "conv4": "features.8", "conv5": "features.10",
    "fc6": "classifier.1", "fc7": "classifier.4", "fc8": "classifier.6",
}
KEYS = tuple(f"{prefix}.{kind}" for prefix in TORCHVISION_LAYERS.values()
             for kind in ("weight", "bias"))


# ------------------------------------------------------------------ half 1 (torch)


def state_dict_to_npz(state_dict_path: str, out_path: str) -> list[str]:
  """torchvision AlexNet .pth -> .npz of float32 arrays under torchvision's key names.

  Runs under torch only (no JAX). Accepts a plain state_dict, one wrapped in
  {"state_dict": ...} or {"model": ...}, and DataParallel's "module." prefixes.
  Returns the keys written.
  """
  import torch

  loaded = torch.load(state_dict_path, map_location="cpu", weights_only=True)
  if isinstance(loaded, torch.nn.Module):
    loaded = loaded.state_dict()
  for wrapper in ("state_dict", "model"):
    if isinstance(loaded, dict) and wrapper in loaded and isinstance(loaded[wrapper], dict):
      loaded = loaded[wrapper]
  state = {k.removeprefix("module."): v for k, v in loaded.items()}
  missing = [k for k in KEYS if k not in state]
  if missing:
    raise KeyError(f"{state_dict_path} is not a torchvision AlexNet state_dict: missing "
                   f"{missing}; it has {sorted(state)[:12]}")
  arrays = {k: state[k].detach().to(torch.float32).cpu().numpy() for k in KEYS}
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  np.savez(out_path, **arrays)
  return list(arrays)


# ------------------------------------------------------------------ half 2 (JAX)


def _check_config(model_cfg) -> None:
  """Raises ValueError naming every model field that torchvision's network does not have."""
  problems = []

  def want(field: str, value, expected) -> None:
    norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    if norm(value) != norm(expected):
      problems.append(f"model.{field}={value!r} (torchvision: {expected!r})")

  want("towers", model_cfg.towers, 1)
  want("conv_kernel_size", model_cfg.conv_kernel_size, (11, 5, 3, 3, 3))
  want("conv_stride", model_cfg.conv_stride, (4, 1, 1, 1, 1))
  want("conv1_padding", model_cfg.conv1_padding, (2, 2))
  want("pool_window", model_cfg.pool_window, 3)
  want("pool_stride", model_cfg.pool_stride, 2)
  want("activation", model_cfg.activation, "relu")
  want("lrn.enabled", model_cfg.lrn.enabled, False)
  want("cnorm2.enabled", model_cfg.cnorm2.enabled, False)
  if model_cfg.dropout_rate > 0:
    # torch's nn.Dropout is inverted: nothing is scaled at test time.
    want("dropout_style", model_cfg.dropout_style, "inverted")
  if problems:
    raise ValueError("the config is not torchvision's AlexNet (use "
                     "experiments/single_column.py): " + "; ".join(problems))


def params_from_torchvision(npz_path_or_dict: str | os.PathLike | dict[str, Any],
                            config) -> dict[str, dict[str, np.ndarray]]:
  """torchvision AlexNet arrays -> this model's params (float32 numpy, tower axis 1).

  Args:
    npz_path_or_dict: the .npz of half 1, or a {torchvision key: array} dict.
    config: the run's config (or its .model); must be the single-column network.

  Returns:
    {layer: {"kernel": [1, kh, kw, cin, cout] or [1, din, dout], "bias": [1, cout]}},
    for images fed as x - TORCHVISION_MEAN_RGB on the 0-255 scale (see the module
    docstring): conv1's input channels carry torchvision's 1 / (255 std).
  """
  from alexnet_jax import model as model_lib

  model_cfg = config.model if "model" in config else config
  _check_config(model_cfg)
  if isinstance(npz_path_or_dict, dict):
    arrays = {k: np.asarray(v, np.float32) for k, v in npz_path_or_dict.items()}
  else:
    with np.load(npz_path_or_dict) as z:
      arrays = {k: z[k].astype(np.float32) for k in z.files}
  missing = [k for k in KEYS if k not in arrays]
  if missing:
    raise KeyError(f"not torchvision AlexNet arrays: missing {missing}")

  shapes = model_lib.AlexNet(model_cfg).kernel_shapes()  # per tower, without the tower axis
  params = {}
  for layer, prefix in TORCHVISION_LAYERS.items():
    w, b = arrays[f"{prefix}.weight"], arrays[f"{prefix}.bias"]
    if layer in model_lib.CONV_LAYERS:
      kernel = w.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
    else:
      kernel = w.T  # [out, in] -> [in, out]
    if kernel.shape != shapes[layer] or b.shape != (shapes[layer][-1],):
      raise ValueError(f"{prefix}: weight {w.shape} / bias {b.shape} do not fit {layer} of "
                       f"the config (kernel {shapes[layer]}); is it torchvision's alexnet "
                       "with config.model.num_classes matching?")
    if layer == "fc6":
      # torchvision's rows are pool5 flattened as (c, h, w); ours are (h, w, c).
      channels = model_cfg.conv_features[-1]
      side = model_lib.spatial_sizes(model_cfg)["pool5"]
      kernel = (kernel.reshape(channels, side, side, -1).transpose(1, 2, 0, 3)
                .reshape(side * side * channels, -1))
    if layer == "conv1":
      # torchvision: conv1((x/255 - mean)/std); ours: conv1'(x - 255 mean), so
      # conv1' = conv1 / (255 std) on each input channel.
      kernel = kernel / (255.0 * np.asarray(TORCHVISION_STD, np.float32))[:, None]
    params[layer] = {"kernel": kernel[None].astype(np.float32),
                     "bias": b[None].astype(np.float32)}
  return params


def save_as_checkpoint(params, config, workdir: str) -> str:
  """Saves `params` as a fresh TrainState (step 0) in workdir/checkpoints.

  The optimizer state is a fresh one, so `main.py --mode=eval` evaluates the
  params and `--mode=train` would fine-tune from them. Returns the checkpoint
  directory.
  """
  import jax
  import jax.numpy as jnp

  from alexnet_jax import checkpoint, optim, steps

  state = steps.init_state(config, optim.make_optimizer(config))
  expected = jax.tree.map(lambda x: x.shape, state.params)
  given = jax.tree.map(lambda x: tuple(np.shape(x)), params)
  if expected != given:
    raise ValueError(f"params do not fit the config: config {expected}, params {given}")
  state = state.replace(params=jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params))
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save(state, config)
  ckpt.close()
  return ckpt.directory


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m alexnet_jax.tools.convert_torchvision", description=__doc__.split("\n")[0],
      epilog="Either --state_dict with --out (under torch), or --npz with --workdir (under "
      "this project's venv).")
  parser.add_argument("--state_dict", help="torchvision AlexNet .pth (needs torch)")
  parser.add_argument("--out", help="the .npz to write from --state_dict")
  parser.add_argument("--npz", help="the .npz written by --state_dict/--out (needs JAX)")
  parser.add_argument("--workdir", help="where to save the checkpoint from --npz")
  parser.add_argument("--config", default="experiments/single_column.py",
                      help="experiment config file[:variant] for --npz, relative to the cwd or "
                      "the repo root (default: %(default)s)")
  args = parser.parse_args(argv)

  if args.state_dict or args.out:
    if not (args.state_dict and args.out):
      parser.error("--state_dict and --out go together")
    keys = state_dict_to_npz(args.state_dict, args.out)
    print(f"wrote {len(keys)} arrays to {args.out}")
    return 0
  if not (args.npz and args.workdir):
    parser.error("give --state_dict and --out (half 1), or --npz and --workdir (half 2)")
  from alexnet_jax import config_files  # half 2 only: half 1 runs without ml_collections

  config = config_files.get_config(args.config)
  # Record in the checkpoint's config the input these weights need.
  config.input.mean = "per_channel"
  if "mean_rgb" in config.input:
    config.input.mean_rgb = TORCHVISION_MEAN_RGB
  params = params_from_torchvision(args.npz, config)
  directory = save_as_checkpoint(params, config, args.workdir)
  print(f"saved the imported weights (step 0) to {directory}. Evaluate with the same "
        f"--config and --config.input.mean=per_channel --config.input.mean_rgb="
        f"\"({','.join(f'{m:g}' for m in TORCHVISION_MEAN_RGB)})\"")
  return 0


if __name__ == "__main__":
  sys.exit(main())
