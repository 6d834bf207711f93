"""Crops, reflections and PCA colour jitter on [R, R, 3] uint8 images (R = resize_size).

Per-example randomness comes from stateless ops seeded by (config.seed, epoch, example
index) only, so an example's augmentation does not depend on threads, on which process
reads it, or on where a stream was (re)started.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from alexnet_jax.data._tf import tf


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """The augmentation switches of `config.input` and the sizes they act on."""

  resize_size: int  # R: side of the centre-cropped, resized image
  crop_size: int  # S: side fed to the network (config.model.input_size)
  random_crop: bool
  flip: bool
  pca_jitter: bool
  pca_std: float
  pca_scale: str  # "eigenvalues" (paper) or "sqrt" (2012 code)
  # Divides training crops only, after the PCA jitter, as the 2012 code: its data provider
  # divides by 1 + color_noise (--color-noise, 0.1) when `color_noise > 0 and not
  # self.test`, so its test and multiview crops are never divided (convdata_jpeg.py lines
  # 155-179 in computerhistory/AlexNet-Source-Code; the same code in convdata.py's
  # CroppedImageNetDP.get_next_batch). Its comment: scaling down keeps "the overall scale
  # of the training data" near the test data's, which the added colour noise widened. It
  # divides only while the colour noise is on: with pca_jitter off, 1.0 matches it.
  train_divisor: float
  antialias: bool = False  # config.input.resize_antialias, if the config has it

  @classmethod
  def from_config(cls, config) -> AugmentConfig:
    i = config.input
    a = cls(resize_size=int(i.resize_size), crop_size=int(config.model.input_size),
            random_crop=bool(i.random_crop), flip=bool(i.flip), pca_jitter=bool(i.pca_jitter),
            pca_std=float(i.pca_std), pca_scale=str(i.pca_scale),
            train_divisor=float(i.train_divisor),
            antialias=bool(i.get("resize_antialias", False)))
    return a  # values validated by config_checks.check_input


def example_seed(seed: int, epoch: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
  """Stateless-op seed (int64 [2]) of one example in one epoch."""
  s = tf.constant([seed, 0], tf.int64)
  s = tf.random.experimental.stateless_fold_in(s, tf.cast(epoch, tf.int64))
  return tf.random.experimental.stateless_fold_in(s, tf.cast(index, tf.int64))


def augment_params(ex_seed: tf.Tensor, a: AugmentConfig):
  """Draws (crop y offset, crop x offset, flip, alpha [3]) for one example.

  Offsets are uniform over 0..R-S inclusive (the 2012 code's 0..32 for 256/224);
  without `random_crop` they are the centre crop's. alpha ~ N(0, pca_std) per channel,
  zero without `pca_jitter`.
  """
  seeds = tf.random.experimental.stateless_split(ex_seed, 3)
  span = a.resize_size - a.crop_size
  if a.random_crop:
    off = tf.random.stateless_uniform([2], seeds[0], minval=0, maxval=span + 1, dtype=tf.int32)
  else:
    off = tf.fill([2], span // 2)
  if a.flip:
    flip = tf.random.stateless_uniform([], seeds[1]) < 0.5
  else:
    flip = tf.constant(False)
  if a.pca_jitter:
    alpha = tf.random.stateless_normal([3], seeds[2], stddev=a.pca_std)
  else:
    alpha = tf.zeros([3])
  return off[0], off[1], flip, alpha


def crop(img: tf.Tensor, oy, ox, size: int, flip=False) -> tf.Tensor:
  """[R, R, C] -> [size, size, C] window at (oy, ox), reflected left-right if `flip`."""
  out = img[oy:oy + size, ox:ox + size]
  # A tf.cond, not tf.where(flip, reversed, out): broadcasting a scalar predicate over a
  # uint8 image halved the pipeline's throughput.
  return tf.cond(tf.convert_to_tensor(flip), lambda: tf.reverse(out, [1]), lambda: out)


def ten_crop_offsets(resize_size: int, crop_size: int) -> list[tuple[int, int]]:
  """(y, x) of the paper's five views: top-left, top-right, bottom-left, bottom-right, centre."""
  m = resize_size - crop_size
  return [(0, 0), (0, m), (m, 0), (m, m), (m // 2, m // 2)]


def ten_crops(img: tf.Tensor, a: AugmentConfig) -> tf.Tensor:
  """[R, R, 3] -> [10, S, S, 3]: the five views of `ten_crop_offsets`, then their mirrors."""
  views = [crop(img, y, x, a.crop_size) for y, x in ten_crop_offsets(a.resize_size, a.crop_size)]
  return tf.stack(views + [tf.reverse(v, [1]) for v in views])


def centre_crop(img: tf.Tensor, a: AugmentConfig) -> tf.Tensor:
  m = (a.resize_size - a.crop_size) // 2
  return crop(img, m, m, a.crop_size)


# The scale on which "eigenvalues" mode reads the eigenvalues. Unlike standard deviations,
# eigenvalues (variances) do not scale linearly with the pixel scale, so the paper's rule
# needs one: taken literally on the 0-255 scale, 0.1 * 14,000 (ImageNet's largest) gives
# colour offsets of +-1,400, several times the pixel range. The widely copied
# implementation (fb.resnet.torch) uses eigenvalues of 0-1 pixel values (0.2175, ...),
# i.e. offsets of a few 0-255 units; we follow it.
EIGENVALUE_PIXEL_SCALE = 255.0


def pca_lambdas(eigvals: np.ndarray, pca_scale: str) -> np.ndarray:
  """Per-axis multipliers of alpha, on the 0-255 scale, from 0-255-scale eigenvalues.

  "sqrt" (2012 code): the standard deviations sqrt(eigval). "eigenvalues" (paper): the
  eigenvalues of 0-1 pixel values, converted back to 0-255 units: eigval / 255.
  """
  lam = np.maximum(np.asarray(eigvals, np.float64), 0.0)
  if pca_scale == "sqrt":
    return np.sqrt(lam)
  return lam / EIGENVALUE_PIXEL_SCALE


def pca_offset(alpha: tf.Tensor, eigvals: np.ndarray, eigvecs: np.ndarray,
               pca_scale: str) -> tf.Tensor:
  """alpha [..., 3] -> RGB offset [..., 3] = eigvecs @ (alpha * lambda), 0-255 scale.

  lambda = `pca_lambdas(eigvals, pca_scale)`; eigvecs [3, 3] has the eigenvectors as
  columns; eigvals are those of the 0-255-scale covariance (`Stats`).
  """
  lam = pca_lambdas(eigvals, pca_scale)
  lam = tf.constant(lam, tf.float32)
  vecs = tf.constant(np.asarray(eigvecs), tf.float32)
  return tf.linalg.matvec(vecs, alpha * lam)
