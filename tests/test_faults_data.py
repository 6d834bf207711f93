"""Data faults: every kind of bad file in training, statistics, evaluation and prediction is
skipped and named with its reason, resume stays bit-exact around them, huge images decode
in bounded memory, the statistics cache follows the files, demo generation survives a
kill, and evaluation's memory does not grow with the set. Real files (PIL-made JPEGs and
PNGs in tmp_path), no mocks; the end-to-end test runs train, eval and predict through
cli.run (what main.py calls) in this process, and the killed writer is a real process.

Unreadable files: the tests run as root, for whom chmod 000 does not stop a read, so they
use entries no one can read as an image: a directory named x.JPEG, a dangling symlink and
a symlink loop (plus a chmod 000 file when not root).

  .venv/bin/python -m pytest -q tests/test_faults_data.py
"""

import ctypes
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from alexnet_jax import cli
from alexnet_jax import data as ip
from alexnet_jax.data import decode, demo, pipeline, sources
from alexnet_jax.data._tf import tf
from conftest import SMOKE_GEOMETRY
from experiments.alexnet import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests' pixel limit: the 20000 x 20000 JPEG decodes (at 1/8 scale: 2500 x 2500), a
# 2600 x 2500 PNG (flat, so its file is small) does not.
SMALL_MAX_PIXELS = 2500 * 2500


# ------------------------------------------------------------------ files


def jpeg_bytes(seed: int, size=(72, 56), **kw) -> bytes:
  """A smooth random-colour JPEG (like a photo, not noise), `size` = (width, height)."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(small).resize(size, Image.BILINEAR).save(buf, "JPEG", quality=90, **kw)
  return buf.getvalue()


def png_bytes(size, colour=(10, 200, 30)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, colour).save(buf, "PNG")
  return buf.getvalue()


def flat_grey_jpeg(width: int, height: int) -> bytes:
  """A real baseline greyscale JPEG of width x height pixels, all 128, in ~width*height/85
  bytes, made without a width x height array: PIL's headers for a 16 x 16 grey image, the
  dimensions patched, and the scan repeated (with the standard tables each all-zero 8 x 8
  block is 6 bits, 00 1010: four blocks are the 3 bytes 28 a2 8a)."""
  buf = io.BytesIO()
  Image.new("L", (16, 16), 128).save(buf, "JPEG", quality=75)
  b = buf.getvalue()
  sof, sos = b.index(b"\xff\xc0"), b.index(b"\xff\xda")
  head = bytearray(b[:sos + 2 + int.from_bytes(b[sos + 2:sos + 4], "big")])
  assert b[len(head):-2] == b"\x28\xa2\x8a"  # the 4 blocks of the 16 x 16 image
  head[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
  blocks = -(-width // 8) * -(-height // 8)
  assert blocks % 4 == 0
  return bytes(head) + b"\x28\xa2\x8a" * (blocks // 4) + b"\xff\xd9"


def corrupt_jpeg() -> bytes:
  """A JPEG header, junk bytes and an end marker: passes the cheap check (JPEG magic,
  EOI at the end), fails in the decoder."""
  junk = np.random.default_rng(7).integers(0, 255, 600, dtype=np.uint8).tobytes()
  return jpeg_bytes(0)[:20] + junk + b"\xff\xd9"


# Each bad entry: name -> (how to make it at a path, a word its reason must contain).
def _write(data):
  return lambda p: p.write_bytes(data)


BAD = {
    "corrupt_middle.JPEG": (_write(corrupt_jpeg()), "corrupt JPEG"),
    "truncated.JPEG": (_write(jpeg_bytes(1)[:300]), "truncated"),
    "empty.JPEG": (_write(b""), "empty"),
    "text.JPEG": (_write(b"this is not an image, but its name says JPEG\n" * 3),
                  "not a JPEG or PNG"),
    "gif.JPEG": (_write(b"GIF89a" + b"\x00" * 64), "not a JPEG or PNG"),
    "dir.JPEG": (lambda p: p.mkdir(), "Is a directory"),
    "dangling.JPEG": (lambda p: os.symlink(p.parent / "nowhere.JPEG", p), "dangling symlink"),
    "loop_a.JPEG": (lambda p: os.symlink(p.parent / "loop_b.JPEG", p),
                    "Too many levels of symbolic links"),
    "loop_b.JPEG": (lambda p: os.symlink(p.parent / "loop_a.JPEG", p),
                    "Too many levels of symbolic links"),
    "big.png": (_write(png_bytes((2600, 2500))), "too large"),  # over SMALL_MAX_PIXELS
}
if os.geteuid() != 0:  # as root, chmod 000 does not stop a read
  BAD["no_permission.JPEG"] = (lambda p: (p.write_bytes(jpeg_bytes(2)), p.chmod(0)),
                               "Permission denied")


def make_tree(root, classes=4, train_per_class=3, val_per_class=3, bad_in=("c1",)):
  """root/{train,val}/c<k>/: good JPEGs, and in class folders `bad_in` every BAD entry
  plus the good odd ones: a 1x1 JPEG, a 1x1 PNG and a 20000 x 20000 JPEG (train only: it
  takes a second to decode). Returns {split: (good paths, bad paths)}."""
  out = {}
  for split, per_class in (("train", train_per_class), ("val", val_per_class)):
    good, bad = [], []
    for c in range(classes):
      d = root / split / f"c{c}"
      d.mkdir(parents=True)
      for i in range(per_class):
        (d / f"{i:02d}.JPEG").write_bytes(jpeg_bytes(100 * c + i + (1000 if split == "val" else 0)))
        good.append(str(d / f"{i:02d}.JPEG"))
      if f"c{c}" in bad_in:
        for name, (make, _) in BAD.items():
          make(d / name)
          bad.append(str(d / name))
        (d / "tiny1.JPEG").write_bytes(jpeg_bytes(5, size=(1, 1)))
        (d / "tiny1.png").write_bytes(png_bytes((1, 1)))
        good += [str(d / "tiny1.JPEG"), str(d / "tiny1.png")]
        if split == "train":
          (d / "huge.JPEG").write_bytes(flat_grey_jpeg(20000, 20000))
          good.append(str(d / "huge.JPEG"))
    out[split] = (good, bad)
  return out


def make_config(tmp_path, root, **input_overrides):
  c = get_config("smoke")
  c.dataset.name = "image_folder"
  c.dataset.image_folder = str(root)
  c.dataset.cache_dir = str(tmp_path / "cache")
  c.model.num_classes = 4
  c.model.input_size = 56
  c.input.resize_size = 64
  c.input.max_decode_pixels = SMALL_MAX_PIXELS
  c.input.num_parallel_calls = 2
  for k, v in input_overrides.items():
    c.input[k] = v
  return c


def assert_named(log, bad_paths):
  """Every bad file, and only those, named in the log with the reason BAD says."""
  assert sorted(log.paths) == sorted(bad_paths)
  for p in bad_paths:
    assert BAD[os.path.basename(p)][1] in log.reasons[p], (p, log.reasons[p])


# ------------------------------------------------------------------ pipeline level


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("faults") / "tree"
  return root, make_tree(root)


def test_every_bad_file_is_skipped_and_named_in_eval_stats_and_predict(tree, tmp_path):
  root, files = tree
  c = make_config(tmp_path, root, stats="computed", mean="per_pixel")
  c.eval_batch_size = 4
  val_good, val_bad = files["val"]
  info = ip.dataset_info(c)
  assert info.num_eval == len(val_good) + len(val_bad)  # listed by name, skipped when read

  # Statistics: over the good training files only; each bad one named with its reason.
  stats = ip.statistics(c)
  assert stats.num_images == len(files["train"][0])

  # Evaluation: masked out (so the skipped count is known) and named.
  log = ip.BadImageLog()
  batches = list(ip.eval_batches(c, ten_crop=True, bad_images=log, stats=stats))
  assert sum(int(b["mask"].sum()) for b in batches) == len(val_good)
  assert_named(log, val_bad)
  assert log.count == len(val_bad)  # each once, although failing batches are read twice
  # The good odd files decode: 1x1 images upscale to one colour.
  tiny = ip.load_image_files_uint8(c, [p for p in val_good if "tiny1" in p])
  assert tiny.shape == (2, 56, 56, 3) and all(len(np.unique(t.reshape(-1, 3), axis=0)) == 1
                                              for t in tiny)
  np.testing.assert_array_equal(tiny[1, 0, 0], (10, 200, 30))

  # Prediction: skipped and named with a log, an error naming the file and why without.
  paths = [val_good[0], *val_bad]
  log = ip.BadImageLog()
  x = ip.preprocess_image_files(c, paths, stats=stats, bad_images=log)
  assert x.shape[0] == len(paths) and np.abs(x[0]).sum() > 0
  assert_named(log, val_bad)
  with pytest.raises(ip.BadImageError, match="corrupt_middle.JPEG: corrupt JPEG"):
    ip.load_image_files_uint8(c, [val_good[0], paths[1]])


@pytest.mark.slow
def test_training_substitutes_every_bad_file_and_resumes_bit_exactly(tree, tmp_path):
  """A file only the decoder finds bad (corrupt inside) is substituted like the others,
  not dropped: the stream read fast (with re-reads of failing batches), one resumed at
  any step and one read all carefully are the same, byte for byte."""
  root, files = tree
  c = make_config(tmp_path, root, stats="published", mean="published")
  c.batch_size = 8
  spe = ip.steps_per_epoch(c, ip.dataset_info(c))
  steps = spe + 2  # into the second epoch
  log = ip.BadImageLog()
  full = [next(it) for it in [ip.train_batches(c, bad_images=log)] for _ in range(steps)]
  assert all(b["image"].shape[0] == 8 for b in full)
  assert_named(log, files["train"][1])
  careful = pipeline.train_dataset(c, careful=True, bad_images=ip.BadImageLog())
  for want, got in zip(full, careful.take(steps).as_numpy_iterator(), strict=True):
    np.testing.assert_array_equal(want["image"], got["image"])
    np.testing.assert_array_equal(want["label"], got["label"])
  # Resumed with the bad files known (skipped unopened) and found afresh.
  for start, resume_log in ((1, log), (spe - 1, log), (spe + 1, ip.BadImageLog())):
    resumed = ip.train_batches(c, start_step=start, bad_images=resume_log)
    for k in range(start, steps):
      got = next(resumed)
      np.testing.assert_array_equal(full[k]["image"], got["image"])
      np.testing.assert_array_equal(full[k]["label"], got["label"])
  c.input.on_bad_image = "error"
  with pytest.raises(ip.BadImageError, match="cannot use image .*JPEG|png: "):
    [next(it) for it in [ip.train_batches(c)] for _ in range(steps)]


def test_huge_jpeg_decodes_at_reduced_scale():
  data = flat_grey_jpeg(20000, 20000)
  assert decode.jpeg_ratio(20000, 256) == 8 and decode.jpeg_ratio(511, 256) == 1
  assert decode.decoded_square_side(20000, 30000, True, 256) == 2500
  img = decode.decode_centre_square(tf.constant(data), 64, max_pixels=2500 ** 2)
  np.testing.assert_array_equal(img.numpy(), np.full((64, 64, 3), 128, np.uint8))
  # One step under the limit is too large: the limit applies to the reduced decode.
  with pytest.raises(tf.errors.InvalidArgumentError, match="too large"):
    decode.decode_centre_square(tf.constant(data), 64, max_pixels=2500 ** 2 - 1)
  assert "too large" in decode.diagnose("huge.JPEG", data, 64, 2500 ** 2 - 1)
  # Large real JPEGs decoded at 1/2 scale stay close to the full decode.
  photo = jpeg_bytes(3, size=(700, 560))
  full = tf.image.resize(tf.cast(tf.io.decode_jpeg(photo, channels=3), tf.float32)[:, 70:630],
                         [256, 256]).numpy()
  assert np.abs(decode.decode_centre_square_float(tf.constant(photo), 256).numpy()
                - full).mean() < 2.0


def test_class_folders_empty_missing_or_unknown(tmp_path, caplog):
  root = tmp_path / "t"
  make_tree(root, bad_in=())
  c = make_config(tmp_path, root)
  (root / "train" / "c4").mkdir()
  (root / "train" / "c4" / "notes.txt").write_text("no images here")
  with pytest.raises(sources.DatasetNotFoundError, match="c4.*cannot be learned"):
    ip.dataset_info(c)
  (root / "train" / "c4" / "0.JPEG").write_bytes(jpeg_bytes(9))
  (root / "val" / "c4").mkdir()  # empty in validation: a warning
  sources._list_files.cache_clear()
  info = ip.dataset_info(c)
  assert info.num_classes == 5 and "evaluation has no examples" in caplog.text
  (root / "train" / ".hidden").mkdir()  # hidden folders are no classes
  assert ip.dataset_info(c).num_classes == 5


def test_class_names_let_an_image_folder_have_only_val(tmp_path):
  root = tmp_path / "t"
  make_tree(root, bad_in=())
  c = make_config(tmp_path, root, stats="published", mean="published")
  c.eval_batch_size = 4
  names = list(ip.dataset_info(c).class_names)
  os.rename(root / "train", tmp_path / "train_elsewhere")
  sources._list_files.cache_clear()  # the listing is cached per process
  with pytest.raises(sources.DatasetNotFoundError, match="train_split"):
    ip.dataset_info(c)
  info = ip.dataset_info(c, class_names=names)
  assert (info.num_train, info.num_eval, list(info.class_names)) == (0, 12, names)
  batches = list(ip.eval_batches(c, ten_crop=False, class_names=names))
  assert sum(int(b["mask"].sum()) for b in batches) == 12
  with pytest.raises(sources.DatasetNotFoundError, match=r"not among the 2 classes.*'c2'"):
    ip.dataset_info(c, class_names=names[:2])


def test_statistics_cache_follows_the_sampled_files(tmp_path):
  root = tmp_path / "t"
  make_tree(root, bad_in=())
  c = make_config(tmp_path, root)
  first = ip.statistics(c)
  cache = tmp_path / "cache" / "stats"
  assert len(list(cache.glob("*.npz"))) == 1
  ip.statistics(c)
  assert len(list(cache.glob("*.npz"))) == 1  # reused
  new = root / "train" / "c0" / "99.JPEG"
  new.write_bytes(png_bytes((64, 64), (255, 255, 255)))
  sources._list_files.cache_clear()  # the listing is cached per process
  added = ip.statistics(c)
  assert len(list(cache.glob("*.npz"))) == 2 and added.num_images == first.num_images + 1
  assert added.mean_rgb[0] > first.mean_rgb[0]
  new.write_bytes(png_bytes((64, 64), (0, 0, 0)))  # same path, new content
  os.utime(new, ns=(1, 1))
  replaced = ip.statistics(c)
  assert len(list(cache.glob("*.npz"))) == 3 and replaced.mean_rgb[0] < added.mean_rgb[0]


def test_killed_demo_generation_leaves_no_orphan(tmp_path):
  """A writer killed mid-generation leaves its temporary tree; the next generation (any
  size) removes it, since its pid is dead, and writes a complete tree."""
  cache = tmp_path / "cache"
  cache.mkdir()
  writer = subprocess.Popen(
      [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
       "from alexnet_jax.data import demo; from experiments.alexnet import get_config; "
       "c = get_config('smoke'); c.dataset.cache_dir = sys.argv[2]; "
       "c.dataset.demo_train_per_class = 100000; demo.ensure_demo_tree(c)", ROOT, str(cache)],
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  try:
    for _ in range(1200):  # until it has written some files (or at most ~2 minutes)
      tmp = [p for p in cache.iterdir() if p.name.startswith(".tmp-demo-")]
      if tmp and any(True for _ in tmp[0].rglob("*.JPEG")):
        break
      assert writer.poll() is None, "the writer ended before writing anything"
      time.sleep(0.1)
    else:
      pytest.fail("the writer wrote nothing")
  finally:
    writer.send_signal(signal.SIGKILL)
    writer.wait()
  assert f"-{writer.pid}-" in tmp[0].name
  c = get_config("smoke")
  c.dataset.cache_dir = str(cache)
  root = demo.ensure_demo_tree(c)
  assert not tmp[0].exists()
  assert sorted(p.name for p in cache.iterdir()) == [os.path.basename(root)]
  assert len(list((cache / root).rglob("*.JPEG"))) == 10 * (8 + 4)


# ------------------------------------------------------------------ memory


def _status_mb(field: str) -> float:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _reset_peak_rss() -> float:
  """Returns freed heap to the system and resets this process's peak RSS (VmHWM) to its
  current RSS (Linux's clear_refs "5"); returns that RSS in MB. The peak of what runs
  next, measured in this process, is then `_status_mb("VmHWM")`."""
  if not os.path.exists("/proc/self/clear_refs"):
    pytest.skip("no /proc/self/clear_refs (Linux >= 4.0): peak RSS cannot be reset")
  ctypes.CDLL(None).malloc_trim(0)  # glibc: free()d arenas back to the kernel
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  return _status_mb("VmRSS")


def _hold_until_rss_settles(still_s=2.0, limit_s=60.0) -> None:
  """Waits (holding the consumer) until this process's RSS has not grown for still_s:
  a pipeline reading ahead has then filled whatever buffers it has."""
  start = since = time.monotonic()
  last = _status_mb("VmRSS")
  while time.monotonic() - since < still_s and time.monotonic() - start < limit_s:
    time.sleep(0.1)
    if (rss := _status_mb("VmRSS")) > last + 5:
      last, since = rss, time.monotonic()


def test_evaluation_memory_does_not_grow_with_the_set(tmp_path):
  """Peak RSS of ten-crop evaluation batches on a one-batch set and then a 12-batch set,
  the consumer holding the first batch until the pipeline's read-ahead is full (RSS
  settled): the larger set may add the read-ahead (host_prefetch batches) and the batch
  in the making, no more. Measured in this process, the peak reset before each set (the
  smaller set first: memory it leaves for reuse can only shrink the larger set's growth
  by what the smaller one used, as in a fresh process). Before the bound, 100 vs 1,000
  images (batch 100) measured 1.5 vs 4.8 GB; see benchmarks/eval_memory.py for the
  figures at other sizes (in fresh processes)."""
  from benchmarks.eval_memory import make_tree as make_eval_tree

  batch = 32
  batch_mb = batch * 10 * 224 * 224 * 3 * 4 / 2**20  # a ten-crop float32 batch
  peaks = []
  for n in (batch, 12 * batch):
    root = make_eval_tree(str(tmp_path / f"set{n}"), n, None, size=(64, 48))
    c = get_config("smoke")  # as benchmarks/eval_memory.py's pipeline worker
    c.dataset.name, c.dataset.image_folder = "image_folder", root
    c.dataset.cache_dir = os.path.join(root, "cache")
    c.model.input_size, c.eval_batch_size, c.input.stats = 224, batch, "published"
    _reset_peak_rss()
    seen = 0
    for k, b in enumerate(ip.eval_batches(c, ten_crop=True)):
      seen += int(b["mask"].sum())
      if k == 0:
        _hold_until_rss_settles()
    peaks.append(_status_mb("VmHWM"))
    assert seen == n
  host_prefetch = get_config().input.host_prefetch
  print(f"peak RSS {peaks[0]:.0f} MB ({batch} images), {peaks[1]:.0f} MB ({12 * batch})")
  assert peaks[1] - peaks[0] < (host_prefetch + 1) * batch_mb


# ------------------------------------------------------------------ end to end


def _e2e_config(root, cache, **overrides):
  """The smoke run on the tree, on one device, at a small geometry (not under test)."""
  c = get_config("smoke")
  c.update_from_flattened_dict({
      "dataset.name": "image_folder", "dataset.image_folder": str(root),
      "dataset.cache_dir": str(cache), "model.num_classes": 4, **SMOKE_GEOMETRY,
      "batch_size": 4, "eval_batch_size": 4,
      "input.max_decode_pixels": SMALL_MAX_PIXELS, "mesh.data": 1, "mesh.model": 1,
      **overrides})
  return c


@pytest.mark.slow
def test_main_trains_evaluates_and_predicts_through_bad_files(tree, tmp_path, capsys, caplog):
  """cli.run (what main.py calls), in this process: statistics, training, its
  evaluation, --mode=eval and --mode=predict all finish (exit 0) with bad files in both
  splits, name each one with its reason, and report how many evaluation files were
  skipped; predicting the 20000 x 20000 JPEG stays in bounded memory."""
  root, files = tree
  workdir, cache = tmp_path / "run", tmp_path / "cache"
  caplog.set_level("INFO")

  def run(mode, images=(), **overrides):
    capsys.readouterr()
    caplog.clear()
    code = cli.run(mode, _e2e_config(root, cache, **overrides), str(workdir), images=images)
    out = capsys.readouterr()
    text = out.out + out.err + caplog.text
    assert code == 0, text[-3000:]
    return text

  out = run("train", eval_ten_crop=False)
  for path in files["train"][1] + files["val"][1]:
    reason = BAD[os.path.basename(path)][1]
    assert f"skipping {path}: " in out and reason in out.split(f"skipping {path}: ")[1][:200]
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["num_skipped"] == len(files["val"][1])
  assert final["num_examples"] == len(files["val"][0])

  out = run("eval")
  (report,) = [json.loads(p.read_text()) for p in (workdir / "eval").glob("*.json")]
  assert report["num_skipped"] == len(files["val"][1])
  assert sorted(r["path"] for r in report["skipped_files"]) == sorted(files["val"][1])
  assert f"({len(files['val'][1])} skipped)" in out

  huge = next(p for p in files["train"][0] if p.endswith("huge.JPEG"))
  images = [files["val"][0][0], huge, *files["val"][1][:4]]
  before = _reset_peak_rss()
  out = run("predict", images=images)
  grown = _status_mb("VmHWM") - before
  for path in images[2:]:
    assert f"{path}\n  skipped: " in out
  assert out.count("%  c") == 2 * 4  # top-5 of the 4 classes for the two good images
  # The 20000 x 20000 JPEG decodes at 1/8 scale (19 MB). Decoded whole it is 1.2 GB, and
  # the float32 input of its resize 4.8 GB more. (In a fresh main.py process the whole
  # predict peaked at ~0.95 GB; here the process is warm, so its growth is measured.)
  print(f"predict: peak RSS {grown:.0f} MB over the {before:.0f} MB before it")
  assert grown < 1000, grown
