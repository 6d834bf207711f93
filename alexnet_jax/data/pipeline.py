"""Batches for training and evaluation, and single-image preprocessing.

Order. The training stream is a pure function of (config.seed, epoch, position). Epoch
e visits the permutation `default_rng([seed, epoch]).permutation(num_train)`, truncated
to steps_per_epoch * global_batch examples (the remainder is dropped); global batch k of
the epoch is permuted positions [k*B, (k+1)*B), and process p of P takes the contiguous
slice [k*B + p*B/P, k*B + (p+1)*B/P) of it. So the global batch at a step is the same for
any process count, and a stream started at step k slices the index list and starts there,
reading nothing it skips.

Bad files. A training example whose file fails the cheap validity check is replaced by a
substitute drawn from (seed, epoch, index), also pure, so batches stay full and a resumed
stream still equals the uninterrupted one; the bad file is recorded in the BadImageLog.
(A file that passes the check but still fails to decode, i.e. is corrupt in the middle,
is dropped by `ignore_errors`, which keeps the run alive but shifts the rest of that
stream by one example; TF logs it. With `config.input.square_cache` such a file is marked
invalid when the cache is built and substituted like the others, so that stream is not
shifted.) In evaluation a bad file gets mask=False instead, so
every process still yields the same number of batches.

Per-example work keeps control flow (tf.cond / while_loop) off the common path: inside a
tf.data map each conditional costs more than the small ops it would save.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np

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
    centre_squares,
    check_or_record,
    decode_centre_square,
    decode_centre_square_float,
    is_valid_image,
    make_bad_image_log,
    record_bad,
)
from alexnet_jax.data.sources import DatasetInfo, Source, get_source

_log = logging.getLogger(__name__)

# A bad training file is replaced by a random other example; more than this many bad
# files in a row means the dataset is broken, not that one file is.
_MAX_SUBSTITUTION_TRIES = 16


# ------------------------------------------------------------------ public API


def dataset_info(config) -> DatasetInfo:
  """Sizes and class names of the configured dataset; validates it, decodes nothing."""
  return get_source(config).info


def steps_per_epoch(config, info: DatasetInfo) -> int:
  """Full global batches per epoch (training drops each epoch's remainder)."""
  n = info.num_train // int(config.batch_size)
  if n == 0:
    raise ValueError(f"config.batch_size={config.batch_size} exceeds the {info.num_train} "
                     "training examples")
  return n


def statistics(config) -> stats_lib.Stats:
  """Mean image [R, R, 3], mean RGB [3], eigvals [3], eigvecs [3, 3] (0-255 scale).

  `config.input.stats == "published"`: the published ImageNet values. "computed": one
  streaming pass over `config.input.stats_max_images` evenly spaced training images (all
  if <= 0), cached under `config.dataset.cache_dir` and reused.
  """
  resize = int(config.input.resize_size)
  mode = config.input.stats
  if mode == "published":
    return stats_lib.published(resize)
  source = get_source(config)
  idx = stats_lib.sample_indices(source.info.num_train, int(config.input.stats_max_images))
  path = stats_lib.cache_path(config.dataset.cache_dir, source.identity,
                              source.split_name("train"), len(idx), resize)
  cached = stats_lib.load(path)
  if cached is not None:
    return cached
  _log.info("computing dataset statistics over %d training images -> %s", len(idx), path)
  log = make_bad_image_log(config, None)
  batches = _square_batches(config, source, "train", idx, log)
  s = stats_lib.compute(batches)
  if log.count:
    _log.warning("statistics: %s", log.summary())
  stats_lib.save(path, s, f"{source.identity} {source.split_name('train')} {len(idx)} {resize}")
  return s


def train_batches(config, *, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, bad_images: BadImageLog | None = None,
                  stats: stats_lib.Stats | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Infinite training stream from global step `start_step`, this process's share.

  process_index/process_count: which share of each global batch to read, of how many
  (`parallel.data_share` derives them from the mesh). stats: the mean/PCA statistics to
  use (a run passes the ones it recorded); None = `statistics(config)`.

  Yields {'image': float32 [b, S, S, 3] (augmented, mean-subtracted, / train_divisor),
  'label': int32 [b]}, b = config.batch_size // process_count, S = config.model.input_size.
  """
  log = make_bad_image_log(config, bad_images)
  ds = train_dataset(config, start_step=start_step, process_index=process_index,
                     process_count=process_count, bad_images=log, stats=stats)
  return _numpy_batches(ds, log)


def eval_batches(config, *, ten_crop: bool, process_index: int = 0, process_count: int = 1,
                 bad_images: BadImageLog | None = None,
                 stats: stats_lib.Stats | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the evaluation split, padded so every process yields the same batches.

  Yields {'image': float32 [b, S, S, 3] (centre crop) or [b, 10, S, S, 3] (corners and
  centre, then their mirrors), 'label': int32 [b], 'mask': bool [b]}, b =
  config.eval_batch_size // process_count. mask is False on padding and on undecodable
  files; over all processes, mask is True exactly once per good example.
  """
  log = make_bad_image_log(config, bad_images)
  ds = eval_dataset(config, ten_crop=ten_crop, process_index=process_index,
                    process_count=process_count, bad_images=log, stats=stats)
  return _numpy_batches(ds, log)


def preprocess_image_files(config, paths: Sequence[str],
                           stats: stats_lib.Stats | None = None) -> np.ndarray:
  """Image files -> float32 [n, S, S, 3]: centre crop, mean-subtracted, as in evaluation.

  An undecodable file raises BadImageError naming it. stats: as for `eval_batches`.
  """
  a = AugmentConfig.from_config(config)
  mean = _mean_crop(config, a, stats if stats is not None else _needed_stats(config, a, False))
  return load_image_files_uint8(config, paths).astype(np.float32) - mean


def load_image_files_uint8(config, paths: Sequence[str]) -> np.ndarray:
  """Image files -> uint8 [n, S, S, 3] centre crops, no mean subtraction (for figures)."""
  a = AugmentConfig.from_config(config)
  log = BadImageLog(on_bad_image="error")

  def load(path):
    data = tf.io.read_file(path)
    with tf.control_dependencies([check_or_record(data, path, log)]):
      return centre_crop(decode_centre_square(data, a.resize_size, a.antialias), a)

  ds = tf.data.Dataset.from_tensor_slices(tf.constant([str(p) for p in paths], tf.string))
  ds = ds.map(load, num_parallel_calls=parallel_calls(config)).batch(max(1, len(paths)))
  out = [b for b in _numpy_batches(ds, log)]
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
                  source: Source | None = None,
                  stats: stats_lib.Stats | None = None) -> tf.data.Dataset:
  """The tf.data pipeline behind `train_batches` (same arguments, same elements)."""
  log = make_bad_image_log(config, bad_images)
  source = source or get_source(config)
  a = AugmentConfig.from_config(config)
  global_batch = int(config.batch_size)
  b = _local_batch(global_batch, process_count, process_index, "batch_size")
  n = source.info.num_train
  spe = steps_per_epoch(config, source.info)
  start_epoch, first_step = divmod(int(start_step), spe)
  seed = int(config.seed)
  load = source.loader("train")

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

  def cropped(index, ex_seed, oy, ox, flip):
    """float32 [S, S, 3] integer-valued pixels of the example's crop, and its label."""
    if cached:
      index, label = _cached_with_substitutes(load, valid, labels, index, ex_seed, n, log)
      return tf.cast(crop(load_square(index), oy, ox, a.crop_size, flip), tf.float32), label
    data, label = _load_with_substitutes(load, index, ex_seed, n, log)
    img = decode_centre_square_float(data, a.resize_size, a.antialias)
    # Crop, then round: the same pixels as rounding the whole square to uint8 first and
    # casting back (as the cache stores it), with no uint8 round trip and the rounding on
    # 224^2, not 256^2 pixels. The float work stays per image: there the image is
    # cache-resident, while the same ops on a whole batch (tens of MB) measured ~10%
    # slower per image.
    return tf.round(tf.clip_by_value(crop(img, oy, ox, a.crop_size, flip), 0.0, 255.0)), label

  def example(index, epoch):
    ex_seed = example_seed(seed, epoch, index)
    oy, ox, flip, alpha = augment_params(ex_seed, a)
    x, label = cropped(index, ex_seed, oy, ox, flip)
    x = _subtract_mean(x, mean, a.crop_size)
    if a.pca_jitter:
      off = pca_offset(alpha, stats.eigvals, stats.eigvecs, a.pca_scale)
      x = _add_rgb(x, off, a.crop_size)
    if a.train_divisor != 1.0:
      x = x / a.train_divisor
    return {"image": x, "label": tf.cast(label, tf.int32)}

  npc = parallel_calls(config)
  ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch_examples)
  ds = ds.map(example, num_parallel_calls=npc, deterministic=True)
  if log.on_bad_image == "skip" and not cached:  # the cache's reads have no decoder to fail
    ds = ds.ignore_errors(log_warning=True)
  ds = ds.batch(b, drop_remainder=True)
  return ds.prefetch(AUTOTUNE).with_options(_options())


def eval_dataset(config, *, ten_crop: bool, process_index: int = 0, process_count: int = 1,
                 bad_images: BadImageLog | None = None,
                 source: Source | None = None,
                 stats: stats_lib.Stats | None = None) -> tf.data.Dataset:
  """The tf.data pipeline behind `eval_batches` (same arguments, same elements)."""
  log = make_bad_image_log(config, bad_images)
  source = source or get_source(config)
  a = AugmentConfig.from_config(config)
  global_batch = int(config.eval_batch_size)
  b = _local_batch(global_batch, process_count, process_index, "eval_batch_size")
  idx, real = eval_indices(source.info.num_eval, global_batch, process_index, process_count)
  load = source.loader("eval")
  views = functools.partial(ten_crops if ten_crop else centre_crop, a=a)
  blank = tf.zeros([a.resize_size, a.resize_size, 3], tf.uint8)

  def example(index, is_real):
    # Padding reads nothing; a bad file is recorded and masked out.
    data, label, name = tf.cond(
        is_real, lambda: load(index),
        lambda: (tf.constant(b""), tf.constant(0, tf.int64), tf.constant("")))
    ok = tf.cond(is_real, lambda: check_or_record(data, name, log), lambda: tf.constant(False))
    img = tf.cond(ok, lambda: decode_centre_square(data, a.resize_size, a.antialias), lambda: blank)
    return {"image": views(img), "label": tf.cast(label, tf.int32), "mask": ok}

  mean = _mean_crop(config, a, stats if stats is not None else _needed_stats(config, a, False))

  def finish(batch):
    x = tf.cast(batch["image"], tf.float32)
    return {**batch, "image": _subtract_mean(x, mean, a.crop_size)}

  npc = parallel_calls(config)
  ds = tf.data.Dataset.from_tensor_slices((idx, real))
  ds = ds.map(example, num_parallel_calls=npc, deterministic=True)
  ds = ds.batch(b).map(finish, num_parallel_calls=npc, deterministic=True)
  return ds.prefetch(AUTOTUNE).with_options(_options())


# ------------------------------------------------------------------ helpers


def _draw_substitute(ex_seed, n: int, first, first_ok, try_candidate):
  """The first good example drawn from `ex_seed` after a bad one (draws t = 1, 2, ...).

  `try_candidate(index) -> (value, ok)`; `first`, `first_ok` (False, and the op that
  recorded the bad file) start the loop. Stops the run after _MAX_SUBSTITUTION_TRIES.
  """
  def body(t, value, ok):
    candidate = tf.random.stateless_uniform(
        [], tf.random.experimental.stateless_fold_in(ex_seed, tf.cast(t, tf.int64)),
        minval=0, maxval=n, dtype=tf.int64)
    value, ok = try_candidate(candidate)
    return t + 1, value, ok

  _, value, ok = tf.while_loop(
      lambda t, value, ok: tf.logical_and(tf.logical_not(ok), t < _MAX_SUBSTITUTION_TRIES),
      body, (tf.constant(1), first, first_ok))
  check = tf.debugging.Assert(
      ok, [f"{_MAX_SUBSTITUTION_TRIES} undecodable training files in a row; see the log"])
  with tf.control_dependencies([check]):
    return tf.nest.map_structure(tf.identity, value)


def _load_with_substitutes(load, index, ex_seed, n: int, log: BadImageLog):
  """Loads example `index`; if its file is bad, records it and loads a substitute drawn
  from `ex_seed` (so the choice is as reproducible as the example itself). The common
  path has a single tf.cond; the retry loop runs only after a bad file."""
  data, label, name = load(tf.cast(index, tf.int64))

  def try_candidate(candidate):
    data, label, name = load(candidate)
    return (data, label), check_or_record(data, name, log)

  def substitute():
    empty = (tf.constant(b""), tf.constant(0, tf.int64))
    return _draw_substitute(ex_seed, n, empty, record_bad(name, log), try_candidate)

  return tf.cond(is_valid_image(data), lambda: (data, label), substitute)


def _cached_with_substitutes(load, valid: np.ndarray, labels: np.ndarray, index, ex_seed,
                             n: int, log: BadImageLog):
  """`_load_with_substitutes` for the square cache -> (index to read, its label).

  Same substitutes (the same draws from `ex_seed`), chosen by the validity the cache
  recorded instead of by checking bytes; the original files are opened only to name bad
  ones in `log`."""
  valid_t = tf.constant(valid)
  labels_t = tf.constant(labels)
  index = tf.cast(index, tf.int64)

  def try_candidate(candidate):
    ok = tf.gather(valid_t, candidate)
    return candidate, tf.cond(ok, lambda: ok, lambda: record_bad(load(candidate)[2], log))

  def substitute():
    return _draw_substitute(ex_seed, n, index, record_bad(load(index)[2], log), try_candidate)

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


def _square_batches(config, source: Source, which: str, indices: np.ndarray,
                    log: BadImageLog) -> Iterator[np.ndarray]:
  """uint8 [n, R, R, 3] centre squares of the given examples; bad files skipped."""
  ds = centre_squares(config, source, which, indices, log).map(lambda _, img, __, ok: (img, ok))
  ds = ds.filter(_second).map(_first)
  ds = ds.batch(int(config.batch_size)).prefetch(AUTOTUNE).with_options(_options())
  return _numpy_batches(ds, log)


def _first(x, _):
  return x


def _second(_, y):
  return y


def _options() -> tf.data.Options:
  opts = tf.data.Options()
  opts.deterministic = True  # element order independent of thread timing
  return opts


def _numpy_batches(ds: tf.data.Dataset, log: BadImageLog) -> Iterator:
  """Iterates `ds` as numpy; a stop caused by a bad file becomes a BadImageError."""
  it = ds.as_numpy_iterator()
  while True:
    try:
      item = next(it)
    except StopIteration:
      return
    except (tf.errors.OpError, BadImageError) as e:
      if log.error_path is not None:
        raise BadImageError(
            f"cannot decode image {log.error_path} (empty, truncated or not JPEG/PNG); set "
            "config.input.on_bad_image='skip' to skip such files and report them") from e
      raise
    yield item
