"""Built-in demo data: ten classes of shapes and textures, written once as real JPEGs.

Each image is a noisy, randomly coloured background with one figure at a random place,
size and colour. Foreground and background colours are drawn from the same
distribution for every class, so colour says nothing about the class: only shape and
texture (spatial features) do. Horizontal flips keep every class distinct (the diagonal
stripes class draws both diagonals).

Generation is deterministic (numpy generators seeded by class, split and index) and
writes an image-folder tree `<cache_dir>/<name encoding the parameters>/{train,val}/
<class>/*.JPEG` atomically (a temporary directory renamed into place), so concurrent
processes and interrupted runs never see a half-written tree. The temporary directory's
name holds the host and pid of its writer; one left by a killed writer (same host, pid
no longer running) is removed by the next generation. numpy and PIL only: no TF.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import uuid

import numpy as np
from PIL import Image, ImageDraw

# Bump when the drawing code changes: it is part of the tree's name, so old trees are
# never mistaken for new ones.
GENERATOR_VERSION = 1
JPEG_QUALITY = 90
# Sorted, so that the folder order (= class index) is this order.
CLASS_NAMES = (
    "blob_pair", "checkerboard", "cross", "diagonal_stripes", "disc",
    "horizontal_stripes", "ring", "square", "triangle", "vertical_stripes",
)
_SPLIT_IDS = {"train": 0, "val": 1}
# Drawing proportions, as fractions of the image side.
_RADIUS_RANGE = (0.16, 0.3)
_STRIPE_PERIOD_RANGE = (0.07, 0.14)
_NOISE_STD = 14.0  # per-pixel background noise, 0-255 scale
_MIN_CONTRAST = 90.0  # Euclidean RGB distance between figure and background colours
_TMP_PREFIX = ".tmp-demo-"  # + "<host>-<pid>-<random>"


def demo_root(cache_dir: str, image_size: int, train_per_class: int, val_per_class: int) -> str:
  """The tree's path; its name encodes every generation parameter."""
  name = (f"demo-v{GENERATOR_VERSION}-{image_size}px-{train_per_class}train-"
          f"{val_per_class}val-q{JPEG_QUALITY}")
  return os.path.join(os.path.expanduser(cache_dir), name)


def ensure_demo_tree(config) -> str:
  """Generates the demo tree under `config.dataset.cache_dir` unless present; its root."""
  d = config.dataset
  root = demo_root(d.cache_dir, d.demo_image_size, d.demo_train_per_class, d.demo_val_per_class)
  parent = os.path.dirname(root)
  if os.path.isdir(parent):
    remove_orphans(parent)
  if os.path.isdir(root):
    return root
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f"{_TMP_PREFIX}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  os.makedirs(tmp)
  try:
    for split, per_class in (("train", d.demo_train_per_class), ("val", d.demo_val_per_class)):
      write_split(tmp, split, per_class, d.demo_image_size)
    try:
      os.rename(tmp, root)
    except OSError:
      if not os.path.isdir(root):  # not a concurrent writer that finished first
        raise
  finally:
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return root


def remove_orphans(parent: str) -> list[str]:
  """Removes the temporary trees in `parent` whose writer, on this host, is no longer
  running (killed mid-generation); returns their paths. Others' are left alone: a live
  writer's, or one on another host sharing the folder (its pids are not ours to check)."""
  removed = []
  for e in os.scandir(parent):
    if not e.name.startswith(_TMP_PREFIX):
      continue
    host_pid = e.name[len(_TMP_PREFIX):].rpartition("-")[0]  # drops the random part
    host, _, pid = host_pid.rpartition("-")
    if host == _host() and pid.isdigit() and not _running(int(pid)):
      shutil.rmtree(e.path, ignore_errors=True)
      logging.getLogger(__name__).info("removed %s, left by a killed demo-data writer", e.path)
      removed.append(e.path)
  return removed


def _host() -> str:
  return socket.gethostname().replace("-", "_")  # "-" separates the name's fields


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def write_split(root: str, split: str, per_class: int, image_size: int) -> None:
  for label, name in enumerate(CLASS_NAMES):
    folder = os.path.join(root, split, name)
    os.makedirs(folder)
    for i in range(per_class):
      img = draw_example(label, split, i, image_size)
      Image.fromarray(img).save(
          os.path.join(folder, f"{name}_{i:05d}.JPEG"), quality=JPEG_QUALITY)


def draw_example(label: int, split: str, index: int, size: int) -> np.ndarray:
  """One demo image of class `label` -> uint8 [size, size, 3]; a pure function of its args."""
  rng = np.random.default_rng([GENERATOR_VERSION, label, _SPLIT_IDS[split], index])
  bg = _background(rng, size)
  fg = _figure_colour(rng, bg.reshape(-1, 3).mean(0))
  mask = _MASKS[CLASS_NAMES[label]](rng, size)
  img = bg * (1.0 - mask[..., None]) + fg * mask[..., None]
  img += rng.normal(0.0, _NOISE_STD / 2, img.shape)  # noise over the figure too
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
  """A colour with a random linear gradient and pixel noise -> float [size, size, 3]."""
  base = rng.uniform(0, 255, 3)
  yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
  direction = rng.normal(size=2)
  ramp = (direction[0] * yy + direction[1] * xx)[..., None] * rng.uniform(0, 80, 3)
  return base + ramp + rng.normal(0.0, _NOISE_STD, (size, size, 3))


def _figure_colour(rng: np.random.Generator, bg_mean: np.ndarray) -> np.ndarray:
  while True:
    fg = rng.uniform(0, 255, 3)
    if np.linalg.norm(fg - bg_mean) >= _MIN_CONTRAST:
      return fg


def _place(rng: np.random.Generator, size: int) -> tuple[float, float, float]:
  """Random radius and a centre keeping the figure inside the image."""
  r = rng.uniform(*_RADIUS_RANGE) * size
  cy, cx = rng.uniform(r, size - r, 2)
  return cy, cx, r


def _draw(size: int, paint) -> np.ndarray:
  canvas = Image.new("L", (size, size), 0)
  paint(ImageDraw.Draw(canvas))
  return np.asarray(canvas, np.float32) / 255.0


def _disc(rng, size):
  cy, cx, r = _place(rng, size)
  return _draw(size, lambda d: d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255))


def _ring(rng, size):
  cy, cx, r = _place(rng, size)
  width = max(2, round(r * rng.uniform(0.2, 0.35)))
  return _draw(size, lambda d: d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255,
                                         width=width))


def _square(rng, size):
  cy, cx, r = _place(rng, size)
  r *= 0.85  # same area range as the disc, roughly
  return _draw(size, lambda d: d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=255))


def _triangle(rng, size):
  cy, cx, r = _place(rng, size)
  a0 = rng.uniform(0, 2 * np.pi)
  pts = [(cx + r * np.cos(a0 + k * 2 * np.pi / 3), cy + r * np.sin(a0 + k * 2 * np.pi / 3))
         for k in range(3)]
  return _draw(size, lambda d: d.polygon(pts, fill=255))


def _cross(rng, size):
  cy, cx, r = _place(rng, size)
  t = r * rng.uniform(0.25, 0.4)

  def paint(d):
    d.rectangle([cx - r, cy - t, cx + r, cy + t], fill=255)
    d.rectangle([cx - t, cy - r, cx + t, cy + r], fill=255)
  return _draw(size, paint)


def _blob_pair(rng, size):
  cy, cx, r = _place(rng, size)
  a = rng.uniform(0, 2 * np.pi)
  rb = r * 0.45
  dy, dx = (r - rb) * np.sin(a), (r - rb) * np.cos(a)

  def paint(d):
    for s in (-1, 1):
      y, x = cy + s * dy, cx + s * dx
      d.ellipse([x - rb, y - rb, x + rb, y + rb], fill=255)
  return _draw(size, paint)


def _textured_patch(pattern):
  """A square patch at a random place filled with `pattern(yy, xx, period) -> bool`."""
  def mask(rng, size):
    cy, cx, r = _place(rng, size)
    period = rng.uniform(*_STRIPE_PERIOD_RANGE) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, period)
    inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
    on = pattern(rng, yy + phase, xx + phase, period)
    return (inside & on).astype(np.float32)
  return mask


def _stripes(u, period):
  return np.mod(u, period) < period / 2


_MASKS = {
    "disc": _disc,
    "ring": _ring,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
    "blob_pair": _blob_pair,
    "horizontal_stripes": _textured_patch(lambda rng, y, x, p: _stripes(y, p)),
    "vertical_stripes": _textured_patch(lambda rng, y, x, p: _stripes(x, p)),
    "diagonal_stripes": _textured_patch(
        lambda rng, y, x, p: _stripes(x + y if rng.random() < 0.5 else x - y, p)),
    "checkerboard": _textured_patch(lambda rng, y, x, p: _stripes(y, p) ^ _stripes(x, p)),
}
assert tuple(sorted(_MASKS)) == CLASS_NAMES
