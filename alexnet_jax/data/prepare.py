r"""Prepares a TFDS dataset on disk, once, for `config.dataset.name=<TFDS name>`.

  python -m alexnet_jax.data.prepare imagenet2012 --manual_dir=DIR_WITH_TARS \
      --data_dir=DATA_DIR [--file_format=array_record]

This is what `tfds build` does, but `tfds build` cannot start with the pinned
tensorflow-datasets 4.9.10 unless apache_beam is installed (its CLI imports a Beam-based
format converter at start-up), and Beam is far too heavy a dependency for this. The
pipeline reads either file format (see `sources`); TFRecord, the default, is read without
Python per record.

imagenet2012 needs no network: TFDS reads ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar from manual_dir (the test tar is optional and unused). Other
datasets are downloaded by TFDS, so need a machine with network access.

imagenet2012 validation labels are taken from the file names: ILSVRC2012_val_000NNNNN.JPEG
gets line NNNNN of the official label list (TFDS ships it as validation_labels.txt). TFDS
itself pairs the tar's sorted file names with the list's lines in order, which is the same
for the full 50,000-image tar but labels any other subset wrongly without a word (measured:
0 of 1,300 real validation images right). A validation tar holding a file of any other
name is refused before anything is built.

Imports nothing heavy at module level: `--help` and argument errors need no TensorFlow.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tarfile
from collections.abc import Sequence

_log = logging.getLogger(__name__)

PREPARE_COMMAND = "python -m alexnet_jax.data.prepare"
# ILSVRC-2012 files TFDS imagenet2012 needs in its manual_dir.
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
# Record formats `sources` reads; TFDS can also write riegeli and parquet.
TFDS_FILE_FORMATS = ("tfrecord", "array_record")
# The official validation file names; NNNNNNNN is the 1-based line of the label list.
_VALIDATION_FILE = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")


class PrepareError(ValueError):
  """The inputs cannot make a correct dataset; the message says what to change."""


def prepare(name: str, data_dir: str | None, manual_dir: str | None = None,
            file_format: str | None = None) -> str:
  """Builds TFDS `name` into `data_dir`; returns the dataset's version folder."""
  import tensorflow_datasets as tfds  # (the package's import of _tf kept TF off the GPU)

  data_dir = os.path.expanduser(data_dir) if data_dir else None
  manual_dir = os.path.expanduser(manual_dir) if manual_dir else None
  builder = tfds.builder(name, data_dir=data_dir, file_format=file_format)
  if builder.name == "imagenet2012":
    # TFDS builds whichever splits it finds tars for and only warns about the rest; a
    # dataset without its training split would then fail only when training starts.
    manual = manual_dir or os.path.join(os.fspath(builder.data_dir_root), "downloads",
                                        "manual")
    missing = [t for t in IMAGENET_TARS if not os.path.exists(os.path.join(manual, t))]
    if missing:
      raise FileNotFoundError(f"{' and '.join(missing)} not in {manual} (--manual_dir); "
                              "get them from image-net.org")
    builder = _imagenet_by_file_name(type(builder))(
        data_dir=data_dir, file_format=file_format, version=builder.version)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder.data_dir


def validation_labels_by_file_name(names: Sequence[str], label_lines: Sequence[str],
                                   tar_path: str) -> dict[str, str]:
  """{tar member name: wnid}: ILSVRC2012_val_000NNNNN.JPEG gets label_lines[NNNNN - 1].

  Raises PrepareError, naming the first offending files, if any name is not of that form
  (in any folder of the tar) or its number is not a line of `label_lines`.
  """
  labels, bad = {}, []
  for name in names:
    m = _VALIDATION_FILE.fullmatch(os.path.basename(name))
    if m and 1 <= int(m[1]) <= len(label_lines):
      labels[name] = label_lines[int(m[1]) - 1]
    else:
      bad.append(name)
  if bad or not labels:
    shown = ", ".join(repr(n) for n in bad[:5]) + (", ..." if len(bad) > 5 else "")
    raise PrepareError(
        f"{tar_path}: {len(bad)} of its {len(names)} files are not named "
        f"ILSVRC2012_val_NNNNNNNN.JPEG with NNNNNNNN from 00000001 to "
        f"{len(label_lines):08d}{': ' + shown if bad else ''}. Validation labels are read "
        "from those names (file NNNNNNNN is line NNNNNNNN of the official list); give the "
        "files their official names, or remove the others, and run this again.")
  return labels


def _imagenet_by_file_name(builder_cls):
  """TFDS's imagenet2012 builder with validation labels by file name (module docstring);
  the same dataset name, version, features and files otherwise."""

  class Imagenet2012ByFileName(builder_cls, skip_registration=True):
    name = builder_cls.name
    # README, citation and label files are TFDS's, beside the original builder.
    pkg_dir_path = builder_cls._get_pkg_dir_path()

    def _split_generators(self, dl_manager):
      splits = super()._split_generators(dl_manager)
      for split in splits:
        if "validation_labels" in split.gen_kwargs:
          path = os.path.join(dl_manager.manual_dir, IMAGENET_TARS[1])
          with tarfile.open(path, "r:") as tar:  # names only: seeks from header to header
            names = [m.name for m in tar if m.isfile()]
          lines = (self.pkg_dir_path / "validation_labels.txt").read_text().split()
          split.gen_kwargs["validation_labels"] = validation_labels_by_file_name(
              names, lines, path)
          if len(names) != len(lines):
            _log.warning("%s holds %d of the %d validation images; labelled by file name",
                         path, len(names), len(lines))
      return splits

  return Imagenet2012ByFileName


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog=PREPARE_COMMAND,
      description="Prepare a TFDS dataset once (like `tfds build`), for config.dataset.name.")
  parser.add_argument("name", help="TFDS name, e.g. imagenet2012 (name[/config][:version])")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data_dir (config.dataset.data_dir); default TFDS's own")
  parser.add_argument("--manual_dir", default=None,
                      help="folder with manually downloaded files, e.g. the ILSVRC2012 tars "
                      "(config.dataset.manual_dir); default DATA_DIR/downloads/manual")
  parser.add_argument("--file_format", choices=TFDS_FILE_FORMATS, default=None,
                      help="record format; default TFDS's (tfrecord)")
  args = parser.parse_args(argv)
  try:
    path = prepare(args.name, args.data_dir, args.manual_dir, args.file_format)
  except (FileNotFoundError, PrepareError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"prepared {args.name} in {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
