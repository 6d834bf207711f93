"""Batches for training and evaluation, and single-image preprocessing.

Order. The training stream is a pure function of (config.seed, epoch, position). Epoch
e visits the permutation `default_rng([seed, epoch]).permutation(num_train)`, truncated
to steps_per_epoch * global_batch examples (the remainder is dropped); global batch k of
the epoch is permuted positions [k*B, (k+1)*B), and process p of P takes the contiguous
slice [k*B + p*B/P, k*B + (p+1)*B/P) of it. So the global batch at a step is the same for
any process count, and a stream started at step k slices the index list and starts there,
reading nothing it skips.

Bad files. A training example whose file cannot be used (see `decode`: unreadable,
empty, truncated, not JPEG/PNG, corrupt inside, too large) is replaced by a substitute
drawn from (seed, epoch, index), also pure, so batches stay full and a resumed stream
still equals the uninterrupted one; the file is recorded, with the reason, in the
BadImageLog. In evaluation a bad file gets mask=False instead, so every process still
yields the same number of batches and the count of skipped files is known. Batches are
read fast (cheap in-graph checks only); a batch whose reading fails (a file only the
decoder or the reader finds bad) is read again carefully, example by example inside an
in-graph try, and the fast stream restarts after it with the culprits known (skipped
unopened from then on). Careful reading gives the same bytes, so the output does not
depend on when a bad file was found (`_resilient_batches`).

Memory. Read-ahead is bounded and independent of the dataset's size: tf.data prefetches
`config.input.host_prefetch` batches (not AUTOTUNE), its autotuning is off (it grew
buffers past any fixed prefetch) and parallelism fixed, evaluation batches are finished
one at a time without map-and-batch fusion (the fused op kept several ten-crop batches in
flight), and freed memory is returned to the OS after each evaluation batch. Measured
(`benchmarks/eval_memory.py`): peak RSS grew with the evaluation set before, and is flat
once the read-ahead has filled now.

Per-example work keeps control flow (tf.cond / while_loop) off the common path: inside a
tf.data map each conditional costs more than the small ops it would save.

Length (~700 lines, over the package's ~450): this is where the one tf.data graph of a
run is assembled, and its three guarantees above (a pure order, the same bytes whatever
bad files are found when, bounded read-ahead) are properties of that graph as a whole:
the order plan feeds the substitute draw, which the careful re-read must reproduce byte
for byte. Kept in one module so they can be checked in one reading; the pieces that
stand alone live beside it (sources, decode, augment, stats, square_cache).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import weakref
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from alexnet_jax import config_checks
from alexnet_jax.data import square_cache
from alexnet_jax.data import stats as stats_lib
from alexnet_jax.data._tf import AUTOTUNE, parallel_calls, tf
from alexnet_jax.data.augment import (
    AugmentConfig,
    augment_params,
    centre_crop,
    crop,
    example_seed,
    pca_offset,
    ten_crops,
)
from alexnet_jax.data.decode import (
    BadImageError,
    BadImageLog,
    Reader,
    centre_squares,
    dct_method,
    make_bad_image_log,
    quantize,
)
from alexnet_jax.data.sources import DatasetInfo, Source, get_source

_log = logging.getLogger(__name__)

# A bad training file is replaced by a random other example; more than this many bad
# files in a row means the dataset is broken, not that one file is.
_MAX_SUBSTITUTION_TRIES = 16
# Longest run of batches read carefully after a failure (see `_resilient_batches`).
_MAX_CAREFUL_RUN = 64
# Bound here: a generator finalised at interpreter exit may no longer reach tf.errors.
_OpError = tf.errors.OpError


# ------------------------------------------------------------------ public API


def dataset_info(config, class_names: Sequence[str] | None = None) -> DatasetInfo:
  """Sizes and class names of the configured dataset; validates it, decodes nothing.

  class_names: the classes (label order) when known, e.g. recorded in a workdir: an image
  folder then needs no training split (see `sources.get_source`).
  """
  return get_source(config, class_names).info


def steps_per_epoch(config, info: DatasetInfo) -> int:
  """Full global batches per epoch (training drops each epoch's remainder)."""
  n = info.num_train // int(config.batch_size)
  if n == 0:
    raise config_checks.ConfigError(
        "batch_size", f"{config.batch_size} exceeds the dataset's {info.num_train} training "
        f"examples (an epoch drops its remainder, so no step would run): use at most "
        f"{info.num_train}")
  return n


def statistics(config) -> stats_lib.Stats:
  """Mean image [R, R, 3], mean RGB [3], eigvals [3], eigvecs [3, 3] (0-255 scale).

  `config.input.stats == "published"`: the published ImageNet values. "computed": one
  streaming pass over `config.input.stats_max_images` evenly spaced training images (all
  if <= 0), cached under `config.dataset.cache_dir` and reused while the sampled files
  are the same (paths, sizes and modification times). Unusable files are skipped and
  named in the log.
  """
  resize = int(config.input.resize_size)
  mode = config.input.stats
  if mode == "published":
    return stats_lib.published(resize)
  source = get_source(config)
  idx = stats_lib.sample_indices(source.info.num_train, int(config.input.stats_max_images))
  antialias = bool(config.input.get("resize_antialias", False))
  sample = _sample_fingerprint(source, "train", idx)
  path = stats_lib.cache_path(config.dataset.cache_dir, source.identity,
                              source.split_name("train"), sample, resize, antialias,
                              dct_method(config))
  try:
    cached = stats_lib.load(path)
  except stats_lib.Unreadable as err:  # e.g. a writer killed on a filesystem without rename
    _log.warning("%s: computing the statistics again", err)
    cached = None
  if cached is not None:
    return cached
  _log.info("computing dataset statistics over %d training images -> %s", len(idx), path)
  log = make_bad_image_log(config, None)
  batches = _square_batches(config, source, "train", idx, log)
  s = stats_lib.compute(batches)
  if log.count:
    _log.warning("statistics: %s", log.summary())
  stats_lib.save(path, s, f"{source.identity} {source.split_name('train')} {len(idx)} images "
                          f"{sample} {resize} antialias={antialias}")
  return s


def train_batches(config, *, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, bad_images: BadImageLog | None = None,
                  stats: stats_lib.Stats | None = None,
                  class_names: Sequence[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Infinite training stream from global step `start_step`, this process's share.

  process_index/process_count: which share of each global batch to read, of how many
  (`parallel.data_share` derives them from the mesh). stats: the mean/PCA statistics to
  use (a run passes the ones it recorded); None = `statistics(config)`. class_names: as
  for `dataset_info`.

  Yields {'image': float32 [b, S, S, 3] (augmented, mean-subtracted, / train_divisor),
  'label': int32 [b]}, b = config.batch_size // process_count, S = config.model.input_size.
  """
  log = make_bad_image_log(config, bad_images)
  source = get_source(config, class_names)
  if stats is None:
    stats = _needed_stats(config, AugmentConfig.from_config(config), train=True)

  stream = log.new_stream()

  def make(k: int, careful: bool) -> tf.data.Dataset:
    return train_dataset(config, start_step=start_step + k, process_index=process_index,
                         process_count=process_count, bad_images=log, source=source,
                         stats=stats, careful=careful, stream=stream)
  return _opened(_resilient_batches(make, log, make(0, False)))


def eval_batches(config, *, ten_crop: bool, process_index: int = 0, process_count: int = 1,
                 bad_images: BadImageLog | None = None,
                 stats: stats_lib.Stats | None = None,
                 class_names: Sequence[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the evaluation split, padded so every process yields the same batches.

  Yields {'image': float32 [b, S, S, 3] (centre crop) or [b, 10, S, S, 3] (corners and
  centre, then their mirrors; mean-subtracted, not divided by train_divisor, as the 2012
  code's test crops), 'label': int32 [b], 'mask': bool [b]}, b =
  config.eval_batch_size // process_count. mask is False on padding and on unusable
  files (recorded in `bad_images`); over all processes, mask is True exactly once per
  good example, so num_eval minus the masked-in count is the number of files skipped.
  class_names: as for `dataset_info`.
  """
  log = make_bad_image_log(config, bad_images)
  source = get_source(config, class_names)
  if stats is None:
    stats = _needed_stats(config, AugmentConfig.from_config(config), train=False)

  stream = log.new_stream()

  def make(k: int, careful: bool) -> tf.data.Dataset:
    return eval_dataset(config, ten_crop=ten_crop, process_index=process_index,
                        process_count=process_count, bad_images=log, source=source,
                        stats=stats, first_batch=k, careful=careful, stream=stream)
  return _opened(_resilient_batches(make, log, make(0, False),
                                    after_each=_release_freed_memory))


def preprocess_image_files(config, paths: Sequence[str], stats: stats_lib.Stats | None = None,
                           bad_images: BadImageLog | None = None) -> np.ndarray:
  """Image files -> float32 [n, S, S, 3]: centre crop, mean-subtracted, as in evaluation
  (so not divided by train_divisor either).

  An unusable file raises BadImageError naming it and why; with `bad_images` (a log in
  "skip" mode) it is recorded there instead (`bad_images.reasons[path]`) and its image is
  the mean's negative (zeros before the subtraction). stats: as for `eval_batches`.
  """
  a = AugmentConfig.from_config(config)
  mean = _mean_crop(config, a, stats if stats is not None else _needed_stats(config, a, False))
  return load_image_files_uint8(config, paths, bad_images).astype(np.float32) - mean


def load_image_files_uint8(config, paths: Sequence[str],
                           bad_images: BadImageLog | None = None) -> np.ndarray:
  """Image files -> uint8 [n, S, S, 3] centre crops, no mean subtraction (for figures).

  Bad files: as for `preprocess_image_files` (zeros when skipped). Each file is read
  carefully (few files: speed does not matter, and a huge JPEG decodes at reduced scale).
  """
  a = AugmentConfig.from_config(config)
  log = bad_images if bad_images is not None else BadImageLog(on_bad_image="error")
  files = _FileList([str(p) for p in paths])
  read = Reader(config, files, "files", log, careful=True)

  def load(index):
    square, _, _ = read(index, index)
    return quantize(centre_crop(square, a))

  ds = tf.data.Dataset.range(len(paths)).map(load, num_parallel_calls=_parallel_calls(config),
                                             deterministic=True)
  out = [b for b in _iterate(ds.batch(max(1, len(paths))).with_options(_options()), log)]
  return out[0] if out else np.zeros((0, a.crop_size, a.crop_size, 3), np.uint8)


# ------------------------------------------------------------------ order


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of epoch `epoch`: a permutation of range(n), int64 [n]."""
  return np.random.default_rng([seed % 2**32, epoch]).permutation(n).astype(np.int64)


def train_epoch_indices(seed: int, epoch: int, num_train: int, global_batch: int,
                        process_index: int, process_count: int,
                        first_step: int = 0) -> np.ndarray:
  """Example indices process `process_index` reads in epoch `epoch` from step `first_step`
  of the epoch on: int64 [(steps_per_epoch - first_step) * global_batch / process_count]."""
  spe = num_train // global_batch
  b = global_batch // process_count
  perm = epoch_permutation(seed, epoch, num_train)[:spe * global_batch]
  return perm.reshape(spe, process_count, b)[first_step:, process_index].reshape(-1)


def eval_indices(num_eval: int, global_batch: int, process_index: int,
                 process_count: int) -> tuple[np.ndarray, np.ndarray]:
  """(example index int64 [m], is_real bool [m]) of this process, padded to full batches.

  Global batch k holds examples [k*B, (k+1)*B) in split order; process p its p-th slice.
  """
  num_batches = max(1, math.ceil(num_eval / global_batch))
  pos = np.arange(num_batches * global_batch, dtype=np.int64)
  real = pos < num_eval
  idx = np.where(real, pos, 0)
  b = global_batch // process_count
  pick = lambda x: x.reshape(num_batches, process_count, b)[:, process_index].reshape(-1)  # noqa: E731
  return pick(idx), pick(real)


# ------------------------------------------------------------------ tf.data


def train_dataset(config, *, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, bad_images: BadImageLog | None = None,
                  source: Source | None = None, stats: stats_lib.Stats | None = None,
                  careful: bool = False, stream: int | None = None,
                  class_names: Sequence[str] | None = None) -> tf.data.Dataset:
  """The tf.data pipeline behind `train_batches` (same arguments, same elements).

  careful=False: a file only the reader or the decoder finds bad stops the iterator
  (`train_batches` then re-reads that batch with careful=True and goes on). stream: the
  `bad_images.new_stream()` id of the stream this dataset continues (counts each skip
  once over such re-reads).
  """
  log = make_bad_image_log(config, bad_images)
  source = source or get_source(config, class_names)
  a = AugmentConfig.from_config(config)
  global_batch = int(config.batch_size)
  b = _local_batch(global_batch, process_count, process_index, "batch_size")
  n = source.info.num_train
  spe = steps_per_epoch(config, source.info)
  start_epoch, first_step = divmod(int(start_step), spe)
  seed = int(config.seed)
  read = Reader(config, source, "train", log, careful, stream)

  def plan(epoch):
    e = int(epoch)
    return train_epoch_indices(seed, e, n, global_batch, process_index, process_count,
                               first_step if e == start_epoch else 0)

  def epoch_examples(epoch):
    idx = tf.numpy_function(plan, [epoch], tf.int64, stateful=False)
    idx.set_shape([None])
    return tf.data.Dataset.from_tensor_slices(idx).map(lambda i: (i, epoch))

  if stats is None:
    stats = _needed_stats(config, a, train=True)
  mean = _mean_crop(config, a, stats)
  cached = bool(config.input.get("square_cache", False))
  if cached:
    path, valid, labels = square_cache.ensure(config, source, "train")
    load_square = square_cache.loader(path, a.resize_size)

  def cropped(index, position, ex_seed, oy, ox, flip):
    """float32 [S, S, 3] integer-valued pixels of the example's crop, and its label."""
    if cached:
      index, label = _cached_with_substitutes(read, valid, labels, index, position, ex_seed,
                                              n)
      return tf.cast(crop(load_square(index), oy, ox, a.crop_size, flip), tf.float32), label

    def substitute():
      return _draw_substitute(ex_seed, n, read.blank(),
                              lambda c: _split_ok(read(c, position)))

    square, label, _ = read(index, position, on_bad=substitute)
    # Crop, then round: the same pixels as rounding the whole square to uint8 first and
    # casting back (as the cache stores it), with no uint8 round trip and the rounding on
    # 224^2, not 256^2 pixels. The float work stays per image: there the image is
    # cache-resident, while the same ops on a whole batch (tens of MB) measured ~10%
    # slower per image.
    return tf.round(tf.clip_by_value(crop(square, oy, ox, a.crop_size, flip), 0.0, 255.0)), label

  def example(position, index_epoch):
    index, epoch = index_epoch
    ex_seed = example_seed(seed, epoch, index)
    oy, ox, flip, alpha = augment_params(ex_seed, a)
    x, label = cropped(index, position, ex_seed, oy, ox, flip)
    x = _subtract_mean(x, mean, a.crop_size)
    if a.pca_jitter:
      off = pca_offset(alpha, stats.eigvals, stats.eigvecs, a.pca_scale)
      x = _add_rgb(x, off, a.crop_size)
    if a.train_divisor != 1.0:  # training only: see AugmentConfig.train_divisor
      x = x / a.train_divisor
    return {"image": x, "label": tf.cast(label, tf.int32)}

  npc = _parallel_calls(config)
  ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch_examples)
  # Positions in this process's stream from step 0 on, the same in any restarted stream.
  ds = ds.enumerate(start=int(start_step) * b)
  ds = ds.map(example, num_parallel_calls=npc, deterministic=True)
  ds = ds.batch(b, drop_remainder=True)
  # Map-and-batch fusion stays on here (the throughput-tuned path): with fixed parallelism
  # the fused op keeps about parallel_calls / batch batches in flight (RSS measured flat).
  return ds.prefetch(_host_prefetch(config)).with_options(_options())


def eval_dataset(config, *, ten_crop: bool, process_index: int = 0, process_count: int = 1,
                 bad_images: BadImageLog | None = None,
                 source: Source | None = None,
                 stats: stats_lib.Stats | None = None, first_batch: int = 0,
                 careful: bool = False, stream: int | None = None,
                 class_names: Sequence[str] | None = None) -> tf.data.Dataset:
  """The tf.data pipeline behind `eval_batches` (same arguments, same elements), from
  this process's batch `first_batch` on. careful: as for `train_dataset`."""
  log = make_bad_image_log(config, bad_images)
  source = source or get_source(config, class_names)
  a = AugmentConfig.from_config(config)
  global_batch = int(config.eval_batch_size)
  b = _local_batch(global_batch, process_count, process_index, "eval_batch_size")
  idx, real = eval_indices(source.info.num_eval, global_batch, process_index, process_count)
  start = first_batch * b
  pos = np.arange(start, len(idx), dtype=np.int64)
  idx, real = idx[start:], real[start:]
  read = Reader(config, source, "eval", log, careful, stream)
  views = functools.partial(ten_crops if ten_crop else centre_crop, a=a)

  def example(index, is_real, position):
    # Padding reads nothing; a bad file is recorded and masked out.
    square, label, ok = tf.cond(is_real, lambda: read(index, position),
                                lambda: (*read.blank(), tf.constant(False)))
    return {"image": views(quantize(square)), "label": tf.cast(label, tf.int32), "mask": ok}

  mean = _mean_crop(config, a, stats if stats is not None else _needed_stats(config, a, False))

  def finish(batch):
    x = tf.cast(batch["image"], tf.float32)
    return {**batch, "image": _subtract_mean(x, mean, a.crop_size)}

  ds = tf.data.Dataset.from_tensor_slices((idx, real, pos))
  ds = ds.map(example, num_parallel_calls=_parallel_calls(config), deterministic=True)
  # One batch finished at a time: a ten-crop float32 batch is 60 MB per 10 images.
  ds = ds.batch(b).map(finish)
  return ds.prefetch(_host_prefetch(config)).with_options(_options(fuse=False))


# ------------------------------------------------------------------ helpers


def _split_ok(result):
  """Reader's (square, label, ok) -> ((square, label), ok) for `_draw_substitute`."""
  square, label, ok = result
  return (square, label), ok


def _draw_substitute(ex_seed, n: int, blank, try_candidate):
  """The first good example drawn from `ex_seed` after a bad one (draws t = 1, 2, ...).

  `try_candidate(index) -> (value, ok)`; `blank` has the structure of value. Stops the
  run after _MAX_SUBSTITUTION_TRIES bad draws.
  """
  def body(t, value, ok):
    candidate = tf.random.stateless_uniform(
        [], tf.random.experimental.stateless_fold_in(ex_seed, tf.cast(t, tf.int64)),
        minval=0, maxval=n, dtype=tf.int64)
    value, ok = try_candidate(candidate)
    return t + 1, value, ok

  _, value, ok = tf.while_loop(
      lambda t, value, ok: tf.logical_and(tf.logical_not(ok), t < _MAX_SUBSTITUTION_TRIES),
      body, (tf.constant(1), blank, tf.constant(False)))
  check = tf.debugging.Assert(
      ok, [f"{_MAX_SUBSTITUTION_TRIES} unusable training files in a row; see the log"])
  with tf.control_dependencies([check]):
    return tf.nest.map_structure(tf.identity, value)


def _cached_with_substitutes(read: Reader, valid: np.ndarray, labels: np.ndarray, index,
                             position, ex_seed, n: int):
  """The square cache's substitution -> (index to read, its label).

  The same substitutes as the decoding path (the same draws from `ex_seed`), chosen by
  the validity the cache recorded instead of by reading files; the original files are
  opened only to name (and diagnose) bad ones in the log."""
  valid_t = tf.constant(valid)
  labels_t = tf.constant(labels)
  index = tf.cast(index, tf.int64)

  def try_candidate(candidate):
    ok = tf.gather(valid_t, candidate)
    return candidate, tf.cond(ok, lambda: ok, lambda: read.record_bad(candidate, position))

  def substitute():
    with tf.control_dependencies([read.record_bad(index, position)]):
      return _draw_substitute(ex_seed, n, index, try_candidate)

  index = tf.cond(tf.gather(valid_t, index), lambda: index, substitute)
  return index, tf.gather(labels_t, index)


def needed_statistics(config) -> stats_lib.Stats | None:
  """The statistics training with `config` uses (mean and/or PCA), else None: what a run
  records in its workdir so evaluation and prediction need no training data."""
  return _needed_stats(config, AugmentConfig.from_config(config), train=True)


def _needed_stats(config, a: AugmentConfig, train: bool) -> stats_lib.Stats | None:
  mode = config.input.mean
  explicit = mode == "per_channel" and config.input.get("mean_rgb") is not None
  if (mode in ("per_pixel", "per_channel") and not explicit) or (train and a.pca_jitter):
    return statistics(config)
  return None


def _mean_crop(config, a: AugmentConfig, stats: stats_lib.Stats | None = None) -> np.ndarray:
  """What is subtracted from every crop: float32 [S, S, 3] (or broadcastable [3]).

  per_pixel: the centre S x S crop of the R x R mean image, for every crop, as the 2012
  code does (also for corner, random and mirrored crops).
  """
  mode = config.input.mean
  if mode == "none":
    return np.zeros([3], np.float32)
  if mode == "published":
    return stats_lib.PUBLISHED_MEAN_RGB.astype(np.float32)
  if mode == "per_channel" and config.input.get("mean_rgb") is not None:
    # Given values (e.g. torchvision's, for imported weights), not the training set's.
    return np.asarray(config.input.mean_rgb, np.float32)
  stats = stats or statistics(config)
  if mode == "per_channel":
    return stats.mean_rgb.astype(np.float32)
  m = (a.resize_size - a.crop_size) // 2  # per_pixel
  return stats.mean_image[m:m + a.crop_size, m:m + a.crop_size].astype(np.float32)


# TF's elementwise ops are slow when an operand broadcasts along the innermost axis of 3
# channels (Eigen's broadcast then does index arithmetic per element): `x - mean_rgb` or
# `x + offset` cost ~0.2 ms per 224^2 image, 3-5x the same op with operands of equal shape
# or broadcast over leading axes only. These two helpers keep the broadcast on leading
# axes; the results are bit-identical.


def _subtract_mean(x: tf.Tensor, mean: np.ndarray, size: int) -> tf.Tensor:
  """x float32 [..., S, S, 3] minus the mean crop ([S, S, 3] or [3], see `_mean_crop`)."""
  if not np.any(mean):  # mean "none": x - 0 == x exactly
    return x
  return x - tf.constant(np.broadcast_to(mean, [size, size, 3]).astype(np.float32))


def _add_rgb(x: tf.Tensor, rgb: tf.Tensor, s: int) -> tf.Tensor:
  """x float32 [s, s, 3] plus rgb [3] on every pixel, as [s, s*3] + [1, s*3]."""
  return tf.reshape(tf.reshape(x, [s, s * 3]) + tf.tile(rgb, [s])[None, :], [s, s, 3])


def _local_batch(global_batch: int, process_count: int, process_index: int, field: str) -> int:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  if global_batch % process_count:
    raise ValueError(f"config.{field}={global_batch} is not divisible by the "
                     f"{process_count} processes")
  return global_batch // process_count


def _sample_fingerprint(source: Source, which: str, indices: np.ndarray) -> str:
  """What the statistics of these examples depend on: for an image folder, each sampled
  file's path, size and modification time (a file added, removed or replaced changes
  it); for other sources the example count (their identity names an immutable version)."""
  files = getattr(source, "files", None)
  if files is None:
    return f"{len(indices)} examples"
  stamps = []
  for path in files(which)[0][indices]:
    try:
      st = os.stat(path)
      stamps.append((path, st.st_size, st.st_mtime_ns))
    except OSError as e:  # an unreadable file is skipped by the pass; its state is the key
      stamps.append((path, e.errno))
  return hashlib.sha1(json.dumps(stamps).encode()).hexdigest()[:16]


def _square_batches(config, source: Source, which: str, indices: np.ndarray,
                    log: BadImageLog) -> Iterator[np.ndarray]:
  """uint8 [n, R, R, 3] centre squares of the given examples; bad files skipped."""
  ds = centre_squares(config, source, which, indices, log).map(lambda _, img, __, ok: (img, ok))
  ds = ds.filter(_second).map(_first)
  ds = ds.batch(int(config.batch_size)).prefetch(_host_prefetch(config))
  return _iterate(ds.with_options(_options()), log)


def _first(x, _):
  return x


def _second(_, y):
  return y


def _host_prefetch(config) -> int:
  return int(config.input.host_prefetch)


def _parallel_calls(config) -> int:
  """config.input.num_parallel_calls, -1 meaning every CPU this process may use: a fixed
  number, as tf.data's autotuning is off (see `_options`)."""
  n = parallel_calls(config)
  if n != AUTOTUNE:
    return n
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _options(fuse: bool = True) -> tf.data.Options:
  opts = tf.data.Options()
  opts.deterministic = True  # element order independent of thread timing
  # Autotuning grows buffers beyond the fixed prefetch (it turns prefetch(n) into an
  # autotuned buffer of at least n), by whole batches: measured on ten-crop evaluation,
  # 3.1 GB RSS with it, 2.1 GB without, and autotune.ram_budget=256 MB did not stop it.
  # Parallelism is then fixed (`_parallel_calls`), as decoding is CPU-bound anyway.
  opts.autotune.enabled = False
  if not fuse:
    opts.experimental_optimization.map_and_batch_fusion = False
  return opts


class _FileList:
  """Image files given by path as a one-split `Source` (for `Reader`): name = path."""

  name = "files"

  def __init__(self, paths: list[str]):
    self._paths = paths
    self.identity = "files:" + hashlib.sha1(json.dumps(paths).encode()).hexdigest()[:16]

  def split_name(self, which: str) -> str:
    return which

  def split_size(self, which: str) -> int:
    return len(self._paths)

  def loader(self, which: str):
    paths = tf.constant(self._paths or [""])

    def load(index):
      path = tf.gather(paths, index)
      return tf.io.read_file(path), tf.constant(0, tf.int64), path
    return load


def _iterate(ds: tf.data.Dataset, log: BadImageLog) -> Iterator:
  """Iterates `ds` as numpy; a stop caused by a bad file in "error" mode becomes a
  BadImageError naming the file and why."""
  it = ds.as_numpy_iterator()
  while True:
    try:
      item = next(it)
    except StopIteration:
      return
    except (_OpError, BadImageError) as e:
      if log.error_path is not None:
        raise BadImageError(log.error_message(log.error_path)) from e
      raise
    yield item


def _resilient_batches(make: Callable[[int, bool], tf.data.Dataset], log: BadImageLog,
                       first: tf.data.Dataset,
                       after_each: Callable[[], None] | None = None) -> Iterator:
  """The batches of `make(first_batch, careful)`, read fast; from a batch whose reading
  fails, a run of batches is read carefully, then the fast stream restarts after it.

  A fast stream stops at the first batch holding a file that only the reader or the
  decoder finds bad (batches come in order, so all before it were delivered). Read with
  careful=True, that batch records the culprits (the restarted fast stream skips them
  unopened) and comes out exactly as an all-careful stream would: the outcome does not
  depend on whether a file was found bad before. An error with no bad file to blame is
  re-raised. first: `make(0, False)`, made by the caller so that a bad argument fails at
  the call, not at the first batch. Each restart rebuilds the pipeline (seconds), so the
  careful run doubles with every failure, up to _MAX_CAREFUL_RUN batches: a dataset with
  many such files is soon read mostly carefully (~0.3 ms more per image) instead of
  restarting each batch.
  """
  k, run = 0, 1
  while True:
    try:
      for batch in _iterate(first if k == 0 else make(k, False), log):
        yield batch
        k += 1
        if after_each is not None:
          after_each()
      return
    except _OpError as error:
      known = log.num_known()
      careful = _iterate(make(k, True).take(run), log)
      first = next(careful, None)
      if log.num_known() == known:
        raise error
      _log.info("batches %d-%d read carefully after: %s", k, k + run - 1,
                error.message.strip().splitlines()[0][:200])
      if first is None:
        return
      for batch in itertools.chain([first], careful):
        yield batch
        k += 1
        if after_each is not None:
          after_each()
      run = min(2 * run, _MAX_CAREFUL_RUN)


# The batch streams not yet closed, closed at exit (see `_close_open_streams`).
_OPEN_STREAMS: weakref.WeakSet = weakref.WeakSet()


def _opened(stream: Iterator) -> Iterator:
  _OPEN_STREAMS.add(stream)
  return stream


@atexit.register
def _close_open_streams() -> None:
  """Closes the streams a program still holds at exit, while tf.data's threads can still
  take the GIL: a pipeline destroyed during interpreter finalization with a Python call
  in flight (a bad file's record, an epoch's plan) waits for it forever (seen: a process
  that never exited; a plain map over tf.py_function does the same)."""
  for stream in list(_OPEN_STREAMS):
    stream.close()


def _libc_malloc_trim():
  try:
    return ctypes.CDLL(None).malloc_trim
  except (OSError, AttributeError):  # not glibc: nothing to trim
    return None


_MALLOC_TRIM = _libc_malloc_trim()


def _release_freed_memory() -> None:
  """Hands memory freed by the last batch back to the OS.

  glibc keeps freed mid-sized blocks (the per-example tensors of tf.data's threads) in
  per-thread arenas, so over a long evaluation the RSS crept up by whole batches even
  with bounded buffers (measured: +1.2 GB over 30 ten-crop batches of 100, flat with
  this); malloc_trim returns them. Called once per evaluation batch (~1 ms).
  """
  if _MALLOC_TRIM is not None:
    _MALLOC_TRIM(0)
