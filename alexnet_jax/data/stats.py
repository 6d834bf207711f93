"""Dataset statistics: mean image, mean colour and the RGB covariance's eigen-decomposition.

All on the 0-255 scale. Computed by one streaming pass over (a deterministic sample of)
the training set, in float64, and cached as .npz files keyed by the dataset's identity
and a fingerprint of the sampled files (so adding, removing or replacing files computes
them again); or the published ImageNet values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from collections.abc import Iterable

import numpy as np

from alexnet_jax import fileio

# 2: keyed by the sampled files, not their count; large JPEGs decoded at reduced scale.
_CACHE_VERSION = 2

# ILSVRC-2012 per-channel means of the mean image (facts doc, "Data").
PUBLISHED_MEAN_RGB = np.array([127.30, 119.72, 104.91])
# fb.resnet.torch's ImageNet PCA on the 0-1 scale: eigenvalues (variances along each
# axis) and eigenvectors as columns. On the 0-255 scale the eigenvalues scale by 255^2;
# their square roots (118.9, 35.0, 17.1) match cuda-convnet2's ILSVRC-2012 standard
# deviations (121.78, 37.09, 19.72) within a few percent, the same axes.
PUBLISHED_EIGVALS_01 = np.array([0.2175, 0.0188, 0.0045])
PUBLISHED_EIGVECS = np.array([[-0.5675, 0.7192, 0.4009],
                              [-0.5808, -0.0045, -0.8140],
                              [-0.5836, -0.6948, 0.4203]])
CUDA_CONVNET2_STDDEVS = np.array([121.78, 37.09, 19.72])  # for reference and tests


@dataclasses.dataclass(frozen=True)
class Stats:
  """mean_image float32 [R, R, 3]; mean_rgb, eigvals float32 [3] (descending); eigvecs
  float32 [3, 3] with eigenvector i in column i. 0-255 scale; num_images = sample size."""

  mean_image: np.ndarray
  mean_rgb: np.ndarray
  eigvals: np.ndarray
  eigvecs: np.ndarray
  num_images: int


def published(resize_size: int) -> Stats:
  """The published ImageNet values; the mean image is the per-channel mean everywhere."""
  mean = PUBLISHED_MEAN_RGB.astype(np.float32)
  return Stats(
      mean_image=np.broadcast_to(mean, (resize_size, resize_size, 3)).copy(),
      mean_rgb=mean,
      eigvals=(PUBLISHED_EIGVALS_01 * 255.0**2).astype(np.float32),
      eigvecs=PUBLISHED_EIGVECS.astype(np.float32),
      num_images=0)


def sample_indices(num_train: int, max_images: int) -> np.ndarray:
  """A deterministic sample: evenly spaced over the split (all of it if small enough).

  Even spacing covers every class of a class-sorted folder listing without needing a
  random seed, so the sample (and its cache key) does not depend on config.seed.
  """
  if max_images <= 0 or max_images >= num_train:
    return np.arange(num_train, dtype=np.int64)
  return np.unique(np.linspace(0, num_train - 1, max_images).round().astype(np.int64))


def compute(batches: Iterable[np.ndarray]) -> Stats:
  """Streams uint8 [n, R, R, 3] batches -> Stats over every pixel of every image."""
  count = 0
  sum_image = None
  s1 = np.zeros(3)
  s2 = np.zeros((3, 3))
  for batch in batches:
    x = np.asarray(batch, np.float64)
    if not len(x):
      continue
    sum_image = x.sum(0) if sum_image is None else sum_image + x.sum(0)
    pixels = x.reshape(-1, 3)
    s1 += pixels.sum(0)
    s2 += pixels.T @ pixels
    count += len(x)
  if count == 0:
    raise ValueError("no decodable training images to compute statistics from")
  n_pix = count * sum_image.shape[0] * sum_image.shape[1]
  mean_rgb = s1 / n_pix
  cov = s2 / n_pix - np.outer(mean_rgb, mean_rgb)
  eigvals, eigvecs = np.linalg.eigh(cov)
  order = np.argsort(eigvals)[::-1]
  eigvals, eigvecs = eigvals[order], eigvecs[:, order]
  # eigh's signs are arbitrary; fix them so each eigenvector's component sum is <= 0
  # (the published first axis is all negative). PCA jitter is symmetric either way.
  eigvecs = eigvecs * np.where(eigvecs.sum(0) > 0, -1.0, 1.0)
  return Stats(mean_image=(sum_image / count).astype(np.float32),
               mean_rgb=mean_rgb.astype(np.float32), eigvals=eigvals.astype(np.float32),
               eigvecs=eigvecs.astype(np.float32), num_images=count)


def cache_path(cache_dir: str, identity: str, split: str, sample: str, resize_size: int,
               antialias: bool, dct: str) -> str:
  """Where the statistics of `sample` (a fingerprint of the sampled examples, e.g. of
  their paths, sizes and modification times) are cached. Everything that changes the
  decoded pixels is in the key: the size, the resize's antialiasing, the JPEG IDCT."""
  key = json.dumps([_CACHE_VERSION, identity, split, sample, resize_size, antialias, dct])
  digest = hashlib.sha1(key.encode()).hexdigest()[:16]
  safe = "".join(c if c.isalnum() else "_" for c in identity.split(":")[0])
  return os.fspath(fileio.path(cache_dir) / "stats" / f"{safe}-{digest}.npz")


class Unreadable(ValueError):
  """A statistics file exists but cannot be read (truncated, not an .npz, fields missing)."""


def load(path: str) -> Stats | None:
  """The statistics stored at `path`; None if there is no file; Unreadable if damaged."""
  if not fileio.path(path).exists():
    return None
  try:
    z = fileio.read_npz(path)
    return Stats(mean_image=z["mean_image"], mean_rgb=z["mean_rgb"], eigvals=z["eigvals"],
                 eigvecs=z["eigvecs"], num_images=int(z["num_images"]))
  except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as err:
    raise Unreadable(f"{path} is damaged ({type(err).__name__}: {err})") from err


def save(path: str, s: Stats, key_description: str) -> None:
  """Writes atomically (fileio): concurrent processes may race here."""
  fileio.write_npz(path, mean_image=s.mean_image, mean_rgb=s.mean_rgb, eigvals=s.eigvals,
                   eigvecs=s.eigvecs, num_images=s.num_images, key=key_description)
