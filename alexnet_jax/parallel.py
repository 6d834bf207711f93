"""The device mesh: a `data` axis (replicas) times a `model` axis (towers).

With `mesh.model = 2` each device of a replica holds one tower, as each 2012
GPU did; with 1, both towers share a device. Tower parameters (every parameter
of AlexNet: each layer is split between the towers) and their optimizer state
are sharded over `model`; everything else is replicated. Batches are sharded
over `data`.
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Iterator, Mapping

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alexnet_jax import config_checks

DATA = "data"
MODEL = "model"


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """A (data, model) mesh over `devices` (default: all), shaped by `config.mesh`."""
  devices = list(jax.devices() if devices is None else devices)
  data, model = config_checks.check_mesh(config, len(devices))
  return jax.make_mesh((data, model), (DATA, MODEL), axis_types=(AxisType.Auto,) * 2,
                       devices=devices[:data * model])


def initialize_distributed(coordinator: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """jax.distributed from flags, else the JAX_COORDINATOR_ADDRESS / ... environment.

  Must run before any other JAX call. A no-op for a single-process run.
  """
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not coordinator:
    return
  num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "1"))
  process_id = process_id if process_id is not None else int(os.environ.get("JAX_PROCESS_ID", "0"))
  # CPU collectives across processes (harmless where a GPU backend is used).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(mesh: Mesh, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """A global batch sharded over `data`, from this process's share of it."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def prefetch(mesh: Mesh, batches: Iterator[Mapping[str, np.ndarray]],
             size: int) -> Iterator[dict[str, jax.Array]]:
  """Puts the next `size` batches on the devices while the current step runs."""
  queue = collections.deque()
  for batch in itertools.islice(batches, size):
    queue.append(global_batch(mesh, batch))
  while queue:
    yield queue.popleft()
    for batch in itertools.islice(batches, 1):
      queue.append(global_batch(mesh, batch))
