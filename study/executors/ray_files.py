"""The driver's results folder from any node: on a cluster (--address) a small actor pinned
to the driver's node (DriverFiles) writes and reads the cells' checkpoints and final weights
there, so nothing assumes a shared disk (on the one-node Ray the tool starts itself, trials
write there directly).
"""
from __future__ import annotations

from . import ray_connect  # noqa: F401  (first: WORKER_ENV is set before Ray is imported)

import ray  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from ..store import Store  # noqa: E402


class DriverFiles:
    """An actor on the driver's node that writes and reads the cells' checkpoints and final
    weights in the driver's results folder (Store's atomic byte helpers): the driver's machine
    holds the whole study, and no worker needs (or creates) the folder."""

    def __init__(self, results_dir: str):
        self.store = Store(results_dir)

    def save_checkpoint(self, cell_id: str, data: bytes) -> bool:
        return self.store.save_checkpoint(cell_id, data)

    def load_checkpoint(self, cell_id: str, mark_in_flight: bool = False) -> bytes | None:
        return self.store.load_checkpoint(cell_id, mark_in_flight)

    def save_weights(self, cell_id: str, data: bytes) -> str | None:
        return self.store.save_weights(cell_id, data)

    def quarantine_checkpoint(self, cell_id: str, reason: str, mark_in_flight: bool = False) -> None:
        self.store.quarantine_checkpoint(cell_id, reason, mark_in_flight)


class _RemoteFiles:
    """train.CellFiles over the actor: each call waits for the write, so a checkpoint is on
    the driver's disk before the trial goes on (and before its row can land)."""

    def __init__(self, handle):
        self.handle = handle

    def save_checkpoint(self, cell_id: str, data: bytes) -> bool:
        return ray.get(self.handle.save_checkpoint.remote(cell_id, data))

    def load_checkpoint(self, cell_id: str, mark_in_flight: bool = False) -> bytes | None:
        return ray.get(self.handle.load_checkpoint.remote(cell_id, mark_in_flight))

    def save_weights(self, cell_id: str, data: bytes) -> str | None:
        return ray.get(self.handle.save_weights.remote(cell_id, data))

    def quarantine_checkpoint(self, cell_id: str, reason: str, mark_in_flight: bool = False) -> None:
        ray.get(self.handle.quarantine_checkpoint.remote(cell_id, reason, mark_in_flight))


def _driver_node_id() -> str:
    """The node on the driver's machine. Where several Ray nodes share the driver's address
    (nodes started side by side on one machine), the head node: the driver may have attached
    to any of them, and a worker node is the one a test (or an operator) may take away."""
    me = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    ip = next((n["NodeManagerAddress"] for n in nodes if n["NodeID"] == me), None)
    heads = [n["NodeID"] for n in nodes if n["NodeManagerAddress"] == ip
             and "node:__internal_head__" in n.get("Resources", {})]
    return heads[0] if heads else me


def on_driver_node() -> NodeAffinitySchedulingStrategy:
    """Where the driver's own actors go (files, the stop flag): on the node that lives as
    long as the study does. Anywhere else, losing a worker node would take them with it and
    fail every cell that asks them something."""
    return NodeAffinitySchedulingStrategy(node_id=_driver_node_id(), soft=False)


def start_driver_files(results_dir: str, where: NodeAffinitySchedulingStrategy | None = None):
    """The files actor, on the driver's node (`where`: on_driver_node(), if already asked)."""
    return ray.remote(DriverFiles).options(
        num_cpus=0, max_restarts=-1, max_task_retries=-1,
        scheduling_strategy=where or on_driver_node(),
    ).remote(results_dir)


def trial_files(handle, results_dir: str):
    """Where a trial reads and writes its checkpoints and weights: through the driver's
    actor (`handle`) on a cluster; straight into the results folder on the Ray this driver
    started on its own machine (handle None: one node, the trial runs where the folder is;
    no actor round trips)."""
    return _RemoteFiles(handle) if handle is not None else Store(results_dir)
