"""torchvision AlexNet -> our single-column model: same logits as torch on the same images.

The torch half runs in a subprocess under a Python that has torch (the benchmark's
.venv-torch, or this interpreter if it has torch); torchvision is not needed: the
script below builds torchvision's AlexNet layer for layer, with its key names.
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from alexnet_jax import checkpoint, model, parallel, steps

from alexnet_jax.tools import convert_torchvision
from experiments import single_column

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_VENV_PYTHON = os.path.join(ROOT, ".venv-torch", "bin", "python")

TORCH_SCRIPT = textwrap.dedent("""
    import subprocess, sys
    import numpy as np
    import torch
    from torch import nn

    workdir, converter_python = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    torch.set_num_threads(1)

    class AlexNet(nn.Module):  # torchvision.models.AlexNet, layer for layer
      def __init__(self, num_classes=1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(p=0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes))

      def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))

    net = AlexNet()
    # torch's default init shrinks activations ~2.5x a layer (logits ~1e-3): He init
    # and non-zero biases keep them O(1), so a relative tolerance means something.
    for m in net.modules():
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        nn.init.uniform_(m.bias, -0.1, 0.1)
    net.eval()
    torch.save(net.state_dict(), f"{workdir}/alexnet.pth")
    subprocess.run([converter_python, "-m", "alexnet_jax.tools.convert_torchvision",
                    f"--state_dict={workdir}/alexnet.pth", f"--out={workdir}/alexnet.npz"],
                   check=True)

    pixels = np.load(f"{workdir}/pixels.npy")  # [B, S, S, 3], 0-255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255.0 - mean) / std
    with torch.no_grad():
      logits = net(x)
    np.save(f"{workdir}/logits.npy", logits.numpy())
""")


def _torch_python() -> str | None:
  if os.path.exists(TORCH_VENV_PYTHON):
    return TORCH_VENV_PYTHON
  try:
    import torch  # noqa: F401
  except ImportError:
    return None
  return sys.executable


def test_imported_weights_give_torchvisions_logits(tmp_path):
  python = _torch_python()
  if python is None:
    pytest.skip(f"no torch environment: neither {TORCH_VENV_PYTHON} (made by "
                "benchmarks/torch_peer/setup_venv.sh) nor `import torch` here")
  config = single_column.get_config()
  size = config.model.input_size
  rng = np.random.default_rng(0)
  pixels = rng.uniform(0, 255, (2, size, size, 3)).astype(np.float32)
  np.save(tmp_path / "pixels.npy", pixels)
  (tmp_path / "make.py").write_text(TORCH_SCRIPT)
  env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
  out = subprocess.run([python, str(tmp_path / "make.py"), str(tmp_path), python],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  want = np.load(tmp_path / "logits.npy")

  with np.load(tmp_path / "alexnet.npz") as z:
    assert sorted(z.files) == sorted(convert_torchvision.KEYS)
  params = convert_torchvision.params_from_torchvision(tmp_path / "alexnet.npz", config)
  net = model.AlexNet(config.model)
  assert jax.tree.map(np.shape, params) == jax.tree.map(
      np.shape, jax.eval_shape(net.init, jax.random.key(0)))
  # Our pipeline's input: 0-255 scale minus exactly 255 * torchvision's mean.
  images = pixels - np.asarray(convert_torchvision.TORCHVISION_MEAN_RGB, np.float32)
  got = np.asarray(jax.jit(lambda p, x: net.apply(p, x, train=False))(params, images))

  scale = np.abs(want).max()
  assert scale > 0.5, f"logits too small ({scale}) for the tolerance to mean anything"
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)
  assert (got.argmax(-1) == want.argmax(-1)).all()


def test_fc6_rows_are_permuted_from_chw_to_hwc():
  # A one-hot fc6 input feature: torchvision's (c, h, w) index must land on our (h, w, c).
  config = single_column.get_config()
  m = config.model
  shapes = model.AlexNet(m).kernel_shapes()
  side = model.spatial_sizes(m)["pool5"]
  channels = m.conv_features[-1]
  arrays = {}
  for layer, prefix in convert_torchvision.TORCHVISION_LAYERS.items():
    shape = shapes[layer]
    torch_shape = ((shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4
                   else (shape[1], shape[0]))
    arrays[f"{prefix}.weight"] = np.zeros(torch_shape, np.float32)
    arrays[f"{prefix}.bias"] = np.zeros(shape[-1], np.float32)
  c, h, w, out = 5, 2, 3, 7
  arrays["classifier.1.weight"][out, c * side * side + h * side + w] = 1.0
  params = convert_torchvision.params_from_torchvision(arrays, config)
  fc6 = params["fc6"]["kernel"][0]
  assert fc6[(h * side + w) * channels + c, out] == 1.0 and fc6.sum() == 1.0


def test_other_networks_are_refused():
  config = single_column.get_config()
  config.model.lrn.enabled = True
  config.model.conv1_padding = (0, 3)
  with pytest.raises(ValueError, match="single_column") as err:
    convert_torchvision.params_from_torchvision({}, config)
  assert "model.lrn.enabled" in str(err.value) and "model.conv1_padding" in str(err.value)


def test_save_as_checkpoint_restores_the_params(tmp_path):
  config = single_column.get_config("smoke")  # same code path, tiny widths
  net = model.AlexNet(config.model)
  # Random params of the network's shapes: their init is not under test. Nor are the
  # values of the fresh state save_as_checkpoint draws around them: drawn with the
  # non-partitionable threefry, whose normal() compiles ~7x faster on a CPU (19 s -> 2 s).
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                        jax.eval_shape(net.init, jax.random.key(1)))
  with jax.threefry_partitionable(False):
    convert_torchvision.save_as_checkpoint(params, config, str(tmp_path))
  assert checkpoint.Checkpointer(str(tmp_path), read_only=True).latest_step() == 0
  config.mesh.data, config.mesh.model = 1, 1
  mesh = parallel.make_mesh(config, jax.devices()[:1])
  ckpt = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  state = ckpt.restore(steps.state_layout(config, mesh).abstract, config=config)
  ckpt.close()
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(state.params)),
                  strict=True):
    np.testing.assert_array_equal(a, b)
