"""Data parallelism: a device ``Mesh`` with one axis, "data"; the batch is split along it, params replicated.

The same training code runs on 1 CPU, 8 GPUs or a multi-host TPU slice:

    mesh = make_mesh()                                   # every device of every host, axis "data"
    state = jax.device_put(state, replicated_sharding(mesh))
    step = jax.jit(train_step, in_shardings=(replicated, batch_sharding(mesh), replicated),
                   out_shardings=(replicated, replicated), donate_argnums=0)
    batch = shard_batch(local_batch, mesh)               # each host passes only ITS share
    state, metrics = step(state, batch, key)

``jax.jit`` sees *global* arrays: ``batch`` is one [B, H, W, C] array whose rows live on different
devices; the program is written for the whole batch (``jnp.mean`` over B is the global mean) and
XLA's SPMD partitioner inserts the all-reduce of the gradients itself.

From pmap-era code (google-research/vdm, yang-song/score_sde, flax examples ≤ 2023)
--------------------------------------------------------------------------------
=====================================================  ==================================================
pmap era                                                jit + sharding (this module)
=====================================================  ==================================================
``jax.pmap(step, axis_name="batch")``                  ``jax.jit(step, in_shardings=..., out_shardings=...)``
``flax.jax_utils.replicate(state)`` (leading [D] axis)  ``jax.device_put(state, replicated_sharding(mesh))``
``flax.jax_utils.unreplicate(state)`` (take [0])        nothing: the state already is one logical array
batch reshaped to [D, B/D, ...] per host                ``shard_batch(local_batch, mesh)``: [B, ...] global
``lax.pmean(grads, "batch")`` in the step               nothing: the step averages over the global batch
``lax.axis_index("batch")`` to vary the rng per device  per-example keys ``fold_in(key, example_index)``
``common_utils.shard_prng_key`` / ``jax.random.split``  one key, replicated
``jax.local_device_count()`` in batch arithmetic        ``jax.device_count()`` (checked by ``check_batch_size``)
=====================================================  ==================================================

Why jit + sharding is the default: ``jax.pmap`` is in maintenance mode since JAX 0.8 (it is now built
on ``shard_map``, and new features target ``jit``); with ``jit`` the step is written once for the
global batch, works unchanged on one device (a notebook) and on a pod, composes with model/tensor
sharding (add a mesh axis) and needs no replicate/unreplicate bookkeeping around checkpoints and
sampling. ``training.py`` still offers the pmap formulation (``config.train.parallel = "pmap"``) for
readers coming from that code, with :func:`replicate`/:func:`unreplicate`/:func:`split_for_pmap`.

Multi-host: every host runs the same program. :func:`maybe_initialize_distributed` must be called
before any other JAX call; afterwards ``jax.devices()`` lists all hosts' devices and each host feeds
only its ``process_index``-th share of every batch (``ddpm_jax.data.get_batch`` gives it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


# ================================================================================================
# Mesh and shardings
# ================================================================================================

def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes) with axis "data"."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over "data", the other axes whole: [B, H, W, C] → [B/D, H, W, C] per device."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (params, optimizer state, keys, metrics)."""
    return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises a clear ValueError unless ``batch_size`` splits evenly over devices and processes."""
    num_devices = mesh.devices.size
    if batch_size % num_devices:
        raise ValueError(
            f"train.batch_size={batch_size} is not divisible by the number of devices ({num_devices}); "
            f"use a multiple of {num_devices}, e.g. {max(num_devices, batch_size // num_devices * num_devices)}"
        )
    if batch_size % jax.process_count():
        raise ValueError(
            f"train.batch_size={batch_size} is not divisible by the number of processes ({jax.process_count()})"
        )


def shard_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's share [B/P, ...] → the global batch [B, ...] sharded over "data".

    Each process passes only the rows it loaded (process p: rows p·B/P … (p+1)·B/P − 1 of the global
    batch, which is what ``data.get_batch(..., process_index=p, process_count=P)`` returns).
    """
    return jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(local_batch))


# ================================================================================================
# The pmap formulation's bookkeeping (config.train.parallel = "pmap")
# ================================================================================================

def replicate(tree: Any, devices: Sequence[jax.Device] | None = None) -> Any:
    """One copy per local device along a new leading axis [D, ...] (flax.jax_utils.replicate)."""
    n = jax.local_device_count() if devices is None else len(devices)
    # Host copies; the first pmap call places one slice on each device.
    return jax.tree.map(lambda x: np.stack([np.asarray(x)] * n), jax.device_get(tree))


def unreplicate(tree: Any) -> Any:
    """The first device's copy (flax.jax_utils.unreplicate)."""
    return jax.tree.map(lambda x: x[0], tree)


def split_for_pmap(local_batch: np.ndarray, num_local_devices: int | None = None) -> np.ndarray:
    """[B_local, ...] → [D, B_local/D, ...], the input layout ``jax.pmap`` expects."""
    n = jax.local_device_count() if num_local_devices is None else num_local_devices
    if local_batch.shape[0] % n:
        raise ValueError(f"local batch of {local_batch.shape[0]} is not divisible by {n} local devices")
    return local_batch.reshape(n, local_batch.shape[0] // n, *local_batch.shape[1:])


# ================================================================================================
# Multi-host start-up
# ================================================================================================

def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
) -> bool:
    """Calls ``jax.distributed.initialize`` when launched multi-host; returns whether it did.

    Call this first, before any other JAX call. Explicit arguments win; otherwise the environment:
    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) with ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``, or a cluster JAX auto-detects (SLURM with more than one task, Open MPI, a
    multi-host Cloud TPU slice). A single process (a laptop, one 8-GPU machine) does nothing.
    On CPU the cross-process collectives use gloo.
    """
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in env:
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in env:
        process_id = int(env["JAX_PROCESS_ID"])
    multi_task_cluster = (
        int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )
    if coordinator_address is None and num_processes is None and not multi_task_cluster:
        return False
    if num_processes == 1:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    logging.info("jax.distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
