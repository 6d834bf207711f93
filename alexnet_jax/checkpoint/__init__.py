"""Checkpoints with orbax: asynchronous, atomic, verified; the last K and the best kept.

What this package guarantees (tests/test_checkpoint.py checks each):
  * nothing non-finite is saved: save() refuses, with a warning, a state whose parameters
    or optimizer state hold a NaN or Inf (checked on the device in the same pass that
    computes the checksums), so the newest checkpoint is always a finite one;
  * orbax's preservation policy keeps the last K checkpoints and the best evaluated one
    (lowest top-1 error), from the metrics stored with each: after any number of resumes;
  * restore verifies the checksums; a damaged or incomplete newest checkpoint is reported
    in one warning and the newest intact one is used; a writer moves the steps passed
    over to `workdir/damaged_checkpoints/` so that the run can save them again;
  * a reader beside a live run (eval, predict, the follow-mode evaluator) re-lists the
    steps after a failed read: a step the writer deleted meanwhile (its keep policy) is
    "gone", said in one INFO line, never "damaged"; a reader never moves or advises moving
    checkpoints, and a step still being written (orbax's tmp directory) is never listed;
  * a failed write (disk full) is one CheckpointWriteError; the previous checkpoint stays
    intact;
  * a writer on a local workdir holds the workdir lock (alexnet_jax/lock.py) before orbax
    touches the directory, so a second run cannot delete the first one's save;
  * a writer is refused a config that changes the run's meaning, a reader (eval, predict)
    one that changes the network, naming the fields, before any array is read.

One job per module: `store` (the Checkpointer: orbax's manager, save, restore with its
fallback, setting damaged steps aside), `integrity` (checksums, finiteness, files, array
shapes), `compatibility` (which config changes a checkpoint may be resumed under), `disk`
(room for a save) and `errors` (what the user is told, once). The names other modules
use are here.
"""

from alexnet_jax.checkpoint.compatibility import ALLOW_CHANGES_FLAG, MODEL_FREE, RESUMABLE
from alexnet_jax.checkpoint.errors import (USER_ERRORS, CheckpointCorrupt, CheckpointError,
                                           CheckpointGone, CheckpointMismatch,
                                           CheckpointNotFound, CheckpointWriteError)
from alexnet_jax.checkpoint.integrity import fingerprint
from alexnet_jax.checkpoint.store import BEST_METRIC, DAMAGED_DIR, FORMAT, Checkpointer

__all__ = ["ALLOW_CHANGES_FLAG", "BEST_METRIC", "DAMAGED_DIR", "FORMAT", "MODEL_FREE",
           "RESUMABLE", "USER_ERRORS", "CheckpointCorrupt", "CheckpointError", "CheckpointGone",
           "CheckpointMismatch", "CheckpointNotFound", "CheckpointWriteError", "Checkpointer",
           "fingerprint"]
