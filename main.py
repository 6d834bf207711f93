r"""alexnet-jax: train, evaluate, predict with, or summarise the 2012 AlexNet.

  python main.py --workdir=runs/alexnet --config=experiments/alexnet.py \
      [--config.batch_size=256 ...] [--mode=train|eval|predict|summary] [--follow]

Any config field can be overridden as --config.a.b=value; a misspelt field is
an error. Multi-process: --coordinator_address=HOST:PORT --num_processes=N
--process_id=I (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
"""

import os
import signal
import sys
import traceback


def _stopped_before_start(signum, frame):
  del frame
  print(f"stopped by {signal.Signals(signum).name} before it started; nothing was written",
        file=sys.stderr)
  os._exit(128 + signum)  # mid-import: no clean-up worth a traceback


# Until cli.main takes them over, a signal ends the program in one line.
for _sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # = run/train.py's STOP_SIGNALS
  signal.signal(_sig, _stopped_before_start)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags  # noqa: E402
import ml_collections  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, evaluations, figures.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "summary"], "What to do.")
flags.DEFINE_integer("step", None, "--mode=eval/predict: the checkpoint step (default latest).")
flags.DEFINE_list("images", [], "--mode=predict: image files to classify.")
flags.DEFINE_bool("follow", False,
                  "--mode=eval: evaluate each new checkpoint of the run training in --workdir "
                  "once, until its last step (a separate evaluator beside the trainer).")
flags.DEFINE_bool("allow_config_changes", False,
                  "--mode=train: resume even if the config changes the run's meaning "
                  "(batch size, seed, dataset, augmentation); the changes are logged.")
flags.DEFINE_string("coordinator_address", None, "jax.distributed coordinator HOST:PORT.")
flags.DEFINE_integer("num_processes", None, "jax.distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "jax.distributed: this process's index.")
config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/*.py).",
                                lock_config=True)
flags.mark_flags_as_required(["config"])


# What absl and ml_collections raise for a bad flag, override or config path.
_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, OSError, ValueError, TypeError)


def _config_file_error(argv, err: BaseException) -> str:
  """One line for a config file whose own code failed: which file, where, what."""
  path = next((a.split("=", 1)[1].split(":")[0] for a in argv if a.startswith("--config=")),
              "the --config file")
  line = getattr(err, "lineno", None) if isinstance(err, SyntaxError) else None
  for frame in traceback.extract_tb(err.__traceback__):
    if os.path.abspath(frame.filename) == os.path.abspath(path):
      line = frame.lineno  # the deepest line of the file itself
  where = f"{path}, line {line}" if line else path
  return (f"the config file {where} failed to load: {type(err).__name__}: {err}. Fix the "
          "file (it must define get_config() returning an ml_collections.ConfigDict), or "
          "pass another --config")


def parse_flags(argv):
  """absl's parsing, with a bad flag, config file or override in one line and exit 2."""
  try:
    try:
      rest = FLAGS(argv)
    except _FLAG_ERRORS:  # absl's and ml_collections' own: reported below
      raise
    except Exception as err:  # the config file's own code failed (syntax, its own raise)
      print(f"error: {_config_file_error(argv, err)}", file=sys.stderr)
      sys.exit(2)
    if not isinstance(FLAGS.config, ml_collections.ConfigDict):
      raise flags.Error(
          f"get_config() of the --config file returned a {type(FLAGS.config).__name__}, not "
          "an ml_collections.ConfigDict: return ml_collections.ConfigDict(...) (see "
          "experiments/*.py)")
    FLAGS.config.get("seed")  # a config file that failed to load raises here, not later
    if FLAGS.mode != "summary" and not FLAGS.workdir:
      raise flags.Error(f"--mode={FLAGS.mode} needs --workdir")
    if len(rest) > 1:
      raise flags.Error(f"unexpected arguments: {rest[1:]}")
  except _FLAG_ERRORS as err:
    lines = str(err).replace("\\n", "\n").splitlines()
    # ml_collections puts the config file's whole traceback in the message: keep the
    # first line (which flag) and the last (what went wrong).
    message = lines[0].split("Traceback")[0].strip()
    if len(lines) > 1 and lines[-1].strip() not in message:
      message += " " + lines[-1].strip()
    if isinstance(err, (AttributeError, KeyError)):
      message = "unknown config field " + message.replace("\\'", "").replace("'", "")
    print(f"error: {message}\n(see python main.py --helpfull)", file=sys.stderr)
    sys.exit(2)
  return rest


def main(argv):
  del argv  # checked by parse_flags
  from alexnet_jax import cli

  sys.exit(cli.main(FLAGS.mode, FLAGS.config, FLAGS.workdir, step=FLAGS.step,
                    images=FLAGS.images, follow=FLAGS.follow,
                    allow_config_changes=FLAGS.allow_config_changes,
                    coordinator_address=FLAGS.coordinator_address,
                    num_processes=FLAGS.num_processes, process_id=FLAGS.process_id))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
