"""Where examples come from: an image folder, the demo tree, or a prepared TFDS dataset.

Every source offers the same thing for a split: its size, and an in-graph loader
`index (int64 scalar) -> (encoded image bytes, int64 label, name string)` giving random
access by example index. Random access is what makes the training order a pure function
of (seed, epoch, position): a resumed stream slices the index list and never reads,
let alone decodes, the examples it skips.

- image folder / demo: `ROOT/<split>/<class>/*.{jpg,jpeg,png}`, class index = position of
  the class folder in sorted order (for the 1000 ILSVRC wnids this is TFDS imagenet2012's
  label order). Files are read with `tf.io.read_file`, in parallel, in-graph.
- TFDS: the prepared shards are read record by record, and parsed in-graph as the
  tf.train.Example TFDS wrote. The example index is the position in the concatenation of
  the split's shards in file order (TFDS's own read order without shuffle_files).
  TFRecord shards (TFDS's default; what the prepare command writes): TF's own TFRecord
  reader, in-graph, with no Python per record: each read is a one-record
  `TFRecordDatasetV2` started at the record's byte offset (length and data CRCs checked).
  The offsets come from a scan of the record headers made once (no payload is read;
  seconds for ImageNet) and cached under `dataset.cache_dir`.
  array_record shards (`--file_format=array_record`): array_record's C++ reader, which
  releases the GIL while it reads and decompresses, called through one
  `tf.numpy_function` per record. That call holds the GIL for its Python part, so on a
  many-core host TFRecord is the format that scales (benchmarks/input_pipeline.py
  measures both).
  A dataset whose builder code is not importable here (prepared elsewhere from a custom
  builder) is opened from its files alone.

Nothing here ever triggers a TFDS download: preparedness is checked from files on disk,
and the error for an unprepared dataset gives the `alexnet_jax.data.prepare` command.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shlex
import struct
from collections.abc import Callable

import numpy as np

from alexnet_jax import fileio
from alexnet_jax.data import demo
from alexnet_jax.data._tf import tf
from alexnet_jax.data.prepare import IMAGENET_TARS, PREPARE_COMMAND, TFDS_FILE_FORMATS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_INDEX_VERSION = 3  # 2: the key holds each shard's mtime; 3: record starts, no lengths


class DatasetNotFoundError(FileNotFoundError):
  """The configured dataset is not on disk; the message says what to put where."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  num_train: int
  num_eval: int
  class_names: tuple[str, ...]  # wnids or names; index = label


Loader = Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor, tf.Tensor]]


class Source:
  """A dataset: info, an identity for cache keys, and per-split random-access loaders."""

  name: str
  identity: str  # stable description of the data (path / version), for cache keys
  info: DatasetInfo

  def split_size(self, which: str) -> int:
    return self.info.num_train if which == "train" else self.info.num_eval

  def loader(self, which: str) -> Loader:
    raise NotImplementedError

  def split_name(self, which: str) -> str:
    raise NotImplementedError


def get_source(config, class_names: list[str] | tuple[str, ...] | None = None) -> Source:
  """The source `config.dataset.name` selects; validates it without decoding an image.

  class_names: the classes in label order when already known (e.g. recorded in a
  workdir). An image folder then takes its classes from them instead of from its training
  split, which may be absent (num_train 0: evaluating a copied workdir needs only val/);
  a split's class folder not among them is an error. A TFDS dataset keeps its own list
  (`setup.build` compares it with the recorded one).
  """
  name = config.dataset.name
  if name == "demo":
    return FolderSource(demo.ensure_demo_tree(config), config, identity_prefix="demo",
                        class_names=class_names)
  if name == "image_folder":
    root = config.dataset.image_folder
    if not root:
      raise DatasetNotFoundError(
          "config.dataset.name='image_folder' needs config.dataset.image_folder=ROOT, a "
          "folder holding ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG")
    return FolderSource(os.path.expanduser(root), config, identity_prefix="image_folder",
                        class_names=class_names)
  return TfdsSource(config)


# ------------------------------------------------------------------ image folders


class FolderSource(Source):
  """ROOT/<split>/<class>/*.{jpg,jpeg,png}; hidden (dot) entries are ignored.

  Files are listed by name only, so an entry that cannot be read (a dangling symlink, a
  symlink loop, a directory named x.JPEG, no permission) is an example that the pipeline
  skips and names with the reason when it reads it. A class folder with no image files
  is an error in the training split (a class that cannot be learned: an interrupted copy
  or extraction, most likely) and a warning in the evaluation split.
  """

  def __init__(self, root: str, config, identity_prefix: str,
               class_names: list[str] | tuple[str, ...] | None = None):
    if not os.path.isdir(root):
      raise DatasetNotFoundError(
          f"config.dataset.image_folder={root!r} does not exist; it should hold "
          "ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG")
    self.name = identity_prefix
    self.root = root
    self._splits = {
        "train": _folder_split_dir(root, config.dataset.train_split, "train_split",
                                   optional=class_names is not None),
        "eval": _folder_split_dir(root, config.dataset.eval_split, "eval_split"),
    }
    classes = (_class_folders(self._splits["train"]) if class_names is None
               else list(class_names))
    if not classes:
      raise DatasetNotFoundError(
          f"no class folders in {self._splits['train']} (config.dataset.image_folder="
          f"{root!r}); expected <split>/<class>/*.JPEG")
    self._lists = {w: _list_files(d, tuple(classes), w == "train")
                   for w, d in self._splits.items()}
    self.identity = f"{identity_prefix}:{os.path.realpath(root)}"
    self.info = DatasetInfo(
        num_classes=len(classes), num_train=len(self._lists["train"][0]),
        num_eval=len(self._lists["eval"][0]), class_names=tuple(classes))

  def split_name(self, which: str) -> str:
    return os.path.basename(self._splits[which])

  def files(self, which: str) -> tuple[np.ndarray, np.ndarray]:
    """(paths object [n], labels int64 [n]) of a split, sorted by class then file name."""
    return self._lists[which]

  def loader(self, which: str) -> Loader:
    paths, labels = self._lists[which]
    paths_t = tf.constant(paths.astype(str))
    labels_t = tf.constant(labels, tf.int64)

    def load(index):
      path = tf.gather(paths_t, index)
      return tf.io.read_file(path), tf.gather(labels_t, index), path
    return load


def _folder_split_dir(root: str, split: str, field: str, optional: bool = False) -> str:
  """The split's folder; if `optional` and there is none, the path it would have."""
  candidates = [split] + (["val"] if split == "validation" else [])
  for c in candidates:
    if os.path.isdir(os.path.join(root, c)):
      return os.path.join(root, c)
  if optional:
    return os.path.join(root, split)
  raise DatasetNotFoundError(
      f"config.dataset.image_folder={root!r} has no split folder "
      f"{' or '.join(repr(c) for c in candidates)} (config.dataset.{field}={split!r})")


def _class_folders(split_dir: str) -> list[str]:
  classes = []
  for e in os.scandir(split_dir):
    try:
      if not e.name.startswith(".") and e.is_dir():
        classes.append(e.name)
    except OSError as err:  # e.g. a symlink loop: no folder to read
      logging.getLogger(__name__).warning("ignoring %s: %s", e.path, err.strerror or err)
  return sorted(classes)


@functools.lru_cache(maxsize=16)
def _list_files(split_dir: str, classes: tuple[str, ...],
                training: bool) -> tuple[np.ndarray, np.ndarray]:
  """(paths, labels) of every image-named entry (see FolderSource) in class order; a
  training split that `class_names` made optional and that is absent has none."""
  if training and not os.path.isdir(split_dir):
    return np.array([], dtype=object), np.array([], np.int64)
  unknown = set(_class_folders(split_dir)) - set(classes)
  if unknown:
    raise DatasetNotFoundError(
        f"{split_dir} has class folders that are not among the {len(classes)} classes (the "
        f"training split's or the recorded ones): {sorted(unknown)[:5]}")
  paths, labels, empty = [], [], []
  for label, c in enumerate(classes):
    d = os.path.join(split_dir, c)
    try:
      names = sorted(e.name for e in os.scandir(d)
                     if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS))
    except OSError as err:  # missing, unreadable or not a folder
      names = []
      c = f"{c} ({err.strerror or err})"
    if not names:
      empty.append(c)
    paths += [os.path.join(d, n) for n in names]
    labels += [label] * len(names)
  if empty:
    message = (f"{split_dir}: {len(empty)} class folder(s) without .jpg/.jpeg/.png files: "
               f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}")
    if training:
      raise DatasetNotFoundError(
          f"{message}. A class with no training images cannot be learned (an interrupted "
          "copy or extraction?): add its images, or remove the folder if the class should "
          "not exist")
    logging.getLogger(__name__).warning("%s: evaluation has no examples of them", message)
  return np.array(paths, dtype=object), np.array(labels, np.int64)


# ------------------------------------------------------------------ TFDS


class TfdsSource(Source):

  def __init__(self, config):
    import tensorflow_datasets as tfds  # slow import; only for TFDS sources

    d = config.dataset
    self.name = d.name
    self._cache_dir = os.path.expanduser(d.cache_dir)
    data_dir = os.path.expanduser(d.data_dir) if d.data_dir else None
    try:
      # With no builder code for the name, TFDS opens a dataset prepared in data_dir from
      # its files alone.
      builder = tfds.builder(d.name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      # TFDS's message goes on to list every dataset it has (~9 KB); its first line says it.
      first = (str(e).strip().splitlines() or [""])[0]
      raise DatasetNotFoundError(
          f"config.dataset.name={d.name!r} is neither 'demo', 'image_folder', a TFDS "
          f"dataset, nor a dataset prepared in config.dataset.data_dir="
          f"{data_dir or '(TFDS default)'}: {first}") from None
    except ValueError as e:  # e.g. an unknown config or version of a known dataset
      raise DatasetNotFoundError(f"config.dataset.name={d.name!r}: {str(e)[:2000]}") from None
    if not tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json")):
      raise DatasetNotFoundError(_not_prepared_message(builder, config))
    self._builder = builder
    info = builder.info
    self._format = info.file_format.value if info.file_format else "tfrecord"
    if self._format not in TFDS_FILE_FORMATS:
      raise DatasetNotFoundError(
          f"TFDS {d.name} in {builder.data_dir} is stored as {self._format}; this pipeline "
          f"reads {' or '.join(TFDS_FILE_FORMATS)}: rebuild it with {PREPARE_COMMAND} "
          f"{d.name} --file_format=array_record into another config.dataset.data_dir")
    self._image_key, self._label_key = info.supervised_keys or ("image", "label")
    image, label = (info.features[k] if k in info.features else None
                    for k in (self._image_key, self._label_key))
    if not (isinstance(image, tfds.features.Image)
            and isinstance(label, tfds.features.ClassLabel)):
      # Records are parsed as encoded image bytes and an int64 class index.
      raise ValueError(
          f"TFDS {d.name} is not an image classification dataset this pipeline reads: it "
          f"needs an Image feature {self._image_key!r} and a ClassLabel {self._label_key!r} "
          f"(its supervised_keys), and has {info.features}")
    # imagenet2012 (and others) store the source file name: bad-image reports then name
    # the original file, not just the record index.
    features = info.features
    self._file_name_key = (
        "file_name" if isinstance(features, tfds.features.FeaturesDict)
        and "file_name" in features and isinstance(features["file_name"], tfds.features.Text)
        else None)
    self._splits = {"train": d.train_split, "eval": d.eval_split}
    for which, split in self._splits.items():
      if split not in info.splits:
        raise DatasetNotFoundError(
            f"TFDS {d.name} in {builder.data_dir} has no split {split!r} (config.dataset."
            f"{which if which == 'eval' else 'train'}_split); it has {list(info.splits)}")
    self.identity = f"tfds:{d.name}:{builder.version}:{os.path.realpath(builder.data_dir)}"
    self.info = DatasetInfo(
        num_classes=label.num_classes,
        num_train=info.splits[d.train_split].num_examples,
        num_eval=info.splits[d.eval_split].num_examples,
        class_names=tuple(label.names))
    self._readers: dict[str, _RecordReader] = {}

  def split_name(self, which: str) -> str:
    return self._splits[which]

  def _reader(self, which: str) -> _RecordReader:
    if which not in self._readers:
      split_info = self._builder.info.splits[self._splits[which]]
      paths = [os.fspath(p) for p in split_info.filepaths]
      if self._format == "array_record":
        self._readers[which] = _ArrayRecordReader(paths)
      else:
        self._readers[which] = _TfRecordReader(paths, self._cache_dir)
    return self._readers[which]

  def loader(self, which: str) -> Loader:
    reader = self._reader(which)
    if len(reader) != self.split_size(which):
      raise RuntimeError(f"TFDS {self.name} {self._splits[which]}: {len(reader)} records on "
                         f"disk, {self.split_size(which)} in dataset_info.json")
    spec = {self._image_key: tf.io.FixedLenFeature([], tf.string),
            self._label_key: tf.io.FixedLenFeature([], tf.int64)}
    if self._file_name_key:
      spec[self._file_name_key] = tf.io.FixedLenFeature([], tf.string, default_value="")
    prefix = f"{self.name}/{self._splits[which]}["

    def load(index):
      ex = tf.io.parse_single_example(reader.read(index), spec)
      parts = [prefix, tf.strings.as_string(index), "]"]
      if self._file_name_key:
        parts += [" ", ex[self._file_name_key]]
      return ex[self._image_key], ex[self._label_key], tf.strings.join(parts)
    return load


def _not_prepared_message(builder, config) -> str:
  d = config.dataset
  data_dir = os.fspath(builder.data_dir_root)  # what <name>[/<config>]/<version> is under
  command = f"{PREPARE_COMMAND} {shlex.quote(d.name)}"
  found = _prepared_versions(builder)
  if found:
    # E.g. an older TFDS built imagenet2012 5.0.0; this one's code asks for 5.1.0.
    base = builder.name + (f"/{builder.builder_config.name}" if builder.builder_config else "")
    found = (f"\n({os.path.dirname(builder.data_dir)} holds version(s) {', '.join(found)}, "
             f"not {builder.version}: config.dataset.name='{base}:{found[-1]}' reads "
             f"{found[-1]}.)")
  else:
    found = ""
  if builder.name == "imagenet2012":
    manual = os.path.expanduser(d.manual_dir) if d.manual_dir else os.path.join(
        data_dir, "downloads", "manual")
    present = [t for t in IMAGENET_TARS if os.path.exists(os.path.join(manual, t))]
    missing = [t for t in IMAGENET_TARS if t not in present]
    step = (f"put {' and '.join(missing)} (from image-net.org) into {manual} "
            "(config.dataset.manual_dir), then build it" if missing else
            f"the tars are in {manual}; build it")
    return (f"TFDS imagenet2012 is not prepared in {data_dir} (config.dataset.data_dir): "
            f"{step} once, offline, with\n  {command} --manual_dir={shlex.quote(manual)} "
            f"--data_dir={shlex.quote(data_dir)}\n(TFRecord, its default, is read without "
            "Python per record; --file_format=array_record also works, at one Python call "
            "per record), or point config.dataset.name='image_folder' "
            "and config.dataset.image_folder at an extracted ROOT/{train,val}/<wnid>/*.JPEG "
            f"tree.{found}")
  return (f"TFDS {d.name} is not prepared in {data_dir} (config.dataset.data_dir). Prepare "
          f"it once on a machine with network access:\n  {command} "
          f"--data_dir={shlex.quote(data_dir)}\nThis pipeline never downloads.{found}")


def _prepared_versions(builder) -> list[str]:
  """Versions of the builder's dataset (and config) prepared in its data_dir, sorted."""
  parent = os.path.dirname(builder.data_dir)
  if not os.path.isdir(parent):
    return []
  found = [e.name for e in os.scandir(parent)
           if os.path.exists(os.path.join(e.path, "dataset_info.json"))]
  return sorted(found, key=lambda v: tuple(int(x) if x.isdigit() else -1
                                           for x in v.split(".")))


class _RecordReader:
  """Random access to serialized records by their index in the split."""

  def __len__(self) -> int:
    raise NotImplementedError

  def read(self, index: tf.Tensor) -> tf.Tensor:
    """int64 scalar index -> the serialized record, a string scalar; in-graph."""
    raise NotImplementedError


class _ArrayRecordReader(_RecordReader):

  def __init__(self, paths: list[str]):
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    self._source = ArrayRecordDataSource(paths)

  def __len__(self) -> int:
    return len(self._source)

  def read(self, index: tf.Tensor) -> tf.Tensor:
    # numpy_function, not py_function: no eager tensors in and out, about a third of the
    # CPU per record (measured; see benchmarks/input_pipeline.py). The read itself runs in
    # array_record's C++ with the GIL released.
    record = tf.numpy_function(lambda i: self._source[int(i)], [index], tf.string,
                               stateful=False)
    record.set_shape([])  # numpy_function drops the static shape; parsing wants a scalar
    return record


class _TfRecordReader(_RecordReader):
  """TFRecord shards read by TF's own reader from an index of record starts (.npz cache)."""

  def __init__(self, paths: list[str], cache_dir: str):
    # A rebuilt dataset may reuse the paths (and even sizes); mtime tells it apart.
    stamp = [(os.path.realpath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
    key = hashlib.sha1(json.dumps([_INDEX_VERSION, stamp]).encode()).hexdigest()[:16]
    cache = fileio.path(cache_dir) / "tfrecord_index" / f"{key}.npz"
    if cache.exists():
      z = fileio.read_npz(cache)
      shard, start = z["shard"], z["start"]
    else:
      shard, start = _scan_tfrecords(paths)
      fileio.write_npz(cache, shard=shard, start=start)
    self._n = len(start)
    # Made once, outside any trace: every read in a pipeline's functions (the first try and
    # the substitutes) captures these same tensors instead of copying ~10 bytes a record.
    self._paths, self._shard, self._start = (tf.constant(paths), tf.constant(shard),
                                             tf.constant(start))

  def __len__(self) -> int:
    return self._n

  def read(self, index: tf.Tensor) -> tf.Tensor:
    paths, shard, start = self._paths, self._shard, self._start
    # One record, by TF's TFRecord reader from its byte offset: all C++, so parallel map
    # calls never meet on the GIL. buffer_size 0: read exactly the record (its header,
    # payload and CRC), not a 256 KB buffer around it (measured ~15% less CPU per record).
    records = tf.raw_ops.TFRecordDatasetV2(
        filenames=tf.gather(paths, tf.gather(shard, index)), compression_type="",
        buffer_size=tf.constant(0, tf.int64), byte_offsets=tf.gather(start, index))
    records = tf.data.experimental.from_variant(records, tf.TensorSpec([], tf.string))
    return records.take(1).get_single_element()


def _scan_tfrecords(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """(shard int32 [n], start int64 [n]): where each record starts. Record layout: uint64
  length, uint32 crc, payload, uint32 crc. Reads headers only."""
  shard, start = [], []
  for s, p in enumerate(paths):
    size = os.path.getsize(p)
    with open(p, "rb") as f:
      pos = 0
      while pos < size:
        f.seek(pos)
        header = f.read(8)
        n = struct.unpack("<Q", header)[0] if len(header) == 8 else -1
        if n < 0 or pos + 12 + n + 4 > size:
          # A shard cut short (interrupted copy, full disk): fail here, naming it, rather
          # than later as an unreadable record in the middle of training.
          raise DatasetNotFoundError(
              f"TFRecord shard {p} is truncated: the record at byte {pos} does not fit in "
              f"its {size} bytes; copy or prepare the dataset again")
        shard.append(s)
        start.append(pos)
        pos += 12 + n + 4
  return np.array(shard, np.int32), np.array(start, np.int64)
