"""Data-parallel search with JAX's own distribution: a one-axis `data` mesh over the devices, the
batch sharded over it and everything else (weights, alpha, optimiser states, the data set)
replicated. `jit` (GSPMD) then inserts the all-reduces itself: gradients and batch-norm statistics
are over the global batch, so N devices compute the same search as one device with the same global
batch, up to the order of floating-point sums.

Several hosts: `initialize` calls `jax.distributed.initialize`; every process then sees all
devices in `jax.devices()`, holds the (replicated) data set and puts only its own devices' rows of
each batch's indices; process 0 writes the run folder.
"""

from collections.abc import Sequence
from typing import cast

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None):
    """Join a multi-process run (`jax.distributed.initialize`); with no arguments JAX reads the
    cluster's environment (SLURM, Open MPI, TPU pods, or JAX_COORDINATOR_ADDRESS etc.)."""
    if coordinator is not None and ":" not in coordinator:
        raise ValueError(f"coordinator (={coordinator!r}) must be HOST:PORT")
    if num_processes is not None and (num_processes < 1 or not (0 <= (process_id or 0) < num_processes)):
        raise ValueError(f"process_id (={process_id!r}) must lie in [0, num_processes={num_processes})")
    # CPU processes need a collectives implementation to all-reduce across hosts (GPUs use NCCL).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def data_mesh(devices: int | Sequence | None) -> Mesh | None:
    """A `data` mesh over `devices` (a count of the first `jax.devices()`, or a list of devices;
    default: all of them); None for a single device, which then runs with no sharding at all."""
    available = jax.devices()
    if devices is None:
        chosen = available
    elif isinstance(devices, int) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"devices (={devices}) must lie in [1, {len(available)}]: this run sees {len(available)} "
                f"{available[0].platform} device(s)"
            )
        chosen = available[:devices]
    else:
        chosen = list(cast(Sequence, devices))  # a bool is no device count: `list` rejects it (TypeError)
        if not chosen:
            raise ValueError("devices is an empty list")
    if len(chosen) == 1:
        return None
    return Mesh(np.asarray(chosen), (AXIS,))


def check_batch(batch_size: int, mesh: Mesh | None) -> None:
    if mesh is not None and batch_size % mesh.size:
        raise ValueError(
            f"batch_size (={batch_size}) must divide evenly over {mesh.size} devices; "
            f"use a multiple of {mesh.size} or fewer devices"
        )


def replicate(tree, mesh: Mesh | None):
    """Every array of `tree` replicated over the mesh (built from host values, so it also works
    where a process cannot address every device)."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, P())

    def put(x):
        if not isinstance(x, (jax.Array, np.ndarray)):
            return x
        # `jax.dtypes` re-exports `issubdtype` by a plain import, which pyright takes as private.
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(  # pyright: ignore[reportPrivateImportUsage]
            x.dtype, jax.dtypes.prng_key
        ):
            data = fetch(jax.random.key_data(x))
            return jax.random.wrap_key_data(put(data), impl=jax.random.key_impl(x))
        host = fetch(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def shard_rows(indices: np.ndarray | jax.Array, mesh: Mesh | None):
    """Index arrays `[steps, batch]` with the batch axis split over the mesh; each process builds
    only the rows of its own devices."""
    if mesh is None:
        return indices
    host = np.asarray(indices)
    sharding = NamedSharding(mesh, P(None, AXIS))
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def batch_constraint(mesh: Mesh | None):
    """Inside the jitted step: keep a gathered batch `[batch, ...]` split over the mesh."""
    if mesh is None:
        return lambda x: x
    sharding = NamedSharding(mesh, P(AXIS))
    return lambda x: jax.lax.with_sharding_constraint(x, sharding)


def fetch(x) -> np.ndarray:
    """A host copy of a replicated (or single-device) array, also where it spans other processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def is_main_process() -> bool:
    return jax.process_index() == 0
