"""Tests of the input pipeline (alexnet_jax.data) on tiny trees built in tmp_path."""

import glob
import importlib.util
import os
import shutil

import numpy as np
import pytest
from PIL import Image, ImageFilter

from alexnet_jax import data as ip
from alexnet_jax.data import augment, decode, pipeline, sources, square_cache
from alexnet_jax.data import stats as stats_lib
from alexnet_jax.data._tf import tf
from experiments.alexnet import get_config

SHARED = "/work/shared/data"
ODD = os.path.join(SHARED, "odd-images")
TINY = os.path.join(SHARED, "imagenet-tiny")
R, S = 256, 224


def make_config(tmp_path, root=None, **input_overrides):
  c = get_config("smoke")
  c.dataset.cache_dir = str(tmp_path / "cache")
  if root is not None:
    c.dataset.name = "image_folder"
    c.dataset.image_folder = str(root)
  c.model.input_size = S
  c.input.num_parallel_calls = 2
  for k, v in input_overrides.items():
    c.input[k] = v
  return c


def plain(c):
  """No mean, no colour jitter, no divisor: pixels come out as decoded."""
  c.input.mean = "none"
  c.input.pca_jitter = False
  c.input.train_divisor = 1.0
  return c


def coord_image(ident: int) -> np.ndarray:
  """256x256 image whose R = x, G = y, B = ident: every crop reveals where it came from."""
  y, x = np.mgrid[0:R, 0:R]
  return np.stack([x, y, np.full_like(x, ident)], -1).astype(np.uint8)


def coord_tree(root, classes=3, train_per_class=8, val_per_class=4):
  """PNG (lossless) tree; ids 0.. in train, 100.. in val, identifying each file."""
  ident = {"train": 0, "val": 100}
  for split, per in (("train", train_per_class), ("val", val_per_class)):
    for c in range(classes):
      d = root / split / f"class{c}"
      d.mkdir(parents=True)
      for i in range(per):
        Image.fromarray(coord_image(ident[split])).save(d / f"{i:03d}.png")
        ident[split] += 1
  return root


def ids(batch):
  """The B channel (= file id) of each example's crop(s)."""
  img = batch["image"]
  return img.reshape(img.shape[0], -1, 3)[:, 0, 2].astype(int)


def take(it, n):
  return [next(it) for _ in range(n)]


# ------------------------------------------------------------------ geometry


def test_ten_crops_offsets_and_flips(tmp_path):
  c = plain(make_config(tmp_path, coord_tree(tmp_path / "t")))
  c.eval_batch_size = 4
  full = coord_image(0).astype(np.float32)
  batch = next(ip.eval_batches(c, ten_crop=True))
  assert batch["image"].shape == (4, 10, S, S, 3) and batch["image"].dtype == np.float32
  offsets = augment.ten_crop_offsets(R, S)
  assert offsets == [(0, 0), (0, 32), (32, 0), (32, 32), (16, 16)]
  for k, (oy, ox) in enumerate(offsets):
    want = full[oy:oy + S, ox:ox + S, :2]
    np.testing.assert_array_equal(batch["image"][0, k, ..., :2], want)
    np.testing.assert_array_equal(batch["image"][0, 5 + k, ..., :2], want[:, ::-1])
  centre = next(ip.eval_batches(c, ten_crop=False))
  assert centre["image"].shape == (4, S, S, 3)
  np.testing.assert_array_equal(centre["image"][0, ..., :2], full[16:16 + S, 16:16 + S, :2])


def test_random_crops_cover_range_and_flip_half(tmp_path):
  c = plain(make_config(tmp_path, coord_tree(tmp_path / "t")))
  c.batch_size = 24
  oys, oxs, flips = [], [], []
  for batch in take(ip.train_batches(c), 20):
    for img in batch["image"]:
      flipped = img[0, 1, 0] < img[0, 0, 0]
      ox, oy = int(min(img[0, 0, 0], img[0, -1, 0])), int(img[0, 0, 1])
      want = coord_image(0)[oy:oy + S, ox:ox + S, :2].astype(np.float32)
      np.testing.assert_array_equal(img[..., :2], want[:, ::-1] if flipped else want)
      oys.append(oy), oxs.append(ox), flips.append(flipped)
  assert min(oys) == min(oxs) == 0 and max(oys) == max(oxs) == R - S
  assert set(oys) == set(range(R - S + 1))
  assert abs(np.mean(flips) - 0.5) < 0.1  # 480 draws: 4.4 standard deviations


@pytest.mark.parametrize("scale", ["eigenvalues", "sqrt"])
def test_pca_jitter_statistics(scale):
  rng = np.random.default_rng(0)
  eigvecs, _ = np.linalg.qr(rng.normal(size=(3, 3)))
  eigvals = np.array([9000.0, 900.0, 90.0])
  a = augment.AugmentConfig(R, S, True, True, True, 0.1, scale, 1.0)
  n = 20_000

  def offset(i):
    _, _, _, alpha = augment.augment_params(augment.example_seed(7, 3, i), a)
    return augment.pca_offset(alpha, eigvals, eigvecs, scale)

  x = next(iter(tf.data.Dataset.range(n).map(offset).batch(n))).numpy().astype(np.float64)
  lam = augment.pca_lambdas(eigvals, scale)
  want = eigvecs @ np.diag((0.1 * lam) ** 2) @ eigvecs.T
  sd = np.sqrt(np.diag(want))
  assert np.all(np.abs(x.mean(0)) < 5 * sd / np.sqrt(n))
  np.testing.assert_allclose(np.cov(x.T, bias=True), want, atol=0.05 * want.max())
  if scale == "sqrt":
    np.testing.assert_allclose(lam, np.sqrt(eigvals))


# ------------------------------------------------------------------ statistics


def random_tree(root, n_per_class=6, classes=2, seed=0):
  rng = np.random.default_rng(seed)
  arrays = []
  for split in ("train", "val"):
    for c in range(classes):
      d = root / split / f"c{c}"
      d.mkdir(parents=True)
      for i in range(n_per_class):
        # Smooth-ish colours with a class tint, so the covariance is not isotropic.
        a = rng.normal(100 + 40 * c, 30, (R, R, 3)) + rng.normal(0, 20, (1, 1, 3))
        a = np.clip(a, 0, 255).astype(np.uint8)
        Image.fromarray(a).save(d / f"{i}.png")
        if split == "train":
          arrays.append(a)
  return root, np.stack(arrays)


def test_statistics_match_numpy_and_are_cached(tmp_path, monkeypatch):
  root, arrays = random_tree(tmp_path / "t")
  c = make_config(tmp_path, root)
  c.input.stats_max_images = 0  # all
  s = ip.statistics(c)
  x = arrays.astype(np.float64)
  pixels = x.reshape(-1, 3)
  np.testing.assert_allclose(s.mean_image, x.mean(0), atol=1e-3)
  np.testing.assert_allclose(s.mean_rgb, pixels.mean(0), rtol=1e-6)
  vals, vecs = np.linalg.eigh(np.cov(pixels.T, bias=True))
  np.testing.assert_allclose(s.eigvals, vals[::-1], rtol=1e-4)
  np.testing.assert_allclose(np.abs(s.eigvecs.T @ vecs[:, ::-1]), np.eye(3), atol=1e-4)
  assert s.num_images == len(arrays)
  cached = list((tmp_path / "cache" / "stats").glob("*.npz"))
  assert len(cached) == 1

  def boom(_):
    raise AssertionError("recomputed instead of reading the cache")

  monkeypatch.setattr(stats_lib, "compute", boom)
  again = ip.statistics(c)
  np.testing.assert_array_equal(again.mean_image, s.mean_image)
  np.testing.assert_array_equal(again.eigvecs, s.eigvecs)
  # A different JPEG IDCT decodes other pixels: a different cache entry.
  c.input.jpeg_dct_method = "INTEGER_ACCURATE"
  with pytest.raises(AssertionError, match="recomputed"):
    ip.statistics(c)
  # So is a different sample size.
  c.input.jpeg_dct_method = "INTEGER_FAST"
  c.input.stats_max_images = 5
  with pytest.raises(AssertionError, match="recomputed"):
    ip.statistics(c)


def test_accurate_idct_decodes_as_pil_does(shared_data):
  """input.jpeg_dct_method="INTEGER_ACCURATE" gives PIL's pixels (the 2012 data
  preparation's decoder); TF's default fast IDCT does not."""
  path = sorted(glob.glob(os.path.join(shared_data, "imagenet-tiny", "train", "*", "*.JPEG")))[0]
  img = Image.open(path).convert("RGB")
  w, h = img.size
  side = min(w, h)
  top, left = (h - side) // 2, (w - side) // 2
  pil = np.asarray(img.crop((left, top, left + side, top + side)))
  data = tf.constant(open(path, "rb").read())
  # At the square's own size the resize is the identity: only the decoders differ.
  accurate = decode.decode_centre_square(data, side, dct="INTEGER_ACCURATE").numpy()
  fast = decode.decode_centre_square(data, side).numpy()
  np.testing.assert_array_equal(accurate, pil)
  assert np.abs(fast.astype(int) - pil).mean() > 0.1
  assert (fast.astype(int) - pil).mean() < 0  # the fast IDCT reads darker


def test_published_statistics_and_mean_modes(tmp_path):
  c = make_config(tmp_path, coord_tree(tmp_path / "t"), stats="published")
  s = ip.statistics(c)
  np.testing.assert_allclose(s.mean_rgb, [127.30, 119.72, 104.91], rtol=1e-6)
  assert s.mean_image.shape == (R, R, 3)
  # sqrt of the converted fb.resnet.torch eigenvalues ~ cuda-convnet2's std devs.
  np.testing.assert_allclose(np.sqrt(s.eigvals), stats_lib.CUDA_CONVNET2_STDDEVS, rtol=0.15)
  c.input.pca_jitter = False
  raw = coord_image(0)[16:16 + S, 16:16 + S].astype(np.float32)
  for mode, sub in [("none", 0.0), ("published", s.mean_rgb), ("per_channel", s.mean_rgb),
                    ("per_pixel", s.mean_image[16:16 + S, 16:16 + S])]:
    c.input.mean = mode
    got = next(ip.eval_batches(c, ten_crop=False))["image"][0]
    np.testing.assert_allclose(got[..., :2], (raw - sub)[..., :2], atol=1e-4)
  # Explicit per-channel values (e.g. torchvision's) replace the computed ones.
  c.input.mean, c.input.mean_rgb = "per_channel", (123.675, 116.28, 103.53)
  got = next(ip.eval_batches(c, ten_crop=False))["image"][0]
  np.testing.assert_allclose(got[..., :2], (raw - c.input.mean_rgb)[..., :2], atol=1e-4)
  c.input.mean_rgb = None
  c.input.mean = "per_pixel"
  val0 = coord_image(100)[16:16 + S, 16:16 + S].astype(np.float32)
  np.testing.assert_allclose(ip.preprocess_image_files(c, [tmp_path / "t/val/class0/000.png"])[0],
                             val0 - s.mean_image[16:16 + S, 16:16 + S], atol=1e-4)
  u8 = ip.load_image_files_uint8(c, [str(tmp_path / "t/val/class0/000.png")])
  assert u8.dtype == np.uint8 and u8.shape == (1, S, S, 3)


def test_train_divisor_and_pca_applied(tmp_path):
  c = make_config(tmp_path, coord_tree(tmp_path / "t"), stats="published", mean="none",
                  random_crop=False, flip=False, train_divisor=1.1)
  b = next(ip.train_batches(c))["image"]
  # No random geometry: image * 1.1 - crop is a per-image constant RGB offset (the jitter).
  diff = b * 1.1 - coord_image(0)[16:16 + S, 16:16 + S].astype(np.float32)
  rg = diff[..., :2].reshape(len(b), -1, 2)
  assert np.allclose(rg, rg[:, :1], atol=1e-2)
  assert np.abs(rg[:, 0]).max() > 0.1  # jitter on by default


def test_train_divisor_scales_training_inputs_only(tmp_path):
  """The same image, un-augmented, comes out of training 1.1x smaller than out of
  evaluation and prediction: the 2012 code divides training crops only (its test and
  multiview path are not divided; see AugmentConfig.train_divisor)."""
  root = coord_tree(tmp_path / "t")
  c = make_config(tmp_path, root, stats="published", mean="published", pca_jitter=False,
                  random_crop=False, flip=False, train_divisor=1.1)
  c.eval_batch_size = 4
  train = next(ip.train_batches(c))
  k = int(round(train["image"][0, 0, 0, 2] * 1.1 + stats_lib.PUBLISHED_MEAN_RGB[2]))
  path = root / "train" / f"class{k // 8}" / f"{k % 8:03d}.png"  # see coord_tree
  predict = ip.preprocess_image_files(c, [path])[0]
  # R and G are the same in every file of the tree (x, y), so eval's image 0 serves too.
  evaluate = next(ip.eval_batches(c, ten_crop=False))["image"][0]
  want = (coord_image(k)[16:16 + S, 16:16 + S] - stats_lib.PUBLISHED_MEAN_RGB).astype(np.float32)
  np.testing.assert_allclose(predict, want, atol=1e-4)
  np.testing.assert_allclose(evaluate[..., :2], want[..., :2], atol=1e-4)
  np.testing.assert_allclose(train["image"][0], want / 1.1, atol=1e-4)


# ------------------------------------------------------------------ order, resume, shares


def test_resume_equals_uninterrupted_stream_and_reshuffles(tmp_path):
  c = make_config(tmp_path, coord_tree(tmp_path / "t"), stats="published")
  info = ip.dataset_info(c)
  spe = ip.steps_per_epoch(c, info)
  assert (info.num_train, spe) == (24, 3)
  full = take(ip.train_batches(c), 8)  # epochs 0, 1 and part of 2
  for k in (2, 3, 5):  # mid-epoch, exactly at an epoch boundary, next epoch
    resumed = take(ip.train_batches(c, start_step=k), 8 - k)
    for a, b in zip(full[k:], resumed, strict=True):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])
  full = take(ip.train_batches(plain(c)), 2 * spe)
  epochs = [np.concatenate([ids(b) for b in full[e * spe:(e + 1) * spe]]) for e in (0, 1)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(24))  # each epoch: all once
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled
  # A restarted stream slices the plan: the indices of the skipped steps are never read.
  tail = pipeline.train_epoch_indices(0, 1, 24, 8, 0, 1, first_step=2)
  np.testing.assert_array_equal(tail, pipeline.epoch_permutation(0, 1, 24)[16:24])


def test_labels_follow_sorted_class_folders(tmp_path):
  c = plain(make_config(tmp_path, coord_tree(tmp_path / "t"), stats="published"))
  info = ip.dataset_info(c)
  assert info.class_names == ("class0", "class1", "class2") and info.num_classes == 3
  for b in take(ip.train_batches(c), 3):
    np.testing.assert_array_equal(b["label"], ids(b) // 8)
    assert b["label"].dtype == np.int32


# 4 processes only: 2 runs the same code (each process's slice of the global batch).
@pytest.mark.parametrize("process_count", [4])
def test_process_shares_are_disjoint_and_assemble_the_global_batch(tmp_path, process_count):
  # Plain pixels, so that the B channel names each file: random crops and flips still
  # differ per example, drawn from the same per-example seed as the colour jitter.
  c = plain(make_config(tmp_path, coord_tree(tmp_path / "t"), stats="published"))
  single = take(ip.train_batches(c), 3)
  shares = [take(ip.train_batches(c, process_index=p, process_count=process_count), 3)
            for p in range(process_count)]
  for step in range(3):
    parts = [s[step] for s in shares]
    assert all(p["image"].shape[0] == c.batch_size // process_count for p in parts)
    glued = np.concatenate([p["image"] for p in parts])
    np.testing.assert_array_equal(glued, single[step]["image"])  # same global batch
  seen = np.concatenate([ids(b) for s in shares for b in s])
  assert sorted(seen) == list(range(24))  # disjoint, and together the whole epoch


# Centre crops in one process, ten crops in two: the views are made per example before
# batching and the processes' split is by index before reading, independent code paths,
# each case of each covered once (as in test_tfds_source).
@pytest.mark.parametrize("process_count,ten_crop", [(1, False), (2, True)])
def test_eval_counts_every_example_once(tmp_path, process_count, ten_crop):
  c = plain(make_config(tmp_path, coord_tree(tmp_path / "t", val_per_class=3)))
  c.eval_batch_size = 4  # does not divide the 9 examples
  info = ip.dataset_info(c)
  outs = [list(ip.eval_batches(c, ten_crop=ten_crop, process_index=p,
                               process_count=process_count)) for p in range(process_count)]
  assert len({len(o) for o in outs}) == 1  # every process yields the same number of batches
  masks = np.concatenate([b["mask"] for o in outs for b in o])
  got = np.concatenate([ids(b)[b["mask"]] for o in outs for b in o])
  assert masks.sum() == info.num_eval == 9
  assert sorted(got) == list(range(100, 109))
  for o in outs:
    for b in o:
      assert b["image"].shape[0] == b["label"].shape[0] == b["mask"].shape[0] == 4 // process_count
      assert b["mask"].dtype == bool


def test_bad_batch_size_for_processes_is_an_error(tmp_path):
  c = make_config(tmp_path, coord_tree(tmp_path / "t"), stats="published")
  with pytest.raises(ValueError, match="batch_size"):
    next(ip.train_batches(c, process_count=3))  # however lazily the stream starts


# ------------------------------------------------------------------ odd and bad files


def synthetic_odd_tree(root):
  """The odd-images set, made with PIL: CMYK, progressive, greyscale, PNG named .JPEG,
  truncated and empty."""
  rng = np.random.default_rng(1)
  base = np.clip(rng.normal(128, 50, (300, 400, 3)), 0, 255).astype(np.uint8)
  base = np.asarray(Image.fromarray(base).filter(ImageFilter.GaussianBlur(3)))
  d = root / "n00000001"
  d.mkdir(parents=True)
  img = Image.fromarray(base)
  img.convert("CMYK").save(d / "x_cmyk.JPEG", quality=95)
  img.save(d / "x_progressive.JPEG", quality=95, progressive=True)
  img.convert("L").save(d / "x_gray.JPEG", quality=95)
  img.save(d / "x_png_disguised.JPEG", format="PNG")
  img.save(d / "full.jpg", quality=95)
  data = (d / "full.jpg").read_bytes()
  (d / "full.jpg").unlink()
  (d / "x_truncated.JPEG").write_bytes(data[: int(0.4 * len(data))])
  (d / "x_empty.JPEG").write_bytes(b"")
  return root


def check_odd_folder(tmp_path, odd_root):
  """odd_root/<wnid>/*: good files decode like PIL, bad ones are skipped and reported."""
  tree = tmp_path / "odd_tree"
  for split in ("train", "val"):
    shutil.copytree(odd_root, tree / split)
  files = sorted(str(p) for p in (tree / "val").rglob("*") if p.is_file())
  bad = [f for f in files if "truncated" in f or "empty" in f]
  good = [f for f in files if f not in bad]
  assert len(bad) == 2 and len(good) >= 4
  for f in good:
    with Image.open(f) as im:
      ref = np.asarray(im.convert("RGB"))
    h, w, _ = ref.shape
    side = min(h, w)
    c = plain(make_config(tmp_path, tree))
    c.input.resize_size = side  # the centre square at its own size: no resampling
    c.model.input_size = side
    got = ip.load_image_files_uint8(c, [f])[0]
    oy, ox = (h - side) // 2, (w - side) // 2
    want = ref[oy:oy + side, ox:ox + side]
    assert got.shape == (side, side, 3)
    assert np.abs(got.astype(int) - want).mean() < 2.5, f

  c = plain(make_config(tmp_path, tree))
  c.eval_batch_size = 4
  log = ip.BadImageLog()
  out = list(ip.eval_batches(c, ten_crop=False, bad_images=log))
  assert sum(b["mask"].sum() for b in out) == len(good)
  assert sorted(log.paths) == sorted(bad) and log.count == 2
  # Training: batches stay full, the bad files are substituted and reported.
  c.batch_size = len(files)
  log = ip.BadImageLog()
  batches = take(ip.train_batches(c, bad_images=log), 2)
  assert all(b["image"].shape[0] == len(files) for b in batches)
  assert sorted(log.paths) == sorted(b.replace("/val/", "/train/") for b in bad)
  # on_bad_image="error": the error names the file.
  c.input.on_bad_image = "error"
  with pytest.raises(ip.BadImageError) as e:
    list(ip.eval_batches(c, ten_crop=False))
  assert any(b in str(e.value) for b in bad)
  with pytest.raises(ip.BadImageError, match="x_|derived_"):
    ip.load_image_files_uint8(c, bad[:1])


def test_odd_files_synthetic(tmp_path):
  check_odd_folder(tmp_path, synthetic_odd_tree(tmp_path / "odd"))


@pytest.mark.skipif(not os.path.isdir(ODD), reason=f"{ODD} absent (shared test data)")
def test_odd_files_shared(tmp_path):
  check_odd_folder(tmp_path, ODD)


def test_validity_check():
  def valid(b):
    return bool(decode.is_valid_image(tf.constant(b)))
  assert not valid(b"")
  assert not valid(b"\xff\xd8\xff\xe0" + b"\x00" * 100)  # no EOI
  assert valid(b"\xff\xd8\xff\xe0" + b"\x00" * 100 + b"\xff\xd9")
  assert valid(b"\xff\xd8\xff\xe0" + b"\x00" * 100 + b"\xff\xd9\x00\x00")  # padded
  assert not valid(b"GIF89a" + b"\x00" * 100)


# ------------------------------------------------------------------ sources


@pytest.mark.skipif(not os.path.isdir(TINY), reason=f"{TINY} absent (shared test data)")
def test_wnid_folder_order_is_tfds_imagenet2012_label_order(tmp_path):
  spec = importlib.util.find_spec("tensorflow_datasets")
  labels_txt = os.path.join(spec.submodule_search_locations[0], "datasets", "imagenet2012",
                            "labels.txt")
  tfds_labels = open(labels_txt).read().split()
  assert len(tfds_labels) == 1000 and tfds_labels == sorted(tfds_labels)
  synsets = dict(line.split("\t")[:2] for line in open(os.path.join(TINY, "synsets.txt"))
                 if line.strip())
  c = make_config(tmp_path, TINY)
  info = ip.dataset_info(c)
  assert list(info.class_names) == sorted(synsets)
  for wnid in info.class_names:
    assert tfds_labels.index(wnid) == int(synsets[wnid])
  assert (info.num_train, info.num_eval) == (240, 100)


def _no_downloads(monkeypatch):
  """Any network connection or TFDS download/preparation raises: what "fails fast"
  means, measured as work not done rather than seconds (which a loaded machine stretches)."""
  import socket

  import tensorflow_datasets as tfds

  def refuse(*args, **kwargs):
    raise AssertionError(f"attempted a download or preparation: {args[:2]}")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)


@pytest.mark.parametrize("name", ["imagenet2012", "cifar10"])
def test_unprepared_tfds_fails_fast_with_instructions(tmp_path, name, monkeypatch):
  c = make_config(tmp_path)
  c.dataset.name = name
  c.dataset.data_dir = str(tmp_path / "tfds")
  c.dataset.manual_dir = str(tmp_path / "manual")
  _no_downloads(monkeypatch)
  with pytest.raises(sources.DatasetNotFoundError) as e:
    ip.dataset_info(c)
  msg = str(e.value)
  assert f"{sources.PREPARE_COMMAND} {name}" in msg and str(tmp_path / "tfds") in msg
  if name == "imagenet2012":
    for f in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", str(tmp_path / "manual"),
              "config.dataset.manual_dir"):
      assert f in msg
  with pytest.raises(sources.DatasetNotFoundError):
    ip.train_batches(c)
  # Nothing fetched, prepared or cached on the way.
  assert not (tmp_path / "tfds" / "downloads").exists() and not (tmp_path / "manual").exists()
  assert not (tmp_path / "cache").exists()


def test_missing_image_folder_fails_fast(tmp_path, monkeypatch):
  c = make_config(tmp_path, tmp_path / "nowhere")

  def no_statistics(*args, **kwargs):
    raise AssertionError("computed statistics before checking the folder")

  monkeypatch.setattr(stats_lib, "compute", no_statistics)
  with pytest.raises(sources.DatasetNotFoundError, match="config.dataset.image_folder"):
    ip.dataset_info(c)
  c.dataset.image_folder = None
  with pytest.raises(sources.DatasetNotFoundError, match="config.dataset.image_folder"):
    ip.dataset_info(c)
  (tmp_path / "empty" / "train").mkdir(parents=True)
  c.dataset.image_folder = str(tmp_path / "empty")
  with pytest.raises(sources.DatasetNotFoundError, match="eval_split"):
    ip.dataset_info(c)
  assert not (tmp_path / "cache").exists()  # failed before reading or caching anything


# ------------------------------------------------------------------ square cache


def test_square_cache_gives_the_same_stream(tmp_path):
  """input.square_cache: byte-identical batches (bad files substituted alike), resumable,
  built once and reused."""
  tree = tmp_path / "tree"
  synthetic_odd_tree(tree / "train")
  shutil.copytree(tree / "train", tree / "val")
  c = make_config(tmp_path, tree, stats="published", mean="published")
  c.batch_size = 4
  want = take(ip.train_batches(c, start_step=1), 5)
  c.input.square_cache = True
  log = ip.BadImageLog()
  got = take(ip.train_batches(c, start_step=1, bad_images=log), 5)
  for w, g in zip(want, got, strict=True):
    np.testing.assert_array_equal(w["image"], g["image"])
    np.testing.assert_array_equal(w["label"], g["label"])
  assert {os.path.basename(p) for p in log.paths} == {"x_truncated.JPEG", "x_empty.JPEG"}
  built = list((tmp_path / "cache" / "squares").iterdir())
  assert len(built) == 1 and len(list(built[0].glob("*.u8"))) == 4  # 6 files, 2 bad
  stamp = os.path.getmtime(built[0] / "valid.npy")
  again = take(ip.train_batches(c, start_step=1), 5)
  assert os.path.getmtime(built[0] / "valid.npy") == stamp
  np.testing.assert_array_equal(again[-1]["image"], want[-1]["image"])
  c.input.on_bad_image = "error"
  with pytest.raises(ip.BadImageError):
    take(ip.train_batches(c), 5)
  # Squares decoded with the other JPEG IDCT are other squares: never reused.
  c.input.jpeg_dct_method = "INTEGER_ACCURATE"
  other = square_cache.cache_dir(c, sources.get_source(c), "train")
  assert other != str(built[0]) and os.path.dirname(other) == str(built[0].parent)
