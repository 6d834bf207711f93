"""The 2012 two-tower AlexNet in PyTorch: the speed-benchmark peer of alexnet_jax.

Runs only in the peer's Python 3.11 venv (.venv-torch/, see setup_venv.sh); the
project itself never imports torch.

It is the same network as the project's default config (experiments/alexnet.py):

  input 224x224x3, zero-padded by 3 pixels on the bottom/right (cuda-convnet's
    "overhang": 224 + 3 = 227, so conv1 gives 55x55 like the paper)
  conv1 96 11x11/4            -> ReLU -> LRN (per tower) -> maxpool 3/2   27x27x96
  conv2 256 5x5 pad 2, 2 grp  -> ReLU -> LRN (per tower) -> maxpool 3/2   13x13x256
  conv3 384 3x3 pad 1 (both towers) -> ReLU
  conv4 384 3x3 pad 1, 2 grp  -> ReLU
  conv5 256 3x3 pad 1, 2 grp  -> ReLU -> maxpool 3/2                       6x6x256
  fc6 9216->4096 ReLU dropout 0.5, fc7 4096->4096 ReLU dropout 0.5, fc8 4096->classes

Dropout is the paper's form by default ("scale_at_test": units are dropped with p 0.5 in
training and outputs multiplied by 0.5 at test time), as in experiments/alexnet.py;
"inverted" (PyTorch's nn.Dropout: x2 in training) is equal in expectation but doubles
fc7's and fc8's inputs in training, which matters at the paper's init (fidelity/README).

Channels are ordered [tower A | tower B], so `groups=2` is exactly "each tower sees
only its own half" and the cross-tower layers (conv3, fc6-fc8) are ordinary ones.
60,965,224 parameters for 1000 classes (`self_check` asserts it).

LRN alpha. The paper writes b_i = a_i / (k + alpha * sum_j a_j^2)^beta with
alpha = 1e-4. PyTorch's nn.LocalResponseNorm divides its alpha by `size`
(b = a / (k + alpha/n * sum)^beta), so `lrn_alpha` here is the paper's coefficient
of the sum and the module gets alpha = lrn_alpha * size. Defaults follow the paper;
the 2012 code's weaker LRN (alpha/n) is lrn_alpha=2e-5.

Flatten order. fc6 reads pool5 in NHWC order, index (h * 6 + w) * 256 + c (the
output is permuted to (N, H, W, C) before flattening), not PyTorch's usual NCHW
(c, h, w) order. That is how a JAX/flax model flattens NHWC activations, so an fc6
kernel (9216, 4096) from the JAX model can be copied in as `fc6.weight = kernel.T`
without reshuffling rows. Under channels_last memory format the permute is free:
the data already lie in that order.
"""

import torch
import torch.nn.functional as F
from torch import nn

# Per-layer parameter counts from the paper's architecture (alexnet-2012-facts.md).
EXPECTED_PARAMS_1000 = 60_965_224


class TowerLRN(nn.Module):
  """nn.LocalResponseNorm applied to each tower's channels separately.

  In the 2012 code each GPU normalized its own 48 (or 128) maps, so a window near
  the tower boundary is truncated instead of reaching into the other tower's
  channels; one LRN over all 96 channels would differ at channels 46-49.
  """

  def __init__(self, towers: int, size: int, alpha: float, beta: float, k: float):
    super().__init__()
    self.towers = towers
    # PyTorch divides alpha by size; multiply back so `alpha` keeps the paper's meaning.
    self.lrn = nn.LocalResponseNorm(size=size, alpha=alpha * size, beta=beta, k=k)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.towers == 1:
      return self.lrn(x)
    return torch.cat([self.lrn(h) for h in x.chunk(self.towers, dim=1)], dim=1)


class Dropout(nn.Module):
  """Dropout in the paper's form ("scale_at_test") or PyTorch's ("inverted")."""

  def __init__(self, p: float, form: str):
    super().__init__()
    if form not in ("scale_at_test", "inverted"):
      raise ValueError(f"dropout form {form!r}: 'scale_at_test' or 'inverted'")
    self.p, self.form = p, form

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.form == "inverted":
      return F.dropout(x, self.p, self.training)
    if self.training:  # keep with 1 - p, unscaled
      return F.dropout(x, self.p, True) * (1.0 - self.p)
    return x * (1.0 - self.p)


class AlexNet2012(nn.Module):
  """Two-tower AlexNet (Krizhevsky et al., 2012). Input: (N, 3, 224, 224)."""

  def __init__(
      self,
      num_classes: int = 1000,
      lrn_alpha: float = 1e-4,  # the paper's alpha; PyTorch's module gets alpha * 5
      lrn_size: int = 5,
      lrn_beta: float = 0.75,
      lrn_k: float = 2.0,
      lrn: bool = True,  # False: the paper's no-LRN ablation (and PyTorch's fast case)
      dropout: float = 0.5,
      dropout_form: str = "scale_at_test",
      # 1 only turns groups off (same widths, 62,378,344 params); the paper's one-GPU
      # ablation would also halve the widths.
      towers: int = 2,
  ):
    super().__init__()
    g = towers
    self.conv1 = nn.Conv2d(3, 96, 11, stride=4)  # conv1 sees the whole image: no groups
    self.conv2 = nn.Conv2d(96, 256, 5, padding=2, groups=g)
    self.conv3 = nn.Conv2d(256, 384, 3, padding=1)  # cross-tower
    self.conv4 = nn.Conv2d(384, 384, 3, padding=1, groups=g)
    self.conv5 = nn.Conv2d(384, 256, 3, padding=1, groups=g)
    self.fc6 = nn.Linear(6 * 6 * 256, 4096)
    self.fc7 = nn.Linear(4096, 4096)
    self.fc8 = nn.Linear(4096, num_classes)
    if lrn:
      self.lrn1 = TowerLRN(g, lrn_size, lrn_alpha, lrn_beta, lrn_k)
      self.lrn2 = TowerLRN(g, lrn_size, lrn_alpha, lrn_beta, lrn_k)
    else:
      self.lrn1 = self.lrn2 = nn.Identity()
    self.drop = Dropout(dropout, dropout_form)
    self.reset_parameters()

  def reset_parameters(self) -> None:
    # Paper, section 5: weights N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7
    # (to give ReLUs positive inputs early on) and 0 in conv1, conv3, fc8.
    ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    for name, m in self.named_children():
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.normal_(m.weight, mean=0.0, std=0.01)
        nn.init.constant_(m.bias, 1.0 if name in ones else 0.0)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    # cuda-convnet's 3-pixel bottom/right overhang: (left, right, top, bottom) padding.
    x = F.pad(x, (0, 3, 0, 3))
    x = F.max_pool2d(self.lrn1(F.relu(self.conv1(x))), 3, 2)  # 55 -> 27
    x = F.max_pool2d(self.lrn2(F.relu(self.conv2(x))), 3, 2)  # 27 -> 13
    x = F.relu(self.conv3(x))
    x = F.relu(self.conv4(x))
    x = F.max_pool2d(F.relu(self.conv5(x)), 3, 2)  # 13 -> 6
    # NHWC flatten (see module docstring): (N, C, H, W) -> (N, H, W, C) -> (N, 9216).
    x = torch.flatten(x.permute(0, 2, 3, 1), 1)
    x = self.drop(F.relu(self.fc6(x)))
    x = self.drop(F.relu(self.fc7(x)))
    return self.fc8(x)


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def self_check() -> dict:
  """Asserts the architecture matches the paper: parameter count and shapes.

  Returns a small dict for logging. Cheap (one batch-1 forward pass).
  """
  model = AlexNet2012(num_classes=1000)
  n = count_params(model)
  assert n == EXPECTED_PARAMS_1000, f"parameter count {n:,} != {EXPECTED_PARAMS_1000:,}"
  # Per-layer counts, so a failure says which layer is off.
  want = {"conv1": 34_944, "conv2": 307_456, "conv3": 885_120, "conv4": 663_936,
          "conv5": 442_624, "fc6": 37_752_832, "fc7": 16_781_312, "fc8": 4_097_000}
  for name, count in want.items():
    got = count_params(getattr(model, name))
    assert got == count, f"{name}: {got:,} parameters, want {count:,}"
  # Without groups the same widths give the count the facts sheet lists.
  n1 = count_params(AlexNet2012(num_classes=1000, towers=1))
  assert n1 == 62_378_344, f"one-tower count {n1:,} != 62,378,344"
  model.eval()
  with torch.no_grad():
    x = torch.zeros(1, 3, 224, 224)
    c1 = model.conv1(F.pad(x, (0, 3, 0, 3)))
    assert tuple(c1.shape) == (1, 96, 55, 55), tuple(c1.shape)
    out = model(x)
    assert tuple(out.shape) == (1, 1000), tuple(out.shape)
  # Per-tower LRN: a spike in tower A's last channel must not touch tower B.
  lrn = TowerLRN(2, 5, 1e-4, 0.75, 2.0)
  a = torch.ones(1, 96, 1, 1)
  b = a.clone()
  b[0, 47] = 100.0
  diff = (lrn(a) - lrn(b)).abs().flatten()
  assert diff[48:].max().item() == 0.0 and diff[45:48].min().item() > 0.0
  # The alpha convention: paper formula with alpha = 1e-4 on a single nonzero channel.
  y = lrn(b)[0, 47, 0, 0].item()
  paper = 100.0 / (2.0 + 1e-4 * (100.0**2 + 2 * 1.0)) ** 0.75  # neighbours 45, 46 are 1
  assert abs(y - paper) < 1e-4 * paper, (y, paper)
  return {"params": n, "params_one_tower": n1}


if __name__ == "__main__":
  print(self_check())
