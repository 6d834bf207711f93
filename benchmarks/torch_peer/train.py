r"""Trains the PyTorch peer with the imagenette preset's recipe: the fidelity check of issue 19.

An independent implementation of the same training, for comparing learning curves with
`experiments/imagenette.py` (or the paper's init, `--init_std=paper`). Nothing here
imports alexnet_jax: the images are decoded by PIL, the statistics, augmentation,
update rule and evaluation are written out below from the paper and the facts sheet.
Runs in the peer's venv (`bash benchmarks/torch_peer/setup_venv.sh`):

  MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776 \
  .venv-torch/bin/python benchmarks/torch_peer/train.py \
      --data=/tmp/imagenette_split --out=runs/torch_s0 --seed=0

`--data` is the hold-out split made by `python -m alexnet_jax.data.holdout` (train/ and
val/ folders of class folders). Writes `<out>/log.jsonl` (one line per 10 steps and per
evaluation) and `<out>/final.json`.

The recipe, as the JAX run has it (experiments/imagenette.py):
- images: the central square, resized to 256x256 (PIL bilinear), stored as uint8;
- statistics over the training images: the mean image [256, 256, 3] and the RGB
  covariance of all their pixels (0-255 scale) for PCA;
- a training example: a 224 crop at offsets uniform in 0..32, mirrored with p 0.5,
  plus the PCA offset eigvecs @ (alpha * eigval / 255), alpha ~ N(0, 0.1) per image
  (the paper's eigenvalues read on the 0-1 scale, as alexnet_jax does), minus the centre
  224 crop of the mean image; 66 batches of 128 an epoch from a fresh permutation;
- the network: `AlexNet2012` (two towers, per-tower LRN, the paper's dropout: drop
  with p 0.5 in training, multiply by 0.5 at test), weights N(0, std) per layer,
  biases 1 in conv2/4/5 and fc6/7;
- SGD written as the paper's rule, v <- 0.9 v - 0.0005 lr w - lr g; w <- w + v (biases
  included), lr 0.01 divided by 10 after 5.5 epochs (step 363), mean cross-entropy;
- evaluation: the held-out images' centre crop every epoch, and the paper's ten crops
  (four corners and centre, and their mirrors; softmax averaged) after the last step.

Differences from the JAX run (by construction, not tuned): PIL's decoder and bilinear
resize instead of TF's (TF's default IDCT reads 0.7-0.8 levels darker; the imagenette
photos are 224x224 so the resize only enlarges); numpy's random streams instead of TF's
stateless ones (different crops, flips, alphas, dropout masks and batch order for the
same seed); one pass of 128 instead of four micro-batches of 32 (the same gradient up to
float rounding); PyTorch's oneDNN convolutions and its LRN.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from alexnet_torch import AlexNet2012  # noqa: E402

PAPER_STD = (0.01,) * 8
PRESET_STD = (0.01, 0.01, 0.03, 0.03, 0.03, 0.01, 0.01, 0.01)  # experiments/imagenette.py
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
UNIT_BIAS = {"conv2", "conv4", "conv5", "fc6", "fc7"}


def load_split(folder: pathlib.Path, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Class folders of images -> uint8 [n, size, size, 3], int64 labels [n], class names."""
  classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
  images, labels = [], []
  for label, name in enumerate(classes):
    for path in sorted((folder / name).iterdir()):
      img = Image.open(path).convert("RGB")
      w, h = img.size
      s = min(w, h)
      img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
      images.append(np.asarray(img.resize((size, size), Image.BILINEAR), np.uint8))
      labels.append(label)
  return np.stack(images), np.asarray(labels, np.int64), classes


def statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Mean image [R, R, 3] float64, and eigvals [3], eigvecs [3, 3] (columns) of the RGB
  covariance over every pixel of every image, 0-255 scale. Accumulated in chunks."""
  n = len(images)
  total = np.zeros(images.shape[1:], np.float64)
  moments = np.zeros((3, 3), np.float64)
  rgb = np.zeros(3, np.float64)
  for i in range(0, n, 256):
    chunk = images[i:i + 256].astype(np.float64)
    total += chunk.sum(0)
    flat = chunk.reshape(-1, 3)
    rgb += flat.sum(0)
    moments += flat.T @ flat
  count = n * images.shape[1] * images.shape[2]
  mean_rgb = rgb / count
  cov = moments / count - np.outer(mean_rgb, mean_rgb)
  eigvals, eigvecs = np.linalg.eigh(cov)
  return total / n, eigvals, eigvecs


def train_batch(images, labels, idx, mean_crop, eigvals, eigvecs, rng, crop, pca_std):
  """One augmented batch: float32 NCHW tensor (channels_last) and labels."""
  span = images.shape[1] - crop
  b = len(idx)
  oy = rng.integers(0, span + 1, b)
  ox = rng.integers(0, span + 1, b)
  flip = rng.random(b) < 0.5
  alpha = rng.normal(0.0, pca_std, (b, 3))
  offset = (alpha * (np.maximum(eigvals, 0) / 255.0)) @ eigvecs.T  # [b, 3]
  out = np.empty((b, crop, crop, 3), np.float32)
  for j, i in enumerate(idx):
    x = images[i, oy[j]:oy[j] + crop, ox[j]:ox[j] + crop]
    out[j] = x[:, ::-1] if flip[j] else x
  out += offset[:, None, None, :].astype(np.float32)
  out -= mean_crop
  x = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
  return x, torch.from_numpy(labels[idx])


def views(images: np.ndarray, mean_crop: np.ndarray, crop: int, ten: bool) -> np.ndarray:
  """uint8 [b, R, R, 3] -> float32 [b, v, S, S, 3]: the centre crop (v = 1) or the paper's
  ten crops (corners and centre, then their mirrors), minus the mean crop."""
  m = images.shape[1] - crop
  offsets = [(m // 2, m // 2)] if not ten else [(0, 0), (0, m), (m, 0), (m, m), (m // 2, m // 2)]
  vs = [images[:, y:y + crop, x:x + crop] for y, x in offsets]
  if ten:
    vs += [v[:, :, ::-1] for v in vs]
  return np.stack(vs, 1).astype(np.float32) - mean_crop


@torch.inference_mode()
def evaluate(model, images, labels, mean_crop, crop, ten: bool, batch: int = 128) -> dict:
  device = next(model.parameters()).device
  model.eval()
  top1 = top5 = 0
  loss = 0.0
  for i in range(0, len(images), batch):
    v = views(images[i:i + batch], mean_crop, crop, ten)
    b, n = v.shape[:2]
    x = torch.from_numpy(v.reshape(b * n, crop, crop, 3)).permute(0, 3, 1, 2)
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    probs = F.softmax(model(x), -1).reshape(b, n, -1).mean(1).cpu()
    y = torch.from_numpy(labels[i:i + batch])
    loss += float(-torch.log(probs[torch.arange(b), y].clamp_min(1e-30)).sum())
    top = probs.topk(5, -1).indices
    top1 += int((top[:, 0] != y).sum())
    top5 += int((~(top == y[:, None]).any(-1)).sum())
  model.train()
  n = len(images)
  return {"top1_error": top1 / n, "top5_error": top5 / n, "loss": loss / n, "images": n}


def init(model: AlexNet2012, stds) -> None:
  for name, std in zip(LAYERS, stds):
    layer = getattr(model, name)
    torch.nn.init.normal_(layer.weight, 0.0, std)
    torch.nn.init.constant_(layer.bias, 1.0 if name in UNIT_BIAS else 0.0)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", required=True, type=pathlib.Path)
  p.add_argument("--out", required=True, type=pathlib.Path)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--init_std", choices=("preset", "paper"), default="preset")
  p.add_argument("--epochs", type=float, default=7.0)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--lr", type=float, default=0.01)
  p.add_argument("--boundaries_epochs", type=float, nargs="*", default=[5.5])
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--weight_decay", type=float, default=0.0005)
  p.add_argument("--pca_std", type=float, default=0.1)
  p.add_argument("--eval_every_epochs", type=float, default=1.0)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--device", default="cpu", help="cpu, or cuda (float32: TF32 is turned off)")
  p.add_argument("--cache", type=pathlib.Path, default=None,
                 help="an .npz to keep the decoded 256x256 images in between runs")
  p.add_argument("--max_steps", type=int, default=0, help="stop early (smoke runs)")
  p.add_argument("--prepare_only", action="store_true", help="decode into --cache and stop")
  p.add_argument("--limit_images", type=int, default=0, help="use the first N of each split")
  a = p.parse_args(argv)

  torch.set_num_threads(a.threads)
  torch.manual_seed(a.seed)
  device = torch.device(a.device)
  if device.type == "cuda":  # float32 means float32: no TF32 matmuls or convolutions
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
  rng = np.random.default_rng(a.seed)
  a.out.mkdir(parents=True, exist_ok=True)
  log = open(a.out / "log.jsonl", "a")

  def emit(**record):
    record["wall_s"] = round(time.time() - t0, 2)
    log.write(json.dumps(record) + "\n")
    log.flush()
    print(json.dumps(record), flush=True)

  t0 = time.time()
  if a.cache is not None and a.cache.exists():
    with np.load(a.cache) as z:
      train_x, train_y, val_x, val_y = (z[k] for k in ("train_x", "train_y", "val_x", "val_y"))
      classes = list(z["classes"])
  else:
    train_x, train_y, classes = load_split(a.data / "train", 256)
    val_x, val_y, _ = load_split(a.data / "val", 256)
    if a.cache is not None:
      tmp = a.cache.with_suffix(f".{os.getpid()}.npz")
      np.savez(tmp, train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y,
               classes=np.asarray(classes))
      os.replace(tmp, a.cache)
  if a.prepare_only:
    return
  if a.limit_images:
    keep = rng.permutation(len(train_x))[:a.limit_images]
    train_x, train_y = train_x[keep], train_y[keep]
    val_x, val_y = val_x[:a.limit_images], val_y[:a.limit_images]
  mean_image, eigvals, eigvecs = statistics(train_x)
  crop = 224
  m = (256 - crop) // 2
  mean_crop = mean_image[m:m + crop, m:m + crop].astype(np.float32)
  emit(event="data", train=len(train_x), val=len(val_x), classes=len(classes),
       eigvals=eigvals.tolist())

  model = AlexNet2012(num_classes=len(classes), dropout_form="scale_at_test")
  init(model, PRESET_STD if a.init_std == "preset" else PAPER_STD)
  model = model.to(device, memory_format=torch.channels_last).train()
  params = list(model.parameters())
  velocity = [torch.zeros_like(q) for q in params]

  steps_per_epoch = len(train_x) // a.batch
  total = round(a.epochs * steps_per_epoch)
  if a.max_steps:
    total = min(total, a.max_steps)
  boundaries = [round(e * steps_per_epoch) for e in a.boundaries_epochs]
  eval_every = max(1, round(a.eval_every_epochs * steps_per_epoch))
  emit(event="start", steps=total, steps_per_epoch=steps_per_epoch, torch=torch.__version__,
       threads=torch.get_num_threads(), args={k: str(v) for k, v in vars(a).items()})

  order = np.empty(0, np.int64)
  window, step_times = [], []
  train_s = 0.0
  for step in range(total):
    if step % steps_per_epoch == 0:
      order = rng.permutation(len(train_x))
    pos = (step % steps_per_epoch) * a.batch
    idx = order[pos:pos + a.batch]
    lr = a.lr * 0.1 ** sum(step >= b for b in boundaries)
    t = time.perf_counter()
    x, y = train_batch(train_x, train_y, idx, mean_crop, eigvals, eigvecs, rng, crop,
                       a.pca_std)
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    for q in params:
      q.grad = None
    loss.backward()
    with torch.no_grad():
      grads = [q.grad for q in params]
      torch._foreach_mul_(velocity, a.momentum)
      torch._foreach_add_(velocity, params, alpha=-a.weight_decay * lr)
      torch._foreach_add_(velocity, grads, alpha=-lr)
      torch._foreach_add_(params, velocity)
    loss_value = float(loss.detach())  # waits for the step, also on a GPU
    dt = time.perf_counter() - t
    train_s += dt
    step_times.append(dt)
    err = float((logits.argmax(-1) != y).float().mean())
    window.append((loss_value, err))
    done = step + 1
    if done % 10 == 0 or done == total:
      emit(event="train", step=done, loss=float(np.mean([w[0] for w in window])),
           top1_error=float(np.mean([w[1] for w in window])), lr=lr,
           step_s=float(np.median(step_times)), train_s=round(train_s, 2))
      window, step_times = [], []
    if not np.isfinite(loss_value):
      emit(event="nonfinite", step=done)
      break
    if done % eval_every == 0 or done == total:
      r = evaluate(model, val_x, val_y, mean_crop, crop, ten=False)
      emit(event="eval", step=done, epoch=done / steps_per_epoch, train_s=round(train_s, 2), **r)
  ten = evaluate(model, val_x, val_y, mean_crop, crop, ten=True)
  emit(event="ten_crop", step=done, **ten)
  final = {"step": done, "ten_crop": ten, "train_s": train_s, "wall_s": time.time() - t0,
           "seed": a.seed, "init_std": a.init_std, "device": str(device),
           "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                           else "cpu"), "torch": torch.__version__}
  (a.out / "final.json").write_text(json.dumps(final, indent=1) + "\n")


if __name__ == "__main__":
  main()
