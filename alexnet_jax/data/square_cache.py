"""Decoded R x R uint8 centre squares of a split, stored once (`config.input.square_cache`).

The paper trained on images "down-sampled to a fixed resolution of 256 x 256" ahead of
time; each epoch then only crops, reflects and jitters them. This does the same: one
pass decodes every example of the split exactly as `decode_centre_square` does (shorter
side to R, centre R x R, uint8) and stores its raw pixels, one file per example; later
epochs read those instead of decoding and resizing the JPEG (the two largest per-image
costs). Crops of the stored squares equal the uncached pipeline's crops byte for byte.

Disk: R * R * 3 bytes per example (196,608 at R = 256: ~250 GB for ILSVRC-2012's
training set, more than the JPEGs). The cache lives under `config.dataset.cache_dir`,
keyed by the source's identity, split, R and antialiasing, next to the statistics cache.
Files that fail the validity check or the decoder are recorded as invalid in the cache
(and in the build's BadImageLog); the training stream substitutes them as it does
uncached bad files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid

import numpy as np

from alexnet_jax.data._tf import AUTOTUNE, tf
from alexnet_jax.data.decode import BadImageLog, centre_squares, dct_method

_log = logging.getLogger(__name__)
_VERSION = 2  # 2: large JPEGs decode at reduced DCT scale (decode.py)
_LABELS = "labels.npy"  # labels too: the training stream then never opens the originals
_VALID = "valid.npy"  # written last: its presence marks a complete cache


def cache_dir(config, source, which: str) -> str:
  size = int(config.input.resize_size)
  antialias = bool(config.input.get("resize_antialias", False))
  split = source.split_name(which)
  key = json.dumps([_VERSION, source.identity, split, size, antialias,
                    dct_method(config)])
  digest = hashlib.sha1(key.encode()).hexdigest()[:16]
  safe = "".join(c if c.isalnum() else "_" for c in source.identity.split(":")[0])
  return os.path.join(os.path.expanduser(config.dataset.cache_dir), "squares",
                      f"{safe}-{split}-{size}-{digest}")


def ensure(config, source, which: str) -> tuple[str, np.ndarray, np.ndarray]:
  """(cache directory, valid bool [n], label int64 [n]) of split `which`; builds the
  cache if absent.

  Safe against concurrent builders (several processes of one run): each builds in its
  own temporary directory and renames it into place; the first rename wins. The build
  skips bad files whatever `on_bad_image` says: the training stream meets them (as
  invalid entries) and records them, or stops, as it would without the cache.
  """
  path = cache_dir(config, source, which)
  valid_file = os.path.join(path, _VALID)
  if not os.path.exists(valid_file):
    _build(config, source, which, path)
  return path, np.load(valid_file), np.load(os.path.join(path, _LABELS))


def _build(config, source, which: str, path: str) -> None:
  n = source.split_size(which)
  _log.info("building the %dx%d square cache of %d examples -> %s",
            config.input.resize_size, config.input.resize_size, n, path)
  tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp)
  try:
    valid = np.zeros([n], bool)
    labels = np.zeros([n], np.int64)
    log = BadImageLog(on_bad_image="skip")
    for index, square, label, ok in _decoded(config, source, which, log):
      labels[index] = label
      for i, img, good in zip(index, square, ok, strict=True):
        if good:
          with open(os.path.join(tmp, f"{i}.u8"), "wb") as f:
            f.write(img.tobytes())
          valid[i] = True
    if log.count:
      _log.warning("square cache: %s", log.summary())
    np.save(os.path.join(tmp, _LABELS), labels)
    np.save(os.path.join(tmp, _VALID), valid)
    try:
      os.rename(tmp, path)
    except OSError:  # another process finished first; its cache is the same
      shutil.rmtree(tmp, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _decoded(config, source, which: str, log: BadImageLog):
  """(index int64 [b], uint8 [b, R, R, 3], label [b], ok bool [b]) batches over the split.

  A file that passes the validity check but fails to decode is dropped by
  ignore_errors: its index never appears, so it stays invalid."""
  ds = centre_squares(config, source, which, np.arange(source.split_size(which)), log)
  ds = ds.ignore_errors()
  return ds.batch(64).prefetch(AUTOTUNE).as_numpy_iterator()


def loader(path: str, size: int):
  """index (int64 scalar) -> uint8 [size, size, 3] stored square (of a valid example)."""
  prefix = tf.constant(path + os.sep)

  def load(index):
    data = tf.io.read_file(tf.strings.join([prefix, tf.strings.as_string(index), ".u8"]))
    return tf.reshape(tf.io.decode_raw(data, tf.uint8), [size, size, 3])
  return load
