"""Processes and devices: multi-host start-up, the device mesh and its shardings, barriers, who writes files.

Data parallel over one mesh axis, "data", spanning every device of every host: parameters and optimizer state are
replicated (NamedSharding with an empty PartitionSpec), batches are split along their batch axis.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..preflight import Processes

logger = logging.getLogger("controlnet_training")


def start_processes(multi_host: bool) -> None:
    """jax.distributed.initialize() for multi-host runs: on a TPU pod slice (and SLURM, Open MPI, Kubernetes) it
    finds the other hosts itself; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    Must run before anything touches a device."""
    if multi_host or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = {}
        if os.environ.get("JAX_NUM_PROCESSES"):
            kwargs = dict(
                num_processes=int(os.environ["JAX_NUM_PROCESSES"]), process_id=int(os.environ["JAX_PROCESS_ID"])
            )
        jax.distributed.initialize(**kwargs)


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Process 0 runs the block first (dataset downloads, caches), the others after it."""
    is_main = jax.process_index() == 0
    if not is_main:
        barrier("main_process_first")
    yield
    if is_main:
        barrier("main_process_first")


def broadcast(value: int) -> int:
    """Process 0's integer on every process."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int64)))


def all_hosts_see(folder: str | os.PathLike) -> bool:
    """Whether `folder` is shared by every host (a network file system) rather than each host's own disk, as on
    the VMs of a TPU pod slice: process 0 writes a marker there and every host looks for it."""
    if jax.process_count() == 1:
        return True
    marker = Path(folder) / f".shared-{broadcast(int.from_bytes(os.urandom(4), 'little'))}"
    if jax.process_index() == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    barrier("shared folder: written")
    seen = multihost_utils.process_allgather(np.asarray(marker.exists()))
    barrier("shared folder: checked")
    if jax.process_index() == 0:
        marker.unlink()
    return bool(np.all(seen))


def jax_processes() -> Processes:
    return Processes(jax.process_index() == 0, main_process_first, broadcast)


def resolve_output_dir(output_dir: str) -> str:
    """Replace {timestamp} (the reference's default runs/{timestamp}) with process 0's local time."""
    if "{timestamp}" not in output_dir:
        return output_dir
    stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(broadcast(int(time.time()))))
    return output_dir.replace("{timestamp}", stamp)


@dataclass(frozen=True)
class Devices:
    mesh: Mesh
    replicated: NamedSharding  # params, optimizer state, frozen models
    batch: NamedSharding  # (accumulation, global micro-batch, ...) arrays: split along axis 1

    @property
    def count(self) -> int:
        return self.mesh.devices.size

    @property
    def is_main_process(self) -> bool:
        return jax.process_index() == 0

    def local_columns(self, micro_batch: int) -> slice:
        """The part of each global micro-batch this host's devices hold, so this host loads exactly those rows."""
        index_map = self.batch.addressable_devices_indices_map((1, micro_batch))
        spans = sorted((s[1].start or 0, s[1].stop or micro_batch) for s in index_map.values())
        start, stop = spans[0][0], spans[-1][1]
        if sum(b - a for a, b in dict.fromkeys(spans)) != stop - start:
            raise RuntimeError(f"this host's devices hold a non-contiguous part of the batch: {spans}")
        return slice(start, stop)


def make_devices() -> Devices:
    """A 1-D mesh over all devices in process order (each host's devices are contiguous in it)."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    return Devices(mesh, NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data")))


def replicate(tree: Any, sharding: NamedSharding) -> Any:
    """Host values (numpy or single-device arrays) as new, fully replicated global arrays. Works on every host
    (each supplies its own copy), and never aliases the input buffers (see the donation trap in the notes)."""

    def put(value):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
    """Replicated global arrays as numpy, on any host (each reads its own copy, no communication)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)
