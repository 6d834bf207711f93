"""The device mesh: a `data` axis (replicas) times a `model` axis (towers).

With `mesh.model = 2` each device of a replica holds one tower, as each 2012
GPU did; with 1, both towers share a device. Tower parameters (every parameter
of AlexNet: each layer is split between the towers) and their optimizer state
are sharded over `model`; everything else is replicated. Batches are sharded
over `data`.
"""

from __future__ import annotations

import collections
import functools
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


@functools.cache
def data_share(mesh: Mesh, process_index: int | None = None) -> tuple[int, int]:
  """(index, count): which share of every global batch this process reads, of how many.

  A process reads the batch rows of the `data` coordinates its devices hold, so the
  shares follow the mesh, not the process index: two processes that each hold one tower
  of the same replica (mesh data=1, model=2 over two processes) both read share 0 of 1,
  the same examples, as the paper's two GPUs saw the same images. Each process's devices
  must hold one aligned block of data coordinates, of the same size for every process.
  """
  process_index = jax.process_index() if process_index is None else process_index
  blocks = {}
  for (row, _), device in np.ndenumerate(mesh.devices):
    blocks.setdefault(device.process_index, set()).add(row)
  rows = sorted(blocks[process_index])
  size, first = len(rows), rows[0]
  aligned = rows == list(range(first, first + size)) and first % size == 0
  if not aligned or any(len(b) != size for b in blocks.values()):
    raise ValueError(
        f"mesh {dict(mesh.shape)}: the data coordinates held by each process "
        f"({ {p: sorted(b) for p, b in sorted(blocks.items())} }) are not aligned blocks of one "
        "size, so batches cannot be split between processes; set config.mesh.data/model so "
        "that each process holds whole replicas or whole towers of the same replicas")
  return first // size, mesh.shape[DATA] // size


def global_batch(mesh: Mesh, local: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """A global batch sharded over `data`, from this process's share of it (`data_share`)."""
  sharding = batch_sharding(mesh)
  _, count = data_share(mesh)
  return {k: jax.make_array_from_process_local_data(
      sharding, v, (v.shape[0] * count, *v.shape[1:])) for k, v in local.items()}


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
