"""Encoded bytes -> validated, decoded RGB, and the record of files that were not.

A failing op inside a tf.data graph cannot be caught there: it ends the iterator (and a
multi-day run). Bad files therefore meet two defences, both in `Reader`:

- Cheap in-graph checks on every file's bytes (empty, JPEG/PNG magic, JPEG EOI marker near
  the end, PNG IEND chunk): a file that fails them never reaches a decoder.
- Everything the bytes do not show (a file that cannot be read: a dangling symlink, a
  symlink loop, a directory named x.JPEG, no permission; a file corrupt in the middle; an
  image too large to decode within `config.input.max_decode_pixels`) fails an op. In
  careful mode each example's load and decode run inside `attempt`, an in-graph try (a
  one-element dataset whose errors are ignored, with a fallback), and the failure is
  recorded. `attempt` costs about 0.3 ms of CPU per example (measured; a third of a
  224x224 image's whole pipeline), so the batch pipelines run in fast mode and re-read
  only a batch that failed, carefully (see `pipeline._resilient_batches`); files found
  bad are then skipped unopened in fast mode.

Bad files are recorded, with the reason `diagnose` finds, through a `tf.py_function`
that runs only in the bad branch of a `tf.cond`.

Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale in libjpeg's DCT (decode_jpeg's `ratio`)
when their shorter side is at least that many times the target size R, so the decoded
square's side stays in [R, 2R) up to 8R: a 20000 x 20000 JPEG decodes to 2500 x 2500
(19 MB), not 20000 x 20000 (1.2 GB). PNG has no scaled decode; one over the pixel limit
is skipped as bad. 1x1 and other tiny images decode and are upscaled like any other.

TF's JPEG decoder turns greyscale and CMYK JPEGs into RGB itself (checked against PIL
on the CMYK files in /work/shared/data/odd-images), and PNG bytes behind a .JPEG name
take the PNG branch, so no PIL fallback is needed.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import threading

import numpy as np

from alexnet_jax import config_checks
from alexnet_jax.data._tf import parallel_calls, tf

_log = logging.getLogger(__name__)

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# How far from the end the JPEG end-of-image marker FFD9 may sit: some encoders leave a
# few padding bytes after it. Inside entropy-coded data 0xFF is always byte-stuffed, so
# FFD9 in the tail of a truncated file cannot appear by chance.
_JPEG_EOI_SEARCH_BYTES = 64
# libjpeg's DCT scaling factors (decode_jpeg's `ratio`).
_JPEG_RATIOS = (1, 2, 4, 8)
# Bad files named one by one in a summary; the warnings name every one.
_SUMMARY_NAMES = 20


class BadImageError(RuntimeError):
  """A file could not be used and `config.input.on_bad_image == "error"`."""


@dataclasses.dataclass
class BadImageLog:
  """Thread-safe running record of skipped files, with the reason each was skipped.

  `count` counts every skip: each (stream, position in it, file) once, so a file met in
  two epochs counts twice, while a batch that is read again (see
  `pipeline._resilient_batches`) does not count its files twice. `paths` lists each
  distinct file once, in the order first met; `reasons[path]` says what is wrong with it.
  Each file is logged as a warning when first met.
  """

  on_bad_image: str = "skip"  # "skip" or "error"
  count: int = 0
  paths: list[str] = dataclasses.field(default_factory=list)
  reasons: dict[str, str] = dataclasses.field(default_factory=dict)
  error_path: str | None = None  # the file that stopped the stream in "error" mode
  # Per source and split: example index -> name of the examples found bad, so a re-read
  # stream skips them without opening them again.
  _known: dict[str, dict[int, str]] = dataclasses.field(default_factory=dict, repr=False)
  _events: set[tuple] = dataclasses.field(default_factory=set, repr=False)
  _streams: itertools.count = dataclasses.field(default_factory=itertools.count, repr=False)
  _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

  def record(self, path: str, reason: str, event: tuple | None = None) -> None:
    """Records a skip of `path`; `event` (stream, position) counts it once however often
    that position is read."""
    with self._lock:
      if event is not None and (*event, path) in self._events:
        return
      if event is not None:
        self._events.add((*event, path))
      self.count += 1
      if path not in self.reasons:
        self.paths.append(path)
        self.reasons[path] = reason
        _log.warning("skipping %s: %s (%d skipped so far)", path, reason, self.count)
    if self.on_bad_image == "error":
      self.error_path = path
      raise BadImageError(self.error_message(path))

  def error_message(self, path: str) -> str:
    return (f"cannot use image {path}: {self.reasons.get(path, 'undecodable')}; set "
            "config.input.on_bad_image='skip' to skip such files and report them")

  def new_stream(self) -> int:
    """An id for one pass (or stream) of reading, for `record`'s events."""
    return next(self._streams)

  def known(self, split: str) -> dict[int, str]:
    """The examples of `split` (a source and split) found bad so far: index -> name."""
    with self._lock:
      return self._known.setdefault(split, {})

  def num_known(self) -> int:
    """How many examples (of all splits) have been found bad so far."""
    with self._lock:
      return sum(len(k) for k in self._known.values())

  def report(self) -> list[dict[str, str]]:
    """[{"path", "reason"}] of every distinct skipped file, in the order first met."""
    return [{"path": p, "reason": self.reasons[p]} for p in self.paths]

  def summary(self) -> str:
    shown = [f"{p} ({self.reasons[p]})" for p in self.paths[:_SUMMARY_NAMES]]
    more = len(self.paths) - len(shown)
    return (f"{self.count} unusable images skipped ({len(self.paths)} files): "
            f"{'; '.join(shown) or '-'}" + (f"; and {more} more (named above)" if more else ""))


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


def attempt(fn, args, fallback):
  """In-graph try: (fn(*args), True), or (fallback, False) if any op of fn fails.

  fn runs in a one-element dataset whose errors are ignored; `fallback` (same structure
  and dtypes as fn's result) follows it, and the first element is taken. Costs about
  0.3 ms per call (a dataset and its iterator per call): for careful mode and rare paths.
  """
  ds = tf.data.Dataset.from_tensors(args).map(lambda *a: (fn(*a), True)).ignore_errors()
  ds = ds.concatenate(tf.data.Dataset.from_tensors((fallback, False)))
  return ds.take(1).get_single_element()


def jpeg_ratio(side: int, size: int) -> int:
  """The DCT scale 1/r at which a JPEG of shorter side `side` is decoded: the largest r
  of 1, 2, 4, 8 with side >= r * size (as `decode_centre_square_float` chooses it)."""
  return max(r for r in _JPEG_RATIOS if r == 1 or side >= r * size)


def _ceil_div(a, b):
  return -(-a // b)


def decoded_square_side(height: int, width: int, is_jpeg: bool, size: int) -> int:
  """Side of the centre square a file of this size decodes to (before the resize)."""
  if not is_jpeg:
    return min(height, width)
  r = jpeg_ratio(min(height, width), size)
  return min(_ceil_div(height, r), _ceil_div(width, r))


def dct_method(config) -> str:
  """config.input.jpeg_dct_method; TF's default for configs saved before it existed."""
  return str(config.input.get("jpeg_dct_method", config_checks.DCT_METHODS[0]))


def decode_centre_square(data: tf.Tensor, size: int, antialias: bool = False,
                         max_pixels: int = 2**24, dct: str = "INTEGER_FAST") -> tf.Tensor:
  """Valid encoded JPEG/PNG bytes -> uint8 [size, size, 3] RGB.

  The paper's "rescale the shorter side to `size`, take the central size x size crop",
  done as: crop the central min(h, w) square at the original resolution, then resize it
  to size x size. Same geometry, but a JPEG's side margins are never decoded (the fused
  `decode_and_crop_jpeg` with the window computed from the header) and the resize works
  on fewer pixels. A JPEG whose shorter side is >= 2 * size is decoded at reduced scale
  first (see the module docstring). Resizing is bilinear; with `antialias`
  (`config.input.resize_antialias` when set) shrinking is antialiased as PIL's ANTIALIAS
  in the 2012 data preparation, at about half the pipeline's speed on ILSVRC-sized
  images, hence off by default. An image whose decoded pixels would exceed `max_pixels`
  (`config.input.max_decode_pixels`) fails an assertion instead of allocating them.
  `dct`: libjpeg's inverse DCT (`config.input.jpeg_dct_method`, see `dct_method`).
  """
  return quantize(decode_centre_square_float(data, size, antialias, max_pixels, dct))


def decode_centre_square_float(data: tf.Tensor, size: int, antialias: bool = False,
                               max_pixels: int = 2**24, dct: str = "INTEGER_FAST") -> tf.Tensor:
  """`decode_centre_square` before rounding: float32 [size, size, 3], values in about
  [0, 255]. Crop it first and `quantize` the crop when only a crop is needed: rounding
  is per pixel, so the result is the same and the rounding touches fewer pixels."""
  is_jpeg = tf.strings.substr(data, 0, len(_JPEG_MAGIC)) == _JPEG_MAGIC

  def centre_window(h, w):
    side = tf.minimum(h, w)
    return tf.stack([(h - side) // 2, (w - side) // 2, side, side])

  def within_limit(pixels, decode):
    # Checked from the header, before the decoder allocates anything.
    check = tf.debugging.Assert(pixels <= max_pixels, ["image too large to decode"])
    with tf.control_dependencies([check]):
      return decode()

  def jpeg():
    shape = tf.io.extract_jpeg_shape(data)
    h, w = shape[0], shape[1]

    def at_scale(r):
      def decode():
        hs, ws = _ceil_div(h, r), _ceil_div(w, r)  # libjpeg's scaled size
        side = tf.cast(tf.minimum(hs, ws), tf.int64)
        return within_limit(side * side, lambda: tf.io.decode_and_crop_jpeg(
            data, centre_window(hs, ws), channels=3, ratio=r, dct_method=dct))
      return decode

    # Full scale is the common case (ILSVRC's shorter sides are mostly 333-375): one
    # tf.cond on the common path, the choice among the reduced scales only behind it.
    side = tf.minimum(h, w)
    reduced = lambda: tf.switch_case(  # noqa: E731
        tf.cast(side >= 4 * size, tf.int32) + tf.cast(side >= 8 * size, tf.int32),
        [at_scale(r) for r in _JPEG_RATIOS[1:]])
    return tf.cond(side >= 2 * size, reduced, at_scale(1))

  def other():
    # PNG's IHDR chunk comes first: width and height, big-endian, at bytes 16-23.
    wh = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 16, 8), tf.int32,
                                  little_endian=False), tf.int64)
    img = within_limit(wh[0] * wh[1], lambda: tf.io.decode_png(data, channels=3))
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


def diagnose(name: str, data: bytes | None, size: int, max_pixels: int) -> str:
  """Why a file could not be used, in words (Python; only ever called for bad files).

  name: the example's name (a path for image folders); data: its bytes, None if reading
  it failed.
  """
  if data is None:
    try:
      with open(name, "rb") as f:
        f.read(1)
    except OSError as e:
      dangling = e.errno == errno.ENOENT and os.path.islink(name)
      return f"unreadable: {'dangling symlink: ' if dangling else ''}{e.strerror or e} " \
             f"(errno {e.errno})"
    return "could not be read"
  if not data:
    return "empty file"
  is_jpeg, is_png = data.startswith(_JPEG_MAGIC), data.startswith(_PNG_MAGIC)
  if not (is_jpeg or is_png):
    return f"not a JPEG or PNG file (starts with {data[:8]!r})"
  if not bool(is_valid_image(tf.constant(data))):
    return ("truncated: no JPEG end-of-image marker at the end" if is_jpeg else
            "truncated: no PNG IEND chunk at the end")
  try:
    if is_jpeg:
      h, w = (int(x) for x in tf.io.extract_jpeg_shape(data)[:2])
    else:
      w, h = (int(x) for x in np.frombuffer(data[16:24], ">u4"))
    side = decoded_square_side(h, w, is_jpeg, size)
    decoded = side * side if is_jpeg else h * w
    if decoded > max_pixels:
      return (f"too large: {w}x{h} pixels would decode to {decoded} > "
              f"config.input.max_decode_pixels={max_pixels}")
    decode_centre_square_float(tf.constant(data), size, max_pixels=max_pixels)
  except tf.errors.OpError as e:
    # TF's messages start with the op's function node and end with [Op:...]; the middle
    # is the decoder's own words.
    message = e.message.split("}} ")[-1].split(" [Op:")[0].strip()
    return f"corrupt {'JPEG' if is_jpeg else 'PNG'}: {message}"
  return "failed to decode in the pipeline (decodes when retried alone)"


class Reader:
  """Loads and decodes examples of one split by index, recording the bad ones.

  `reader(index, position, on_bad=None) -> (float32 [R, R, 3] centre square, int64
  label, ok)`, R = config.input.resize_size; position: the example's place in the
  stream (see `BadImageLog.record`). For a bad example the file is recorded in the log
  and the result is `on_bad()` (a (square, label) pair, e.g. a substitute's) or zeros.

  careful=False (fast): only the cheap checks run in-graph, so a file that fails an op
  (unreadable, corrupt inside, too large) raises out of the iterator; the caller re-reads
  that batch with careful=True. Examples found bad before (by any reader of the split
  sharing the log) are skipped unopened. careful=True: every example's load and decode
  run inside `attempt`. stream: `log.new_stream()` of the pass this reader serves.
  """

  def __init__(self, config, source, which: str, log: BadImageLog, careful: bool,
               stream: int | None = None):
    self._load = source.loader(which)
    self._size = int(config.input.resize_size)
    self._antialias = bool(config.input.get("resize_antialias", False))
    self._dct = dct_method(config)
    self._max_pixels = int(config.input.max_decode_pixels)
    self._log = log
    self._careful = careful
    self._stream = log.new_stream() if stream is None else stream
    split = source.split_name(which)
    self._prefix = f"{source.name}/{split}["  # names an example the source cannot name
    self._known = log.known(f"{source.identity}|{split}")
    self._known_mask = None
    if self._known and not careful:
      mask = np.zeros([source.split_size(which)], bool)
      mask[list(self._known)] = True
      self._known_mask = tf.constant(mask)

  def decode(self, data: tf.Tensor) -> tf.Tensor:
    return decode_centre_square_float(data, self._size, self._antialias, self._max_pixels,
                                      self._dct)

  def blank(self):
    """(zeros like a square, label 0): what a bad example gives."""
    return (tf.zeros([self._size, self._size, 3], tf.float32), tf.constant(0, tf.int64))

  def __call__(self, index: tf.Tensor, position: tf.Tensor, on_bad=None):
    index = tf.cast(index, tf.int64)
    if self._careful:
      return self._careful_read(index, position, on_bad)
    if self._known_mask is None:
      data, label, name = self._load(index)
      ok = is_valid_image(data)
    else:
      known = tf.gather(self._known_mask, index)
      data, label, name = tf.cond(
          known, lambda: (tf.constant(b""), tf.constant(0, tf.int64), tf.constant("")),
          lambda: self._load(index))
      ok = tf.logical_and(tf.logical_not(known), is_valid_image(data))

    def bad():
      recorded = self._record(index, position, name, data, tf.constant(True))
      with tf.control_dependencies([recorded]):
        return self._after_bad(label, on_bad)

    square, label = tf.cond(ok, lambda: (self.decode(data), label), bad)
    return square, label, ok

  def _careful_read(self, index, position, on_bad):
    def load_and_decode(i):
      data, label, name = self._load(i)
      check = tf.debugging.Assert(is_valid_image(data), ["invalid image bytes"])
      with tf.control_dependencies([check]):
        return self.decode(data), label

    (square, label), ok = attempt(load_and_decode, (index,), self.blank())

    def bad():
      with tf.control_dependencies([self.record_bad(index, position)]):
        return self._after_bad(label, on_bad)

    square, label = tf.cond(ok, lambda: (square, label), bad)
    return square, label, ok

  def record_bad(self, index: tf.Tensor, position: tf.Tensor) -> tf.Tensor:
    """Records example `index` as bad -> scalar bool False. Reads it again, apart from
    any decoder (each inside `attempt`), for its name and then its bytes to diagnose."""
    index = tf.cast(index, tf.int64)
    # The name alone first: an image folder's is its path, known without reading the file
    # (the unused read is pruned), so an unreadable file is still named.
    name, _ = attempt(lambda i: self._load(i)[2], (index,),
                      tf.strings.join([self._prefix, tf.strings.as_string(index), "]"]))
    data, read_ok = attempt(lambda i: self._load(i)[0], (index,), tf.constant(b""))
    return self._record(index, position, name, data, read_ok)

  def _after_bad(self, label, on_bad):
    if on_bad is not None:
      return on_bad()
    return self.blank()[0], label

  def _record(self, index, position, name, data, read_ok) -> tf.Tensor:
    def py_record(i, pos, n, d, r):
      i = int(i)
      path = self._known.get(i) or n.numpy().decode("utf-8", "replace") or f"#{i}"
      reason = self._log.reasons.get(path)
      if reason is None:
        reason = diagnose(path, d.numpy() if bool(r) else None, self._size, self._max_pixels)
      self._known[i] = path
      self._log.record(path, reason, (self._stream, int(pos)))
      return False
    recorded = tf.py_function(py_record, [index, tf.cast(position, tf.int64), name, data,
                                          read_ok], tf.bool)
    recorded.set_shape([])
    return recorded


def centre_squares(config, source, which: str, indices, log: BadImageLog):
  """tf.data of (index, uint8 [R, R, 3] centre square, label, ok), one per index.

  The whole-image decode shared by the statistics pass and the square cache: one pass,
  so every example is read carefully (no failing file stops it). A bad file is recorded
  in `log` and gives zeros with ok=False. `source` is a `sources.Source`; `indices`
  int64 [n] examples of split `which`.
  """
  read = Reader(config, source, which, log, careful=True)

  def example(index):
    square, label, ok = read(index, index)  # one pass: the index is the position
    return index, quantize(square), label, ok

  return tf.data.Dataset.from_tensor_slices(indices).map(
      example, num_parallel_calls=parallel_calls(config))
