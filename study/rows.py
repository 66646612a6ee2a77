"""A cell's row in the store, built in one place whether the cell finished, diverged or failed.

Torch-free: the trial function builds rows on the worker, and the Ray driver builds the row of a
trial whose worker died (executors.ray_tune.StoreCallback) without importing torch.
"""
from __future__ import annotations

import datetime as dt
import sys
from importlib import metadata

from . import __version__


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def torch_version() -> str | None:
    """The torch this process trains with, or the installed one where it never imported it
    (the driver): the same string either way, without importing torch for it."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.__version__
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def cell_row(cell: dict, result: dict, *, study: str, attempts: int, started_at: dt.datetime,
             host: str | None, node_id: str | None = "", device: str | None = None) -> dict:
    """The store row of one cell: its config, what training returned (`result`: status,
    error, metrics...) and where and when it ran. `cell` is `Cell.to_dict()`'s form; `device`
    fills in only where `result` has none."""
    row = {**cell["config"], **result, "cell_id": cell["cell_id"], "pair_key": cell["pair_key"],
           "study": study, "attempts": attempts, "started_at": started_at,
           "finished_at": now(), "host": host,
           "node_id": node_id, "torch_version": torch_version(),
           "project_version": __version__}
    row.setdefault("device", device)
    row.setdefault("group_size", 1)  # trained alone, unless a fused group says otherwise
    row.setdefault("fused_group", None)
    return row


def failed_result(error: str | None, epochs_done: int = 0) -> dict:
    """What a cell that never finished contributes to its row."""
    return {"status": "failed", "error": error, "epochs_done": epochs_done}
