"""Encoded bytes -> validated, decoded RGB, and the record of files that were not.

A decode op that fails inside a tf.data graph cannot be caught there: it ends the
iterator (and a multi-day run). So every file is first checked cheaply in-graph from its
bytes (empty, JPEG/PNG magic, JPEG EOI marker near the end, PNG IEND chunk); only files
that pass reach a decoder, and the bad ones are recorded through a `tf.py_function` that
runs only in the bad branch of a `tf.cond`.

TF's JPEG decoder turns greyscale and CMYK JPEGs into RGB itself (checked against PIL
on the CMYK files in /work/shared/data/odd-images), and PNG bytes behind a .JPEG name
take the PNG branch, so no PIL fallback is needed.
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from alexnet_jax.data._tf import parallel_calls, tf

_log = logging.getLogger(__name__)

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# How far from the end the JPEG end-of-image marker FFD9 may sit: some encoders leave a
# few padding bytes after it. Inside entropy-coded data 0xFF is always byte-stuffed, so
# FFD9 in the tail of a truncated file cannot appear by chance.
_JPEG_EOI_SEARCH_BYTES = 64


class BadImageError(RuntimeError):
  """A file could not be decoded and `config.input.on_bad_image == "error"`."""


@dataclasses.dataclass
class BadImageLog:
  """Thread-safe running record of skipped files; the caller reads and logs it.

  `count` counts every skip (a file met twice in two epochs counts twice); `paths` lists
  each distinct file once, in the order first met.
  """

  on_bad_image: str = "skip"  # "skip" or "error"
  count: int = 0
  paths: list[str] = dataclasses.field(default_factory=list)
  error_path: str | None = None  # the file that stopped the stream in "error" mode
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

  def record(self, path: str) -> None:
    with self._lock:
      self.count += 1
      if path not in self.paths:
        self.paths.append(path)
        _log.warning("skipping undecodable image %s (%d skipped so far)", path, self.count)
    if self.on_bad_image == "error":
      self.error_path = path
      raise BadImageError(
          f"cannot decode image {path} (empty, truncated or not JPEG/PNG); set "
          "config.input.on_bad_image='skip' to skip such files and report them")

  def summary(self) -> str:
    return f"{self.count} undecodable images skipped: {', '.join(self.paths) or '-'}"


def make_bad_image_log(config, bad_images: BadImageLog | None) -> BadImageLog:
  """The caller's log, or a fresh one following `config.input.on_bad_image`."""
  mode = config.input.on_bad_image
  if bad_images is None:
    return BadImageLog(on_bad_image=mode)
  bad_images.on_bad_image = mode
  return bad_images


def is_valid_image(data: tf.Tensor) -> tf.Tensor:
  """Cheap in-graph check of encoded bytes (scalar string) -> scalar bool.

  True for a non-empty JPEG ending in an EOI marker or a PNG ending in its IEND chunk.
  Catches empty and truncated files without decoding; a file corrupted in the middle
  but intact at both ends still reaches the decoder.
  """
  n = tf.strings.length(data)
  is_jpeg = tf.strings.substr(data, 0, len(_JPEG_MAGIC)) == _JPEG_MAGIC
  is_png = tf.strings.substr(data, 0, len(_PNG_MAGIC)) == _PNG_MAGIC

  # Branch-free: control flow inside a tf.data map costs more than these few small ops.
  k = tf.minimum(n, _JPEG_EOI_SEARCH_BYTES)
  tail = tf.io.decode_raw(
      tf.strings.join([tf.strings.substr(data, n - k, k), b"\x00\x00"]), tf.uint8)
  jpeg_has_eoi = tf.reduce_any((tail[:-1] == 0xFF) & (tail[1:] == 0xD9))
  # PNG ends with the IEND chunk: 4 bytes length, b"IEND", 4 bytes CRC.
  png_has_iend = tf.strings.substr(data, tf.maximum(n - 8, 0), 4) == b"IEND"
  long_enough = n > len(_PNG_MAGIC) + 12
  return long_enough & ((is_jpeg & jpeg_has_eoi) | (is_png & png_has_iend))


def record_bad(name: tf.Tensor, log: BadImageLog) -> tf.Tensor:
  """Records `name` in `log` (may raise in error mode) -> scalar bool False. Call it only
  in the bad branch of a `tf.cond`: a py_function holds the GIL."""
  def py_record(n):
    log.record(n.numpy().decode("utf-8", "replace"))
    return False
  recorded = tf.py_function(py_record, [name], tf.bool)
  recorded.set_shape([])
  return recorded


def check_or_record(data: tf.Tensor, name: tf.Tensor, log: BadImageLog) -> tf.Tensor:
  """`is_valid_image(data)`; records `name` in `log` when false (may raise in error mode)."""
  ok = is_valid_image(data)
  return tf.cond(ok, lambda: tf.constant(True), lambda: record_bad(name, log))


def decode_centre_square(data: tf.Tensor, size: int, antialias: bool = False) -> tf.Tensor:
  """Valid encoded JPEG/PNG bytes -> uint8 [size, size, 3] RGB.

  The paper's "rescale the shorter side to `size`, take the central size x size crop",
  done as: crop the central min(h, w) square at the original resolution, then resize it
  to size x size. Same geometry, but a JPEG's side margins are never decoded (the fused
  `decode_and_crop_jpeg` with the window computed from the header) and the resize works
  on fewer pixels. Resizing is bilinear; with `antialias` (`config.input.resize_antialias`
  when set) shrinking is antialiased as PIL's ANTIALIAS in the 2012 data preparation, at
  about half the pipeline's speed on ILSVRC-sized images, hence off by default.
  """
  return quantize(decode_centre_square_float(data, size, antialias))


def decode_centre_square_float(data: tf.Tensor, size: int,
                               antialias: bool = False) -> tf.Tensor:
  """`decode_centre_square` before rounding: float32 [size, size, 3], values in about
  [0, 255]. Crop it first and `quantize` the crop when only a crop is needed: rounding
  is per pixel, so the result is the same and the rounding touches fewer pixels."""
  is_jpeg = tf.strings.substr(data, 0, len(_JPEG_MAGIC)) == _JPEG_MAGIC

  def centre_window(h, w):
    side = tf.minimum(h, w)
    return tf.stack([(h - side) // 2, (w - side) // 2, side, side])

  def jpeg():
    shape = tf.io.extract_jpeg_shape(data)
    return tf.io.decode_and_crop_jpeg(data, centre_window(shape[0], shape[1]), channels=3)

  def other():
    img = tf.io.decode_png(data, channels=3)
    win = centre_window(tf.shape(img)[0], tf.shape(img)[1])
    return tf.image.crop_to_bounding_box(img, win[0], win[1], win[2], win[3])

  # Resize from float32, not uint8: TF's bilinear kernel for uint8 input is about twice
  # as slow as cast + float32 kernel (0.37 vs 0.19 ms on a 224x224 image, the largest
  # single cost of the pipeline), and the results are bit-identical (the kernel computes
  # in float32 either way; checked on every imagenet-tiny file, with and without
  # antialiasing).
  img = tf.cast(tf.cond(is_jpeg, jpeg, other), tf.float32)
  # Antialiasing only changes a downscale and costs 2-3x the plain bilinear resize.
  if antialias:
    return tf.cond(
        tf.shape(img)[0] > size,
        lambda: tf.image.resize(img, [size, size], method="bilinear", antialias=True),
        lambda: tf.image.resize(img, [size, size], method="bilinear"))
  return tf.image.resize(img, [size, size], method="bilinear")


def quantize(img: tf.Tensor) -> tf.Tensor:
  """Float pixels -> uint8, rounded to nearest and clipped to [0, 255]."""
  return tf.cast(tf.round(tf.clip_by_value(img, 0.0, 255.0)), tf.uint8)


def centre_squares(config, source, which: str, indices, log: BadImageLog):
  """tf.data of (index, uint8 [R, R, 3] centre square, label, ok), one per index.

  The whole-image decode shared by the statistics pass and the square cache. A file
  that fails the validity check is recorded in `log` and gives zeros with ok=False.
  `source` is a `sources.Source`; `indices` int64 [n] examples of split `which`.
  """
  size = int(config.input.resize_size)
  antialias = bool(config.input.get("resize_antialias", False))
  load = source.loader(which)

  def example(index):
    data, label, name = load(index)
    ok = check_or_record(data, name, log)
    img = tf.cond(ok, lambda: decode_centre_square(data, size, antialias),
                  lambda: tf.zeros([size, size, 3], tf.uint8))
    return index, img, label, ok

  return tf.data.Dataset.from_tensor_slices(indices).map(
      example, num_parallel_calls=parallel_calls(config))
