r"""Prepares a TFDS dataset on disk, once, for `config.dataset.name=<TFDS name>`.

  python -m alexnet_jax.data.prepare imagenet2012 --manual_dir=DIR_WITH_TARS \
      --data_dir=DATA_DIR [--file_format=array_record]

This is what `tfds build` does, but `tfds build` cannot start with the pinned
tensorflow-datasets 4.9.10 unless apache_beam is installed (its CLI imports a Beam-based
format converter at start-up), and Beam is far too heavy a dependency for this. The
pipeline reads either file format (see `sources`).

imagenet2012 needs no network: TFDS reads ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar from manual_dir (the test tar is optional and unused). Other
datasets are downloaded by TFDS, so need a machine with network access.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from alexnet_jax.data.sources import IMAGENET_TARS, TFDS_FILE_FORMATS


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
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder.data_dir


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m alexnet_jax.data.prepare",
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
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"prepared {args.name} in {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
