r"""alexnet-jax: train, evaluate, predict with, or summarise the 2012 AlexNet.

  python main.py --workdir=runs/alexnet --config=experiments/alexnet.py \
      [--config.batch_size=256 ...] [--mode=train|eval|predict|summary]

Any config field can be overridden as --config.a.b=value; a misspelt field is
an error. Multi-process: --coordinator_address=HOST:PORT --num_processes=N
--process_id=I (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, evaluations, figures.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "summary"], "What to do.")
flags.DEFINE_integer("step", None, "--mode=eval/predict: the checkpoint step (default latest).")
flags.DEFINE_list("images", [], "--mode=predict: image files to classify.")
flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator HOST:PORT.")
flags.DEFINE_integer("num_processes", None, "jax.distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "jax.distributed: this process's index.")
config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/*.py).",
                                lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import logging

  # JAX logs each accelerator backend it does not find; that is not news.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  from alexnet_jax import parallel

  # jax.distributed must start before anything else touches JAX.
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
  from alexnet_jax import cli

  if FLAGS.mode != "summary" and not FLAGS.workdir:
    raise app.UsageError(f"--mode={FLAGS.mode} needs --workdir")
  sys.exit(cli.run(FLAGS.mode, FLAGS.config, FLAGS.workdir, step=FLAGS.step,
                   images=FLAGS.images))


if __name__ == "__main__":
  app.run(main)
