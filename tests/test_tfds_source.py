"""The TFDS source on real datasets that TFDS itself prepares offline in a temp data_dir.

No mocks and no network. Two datasets, built once per module:
- `alexnet_tiny_tfds`: a small GeneratorBasedBuilder (JPEGs, a ClassLabel whose names are
  deliberately unsorted), prepared as tfrecord and as array_record, 3 shards a split. Its
  builder is not registered, so the pipeline opens it from its files alone, as it would a
  dataset prepared elsewhere from a custom builder.
- `imagenet2012`: TFDS's real builder (real label order, TFDS's shipped validation label
  list) on a fake manual_dir of ILSVRC tars holding a few JPEGs, the validation tar a
  non-contiguous subset under real file names, prepared by running the command that the
  pipeline's not-prepared error prints (which labels validation files by name).
JPEGs are real photos from ../shared/data/imagenet-tiny when present, generated otherwise.

Examples are identified by content: with no random crop or flip and no mean, a batch
image is exactly the centre crop `load_image_files_uint8` makes of the source file.
"""

import contextlib
import dataclasses
import glob
import io
import os
import shlex
import shutil
import socket
import tarfile
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image, ImageFilter

from alexnet_jax import data as ip
from alexnet_jax.data import pipeline, prepare, sources
from experiments.alexnet import get_config


@contextlib.contextmanager
def _no_network():
  """Any connection or name lookup raises: a not-prepared error must come from files on
  disk alone (a TFDS download attempt offline spends minutes in DNS retries)."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args[1:] or kwargs}")

  with mock.patch.object(socket, "getaddrinfo", refuse), \
      mock.patch.object(socket, "create_connection", refuse), \
      mock.patch.object(socket.socket, "connect", refuse):
    yield

TINY = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                    "imagenet-tiny"))
R, S = 64, 56  # small resize/crop: decoding, not pixels, is what is under test
TINY_NAME = "alexnet_tiny_tfds"
TINY_CLASSES = ("zebra", "apple", "mango")  # unsorted: the order must come from the dataset
TINY_PER_CLASS = {"train": 8, "validation": 3}  # 24 and 9 examples
WNIDS = ("n01440764", "n02102040", "n02979186")  # tench, springer, cassette player
IMAGENET_TRAIN_PER_CLASS = 4  # 12 examples
# A partial validation tar as a user would cut it: real file names, not a prefix of the
# 50,000 (TFDS alone would pair them with lines 1-7 of its label list). 4041 is truncated.
IMAGENET_VAL = (1, 293, 1000, 4041, 12345, 27001, 50000)
IMAGENET_BAD = "ILSVRC2012_val_00004041.JPEG"


class AlexnetTinyTfds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """manual_dir/<split>/<class>/*.jpg as a TFDS dataset."""

  name = TINY_NAME
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "The test writes manual_dir/<split>/<class>/*.jpg."

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=TINY_CLASSES),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    return {s: self._generate_examples(dl_manager.manual_dir / s) for s in TINY_PER_CLASS}

  def _generate_examples(self, root):
    for path in sorted(root.glob("*/*.jpg")):
      yield f"{path.parent.name}/{path.name}", {"image": path, "label": path.parent.name}


@dataclasses.dataclass
class Prepared:
  name: str
  data_dir: str
  file_format: str
  class_names: tuple[str, ...]
  num_train: int
  num_eval: int
  train: dict  # centre crop bytes -> (source key, label), one per training example
  eval: dict  # the same for the good evaluation examples
  train_order: list  # source keys in the order TFDS itself reads the split
  eval_order: list
  bad_eval: tuple[str, ...] = ()  # file names of bad evaluation examples


def tfds_order(data_dir: str, name: str, split: str, files: dict[str, bytes]) -> list[str]:
  """Source keys of a split in TFDS's own read order (shards in order, no shuffling),
  found by the stored JPEG bytes, which TFDS keeps verbatim."""
  (info,) = glob.glob(os.path.join(data_dir, name, "*", "dataset_info.json"))
  builder = tfds.builder_from_directory(os.path.dirname(info))
  raw = {"image": tfds.decode.SkipDecoding()}
  if builder.info.file_format.value == "array_record":  # TFDS reads it only this way
    source = builder.as_data_source(split, decoders=raw)
    records = [source[i]["image"] for i in range(len(source))]
  else:
    records = [x["image"] for x in tfds.as_numpy(
        builder.as_dataset(split, shuffle_files=False, decoders=raw))]
  key_of = {data: key for key, data in files.items()}
  assert len(key_of) == len(files) == len(records)
  return [key_of[r] for r in records]


def photos(n: int) -> list[bytes]:
  """n distinct JPEGs: ImageNet photos from the shared set, or smooth random images."""
  paths = sorted(glob.glob(os.path.join(TINY, "*", "*", "*.JPEG")))
  if len(paths) >= n:
    return [open(p, "rb").read() for p in paths[:n]]
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    h, w = rng.integers(40, 90, 2)  # both orientations, never square
    a = np.clip(rng.normal(120, 60, (h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(a).filter(ImageFilter.GaussianBlur(2))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    out.append(buf.getvalue())
  return out


def make_config(cache_dir, prepared: Prepared | None = None, **input_overrides):
  c = get_config("smoke")
  c.dataset.cache_dir = str(cache_dir)
  if prepared is not None:
    c.dataset.name, c.dataset.data_dir = prepared.name, prepared.data_dir
  c.input.resize_size, c.model.input_size = R, S
  c.input.num_parallel_calls = 2
  c.input.mean, c.input.pca_jitter, c.input.train_divisor = "none", False, 1.0
  c.input.random_crop, c.input.flip = False, False
  c.batch_size, c.eval_batch_size = 4, 4
  for k, v in input_overrides.items():
    c.input[k] = v
  return c


def crops_of(cache_dir, files: dict[str, bytes], labels: dict[str, int], folder) -> dict:
  """{centre crop bytes: (key, label)} of the given JPEGs, as the pipeline decodes them."""
  os.makedirs(folder, exist_ok=True)
  paths = []
  for key, data in files.items():
    paths.append(os.path.join(folder, key.replace("/", "_")))
    with open(paths[-1], "wb") as f:
      f.write(data)
  crops = ip.load_image_files_uint8(make_config(cache_dir), paths)
  table = {c.tobytes(): (k, labels[k]) for c, k in zip(crops, files, strict=True)}
  assert len(table) == len(files), "two source images decode to the same crop"
  return table


def tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def imagenet_manual_dir(root, train: dict[str, bytes], val: dict[str, bytes]) -> str:
  """ILSVRC2012_img_train.tar of per-wnid tars, and ILSVRC2012_img_val.tar, as released."""
  os.makedirs(root)
  with tarfile.open(os.path.join(root, "ILSVRC2012_img_train.tar"), "w") as outer:
    for wnid in WNIDS:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as t:
        for key, data in train.items():
          if key.startswith(wnid):
            tar_add(t, key, data)
      tar_add(outer, f"{wnid}.tar", inner.getvalue())
  with tarfile.open(os.path.join(root, "ILSVRC2012_img_val.tar"), "w") as t:
    for key, data in val.items():
      tar_add(t, key, data)
  return str(root)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  cache = root / "cache"
  pool = photos(sum(TINY_PER_CLASS.values()) * 3 + IMAGENET_TRAIN_PER_CLASS * 3
                + len(IMAGENET_VAL))
  out = {}

  # alexnet_tiny_tfds: a manual_dir tree, built by TFDS in both formats.
  files, labels = {"train": {}, "validation": {}}, {}
  for split, per in TINY_PER_CLASS.items():
    for label, cls in enumerate(TINY_CLASSES):
      for i in range(per):
        key = f"{split}/{cls}/{i}.jpg"
        files[split][key] = pool.pop()
        labels[key] = label
        path = root / "tiny_manual" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(files[split][key])
  tables = {s: crops_of(cache, f, labels, root / "ref" / s) for s, f in files.items()}
  for fmt in ("tfrecord", "array_record"):
    data_dir = str(root / f"tiny_{fmt}")
    AlexnetTinyTfds(data_dir=data_dir, file_format=fmt).download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=str(root / "tiny_manual"), num_shards=3))
    out[f"tiny-{fmt}"] = Prepared(
        TINY_NAME, data_dir, fmt, TINY_CLASSES, 24, 9, tables["train"], tables["validation"],
        tfds_order(data_dir, TINY_NAME, "train", files["train"]),
        tfds_order(data_dir, TINY_NAME, "validation", files["validation"]))

  # imagenet2012: fake tars; labels as they should be (train: the wnid of the inner tar;
  # validation: line k of TFDS's validation_labels.txt for ILSVRC2012_val_<k>.JPEG).
  tfds_dir = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012")
  wnids = open(os.path.join(tfds_dir, "labels.txt")).read().split()
  val_wnids = open(os.path.join(tfds_dir, "validation_labels.txt")).read().split()
  assert len(wnids) == 1000 and len(val_wnids) == 50_000
  train = {f"{w}_{i}.JPEG": pool.pop() for w in WNIDS for i in range(IMAGENET_TRAIN_PER_CLASS)}
  val = {f"ILSVRC2012_val_{k:08d}.JPEG": pool.pop() for k in IMAGENET_VAL}
  val[IMAGENET_BAD] = val[IMAGENET_BAD][: len(val[IMAGENET_BAD]) // 2]
  good_val = {k: v for k, v in val.items() if k != IMAGENET_BAD}
  ilabels = {k: wnids.index(k.split("_")[0]) for k in train}
  ilabels.update({k: wnids.index(val_wnids[int(k[15:23]) - 1]) for k in val})
  # The subset is one TFDS's own pairing (sorted names with lines 1, 2, ...) gets wrong.
  assert sum(val_wnids[i] != val_wnids[k - 1] for i, k in enumerate(IMAGENET_VAL)) >= 5
  manual = imagenet_manual_dir(root / "imagenet_manual", train, val)
  c = make_config(cache)
  c.dataset.name = "imagenet2012"
  c.dataset.data_dir, c.dataset.manual_dir = str(root / "imagenet_tfrecord"), manual
  with _no_network(), pytest.raises(sources.DatasetNotFoundError) as e:
    ip.dataset_info(c)
  message = str(e.value)
  # Build it exactly as the message says, and also with the array_record option it offers.
  command = next(line.strip() for line in message.splitlines()
                 if line.strip().startswith(sources.PREPARE_COMMAND))
  argv = shlex.split(command)[len(shlex.split(sources.PREPARE_COMMAND)):]
  assert prepare.main(argv) == 0
  ar_dir = str(root / "imagenet_array_record")
  assert prepare.main([a if not a.startswith("--data_dir=") else f"--data_dir={ar_dir}"
                       for a in argv] + ["--file_format=array_record"]) == 0
  itrain = crops_of(cache, train, ilabels, root / "ref" / "imagenet_train")
  ival = crops_of(cache, good_val, ilabels, root / "ref" / "imagenet_val")
  for fmt, data_dir in (("tfrecord", c.dataset.data_dir), ("array_record", ar_dir)):
    out[f"imagenet2012-{fmt}"] = Prepared(
        "imagenet2012", data_dir, fmt, tuple(wnids), len(train), len(val), itrain, ival,
        tfds_order(data_dir, "imagenet2012", "train", train),
        tfds_order(data_dir, "imagenet2012", "validation", val), (IMAGENET_BAD,))
  out["imagenet2012-message"] = (message, command, manual, c.dataset.data_dir)
  return out


DATASETS = ["tiny-tfrecord", "tiny-array_record", "imagenet2012-tfrecord",
            "imagenet2012-array_record"]


@pytest.fixture(params=DATASETS)
def ds(request, built) -> Prepared:
  return built[request.param]


def identify(batch, table, view=None):
  """(keys, labels) of a batch's images, looked up by exact content."""
  img = batch["image"] if view is None else batch["image"][:, view]
  assert np.array_equal(img, np.round(img))  # no mean, no jitter: decoded pixels
  found = [table[x.astype(np.uint8).tobytes()] for x in img]
  return [k for k, _ in found], [lab for _, lab in found]


def take(it, n):
  return [next(it) for _ in range(n)]


# ------------------------------------------------------------------ tests


def test_info_and_format_come_from_the_prepared_dataset(ds, tmp_path):
  c = make_config(tmp_path, ds)
  info = ip.dataset_info(c)
  assert info.class_names == ds.class_names and info.num_classes == len(ds.class_names)
  assert (info.num_train, info.num_eval) == (ds.num_train, ds.num_eval)
  shards = glob.glob(os.path.join(ds.data_dir, ds.name, "*", f"*-train.{ds.file_format}-*"))
  assert len(shards) == (1 if ds.name == "imagenet2012" else 3)  # tiny: shards concatenate
  if ds.name == "imagenet2012":
    assert info.class_names[0] == "n01440764" and info.num_classes == 1000


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_counts_every_example_once(ds, tmp_path, process_count):
  c = make_config(tmp_path, ds)  # eval_batch_size 4 divides neither 9 nor 7
  ten_crop = process_count == 2  # centre crops alone, then all ten views
  outs, logs = [], []
  for p in range(process_count):
    logs.append(ip.BadImageLog())
    outs.append(list(ip.eval_batches(c, ten_crop=ten_crop, process_index=p,
                                     process_count=process_count, bad_images=logs[-1])))
  assert len({len(o) for o in outs}) == 1  # every process yields the same number of batches
  seen = []  # split order: global batch k is process 0's part, then process 1's
  for step in range(len(outs[0])):
    for o in outs:
      b = o[step]
      n = 4 // process_count
      shape = (n, 10, S, S, 3) if ten_crop else (n, S, S, 3)
      assert b["image"].shape == shape and b["image"].dtype == np.float32
      assert b["label"].dtype == np.int32 and b["mask"].dtype == bool
      keys, labels = identify({"image": b["image"][b["mask"]]}, ds.eval,
                              view=4 if ten_crop else None)  # view 4: the centre crop
      np.testing.assert_array_equal(b["label"][b["mask"]], labels)
      keys = iter(keys)
      seen += [next(keys) if m else None for m in b["mask"]]
  # Each good example once, at its index in the split; bad ones and padding masked out.
  bad = {k for k in ds.eval_order if k in ds.bad_eval}
  want = [None if k in bad else k for k in ds.eval_order]
  assert seen == want + [None] * (len(seen) - len(want)) and len(seen) - len(want) < 4
  bad = [p for log in logs for p in log.paths]
  assert len(bad) == len(ds.bad_eval)
  for name, path in zip(ds.bad_eval, sorted(bad), strict=True):
    # The report names the record and, where TFDS stored it, the original file.
    assert path.startswith(f"{ds.name}/validation[") and path.endswith(name)


def test_train_stream_labels_and_process_shares(ds, tmp_path):
  c = make_config(tmp_path, ds)
  spe = ip.steps_per_epoch(c, ip.dataset_info(c))
  single = take(ip.train_batches(c), spe)
  keys = []
  for b in single:
    assert b["image"].shape == (4, S, S, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32
    k, labels = identify(b, ds.train)
    np.testing.assert_array_equal(b["label"], labels)
    keys += k
  assert sorted(keys) == sorted(k for k, _ in ds.train.values())  # the epoch: each once
  # Example i is record i of the split as TFDS reads it; the epoch visits the permutation.
  plan = pipeline.train_epoch_indices(c.seed, 0, ds.num_train, 4, 0, 1)
  assert keys == [ds.train_order[i] for i in plan]
  shares = [take(ip.train_batches(c, process_index=p, process_count=2), spe) for p in (0, 1)]
  mine = [[k for b in s for k in identify(b, ds.train)[0]] for s in shares]
  assert not set(mine[0]) & set(mine[1]) and sorted(mine[0] + mine[1]) == sorted(keys)
  for step in range(spe):  # the same global batch as one process reads
    glued = np.concatenate([s[step]["image"] for s in shares])
    np.testing.assert_array_equal(glued, single[step]["image"])


# The tiny dataset in both formats: its 3 shards a split are the harder case of each
# format's reader; imagenet2012's single shard runs the same code (its records, labels
# and file names are read by test_train_stream_labels_and_process_shares).
@pytest.mark.parametrize("name", ["tiny-tfrecord", "tiny-array_record"])
def test_resume_equals_uninterrupted_stream(built, name, tmp_path):
  # Full augmentation, and per-pixel mean and PCA statistics computed from the dataset.
  ds = built[name]
  c = make_config(tmp_path, ds, mean="per_pixel", pca_jitter=True, stats="computed",
                  stats_max_images=0, random_crop=True, flip=True)
  spe = ip.steps_per_epoch(c, ip.dataset_info(c))
  assert ip.statistics(c).num_images == ds.num_train
  full = take(ip.train_batches(c), spe + 2)
  for k in (2, spe):  # mid-epoch; exactly at the epoch boundary
    resumed = take(ip.train_batches(c, start_step=k), spe + 2 - k)
    for a, b in zip(full[k:], resumed, strict=True):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])


def test_not_prepared_error_gives_the_command_that_prepares_it(built, tmp_path):
  message, command, manual, data_dir = built["imagenet2012-message"]  # (no network used)
  for part in (f"the tars are in {manual}", f"--manual_dir={manual}",
               f"--data_dir={data_dir}", "config.dataset.data_dir", "array_record"):
    assert part in message
  assert command.startswith(f"{sources.PREPARE_COMMAND} imagenet2012 ")
  # (The fixture ran that command; the tests above read what it built.)

  with _no_network():  # fails fast: every error below comes from files on disk
    c = make_config(tmp_path)
    c.dataset.name, c.dataset.data_dir = "imagenet2012", str(tmp_path / "elsewhere")
    c.dataset.manual_dir = str(tmp_path / "no tars here")
    with pytest.raises(sources.DatasetNotFoundError) as e:
      ip.dataset_info(c)
    for part in (*sources.IMAGENET_TARS, "config.dataset.manual_dir",
                 shlex.quote(c.dataset.manual_dir)):  # a path with a space, quoted
      assert part in str(e.value)
    # A dataset name TFDS does not know, and not prepared in data_dir: one short line.
    c.dataset.name = "alexnet_no_such_dataset"
    with pytest.raises(sources.DatasetNotFoundError, match="config.dataset.data_dir") as e:
      ip.dataset_info(c)
    assert len(str(e.value)) < 500
    with pytest.raises(sources.DatasetNotFoundError):
      next(ip.train_batches(c))  # (however lazily the stream starts)
    # Another version prepared: the message says how to read it.
    shutil.copytree(os.path.join(data_dir, "imagenet2012", "5.1.0"),
                    tmp_path / "old" / "imagenet2012" / "5.0.0")
    c.dataset.name, c.dataset.data_dir = "imagenet2012", str(tmp_path / "old")
    with pytest.raises(sources.DatasetNotFoundError, match="'imagenet2012:5.0.0'"):
      ip.dataset_info(c)
  # The prepare command refuses to build imagenet2012 without its tars.
  assert prepare.main(["imagenet2012", f"--data_dir={tmp_path / 'x'}",
                       f"--manual_dir={tmp_path}"]) == 2


def test_a_validation_tar_without_official_names_is_refused(tmp_path, capsys):
  # As users rename or re-export files: TFDS alone would label them by sorted position.
  jpeg = photos(1)[0]
  val = {"ILSVRC2012_val_00000001.JPEG": jpeg, "val_00000293.jpg": jpeg,
         "ILSVRC2012_val_00050001.JPEG": jpeg}  # the last: no line 50,001 in the list
  manual = imagenet_manual_dir(tmp_path / "manual", {f"{WNIDS[0]}_0.JPEG": jpeg}, val)
  data_dir = tmp_path / "data"
  assert prepare.main(["imagenet2012", f"--manual_dir={manual}", f"--data_dir={data_dir}"]) == 2
  err = capsys.readouterr().err
  for part in ("ILSVRC2012_img_val.tar", "2 of its 3 files", "'val_00000293.jpg'",
               "'ILSVRC2012_val_00050001.JPEG'", "ILSVRC2012_val_NNNNNNNN.JPEG", "00050000"):
    assert part in err
  # Refused before anything was written: the train split is not built first.
  assert not glob.glob(str(data_dir / "imagenet2012" / "*" / "*.tfrecord*"))
  assert not glob.glob(str(data_dir / "imagenet2012" / "*" / "dataset_info.json"))


def test_validation_labels_by_file_name_read_the_official_list():
  lines = [f"n{i:08d}" for i in range(1, 50_001)]
  names = ["ILSVRC2012_val_00000293.JPEG", "val/ILSVRC2012_val_00000001.JPEG"]
  assert prepare.validation_labels_by_file_name(names, lines, "v.tar") == {
      names[0]: "n00000293", names[1]: "n00000001"}
  with pytest.raises(prepare.PrepareError, match="0 of its 0 files"):
    prepare.validation_labels_by_file_name([], lines, "v.tar")  # an empty tar


@pytest.mark.parametrize("fmt", ["tfrecord", "array_record"])
def test_a_bad_training_record_is_substituted_and_named(built, tmp_path, fmt):
  # The imagenet2012 validation split as training data: it holds a truncated JPEG, so the
  # substitute loop reads records through the source's reader inside a tf.while_loop.
  ds = built[f"imagenet2012-{fmt}"]
  c = make_config(tmp_path, ds)
  c.dataset.train_split, c.batch_size = "validation", ds.num_eval  # one batch: all of it
  log = ip.BadImageLog()
  (batch,) = take(ip.train_batches(c, bad_images=log), 1)
  keys, labels = identify(batch, ds.eval)  # every image a good example's, with its label
  np.testing.assert_array_equal(batch["label"], labels)
  assert set(ds.eval_order) - set(keys) == {IMAGENET_BAD} and len(keys) == ds.num_eval
  (path,) = log.paths
  assert path.startswith("imagenet2012/validation[") and path.endswith(IMAGENET_BAD)


def test_tfrecord_index_is_cached_and_a_truncated_shard_is_named(built, tmp_path):
  ds = built["tiny-tfrecord"]
  c = make_config(tmp_path, ds)
  sources.get_source(c).loader("train")
  cached = glob.glob(str(tmp_path / "tfrecord_index" / "*.npz"))
  assert len(cached) == 1
  mtime = os.path.getmtime(cached[0])
  sources.get_source(c).loader("train")  # reads the cached index, writes nothing
  assert glob.glob(str(tmp_path / "tfrecord_index" / "*.npz")) == cached
  assert os.path.getmtime(cached[0]) == mtime

  copy = tmp_path / "copy"
  shutil.copytree(ds.data_dir, copy)
  shard = sorted(glob.glob(str(copy / TINY_NAME / "1.0.0" / "*train.tfrecord*")))[1]
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) - 100)
  c.dataset.data_dir = str(copy)
  assert ip.dataset_info(c).num_train == ds.num_train  # metadata alone is fine
  with pytest.raises(sources.DatasetNotFoundError, match=f"{shard} is truncated"):
    next(ip.train_batches(c))
