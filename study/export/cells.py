"""The cells both trackers export, read from the store or taken as the driver lands them, and
what goes where: the schema's columns as params, tags, histories and finals, and run names."""
from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa

from .. import schema
from ..store import Store

# -- what goes where, from the schema (a renamed column is exported under its new name) -----
_TEXT = (pa.types.is_string, pa.types.is_timestamp)
PARAMS = list(schema.PARAM_COLUMNS)
# Text columns of a trial row, as tags; `architecture` (a param) is a tag too, to filter by.
TAGS = ["architecture"] + [f.name for f in schema.TRIAL_FIELDS
                           if f.name not in PARAMS and any(t(f.type) for t in _TEXT)]
# Per-epoch scalars, step = epoch; an epoch's wall_s (training time so far) is each point's
# timestamp. TensorBoard's event files are cheap: it gets them all. MLflow gets the loss and
# accuracy curves only: each value costs its SQL store Python time, and train_s as a fifth
# curve made the paper store's export 13% slower (607 s against 536 s on 2 cores).
TB_SCALARS = [c for c in schema.EPOCH_COLUMNS if c not in ("cell_id", "epoch", "wall_s")]
HISTORY = [c for c in TB_SCALARS if c != "train_s"]
# Numbers of the trial row; those that share an epoch column's name get a "final_" prefix (a
# final full evaluation is not one more point of the epoch curve).
FINALS = {f.name: (f"final_{f.name}" if f.name in schema.EPOCH_COLUMNS else f.name)
          for f in schema.TRIAL_FIELDS
          if f.name not in PARAMS and (pa.types.is_floating(f.type) or pa.types.is_integer(f.type))}
STUDY_ID_TAG = "study_id"


# -- the cells, from the store or as they land ----------------------------------------------
@dataclass
class Cell:
    row: dict  # the trial row, python values (timestamps as aware datetimes)
    epochs: dict[str, np.ndarray]  # epoch column -> values, sorted by epoch

    @property
    def cell_id(self) -> str:
        return self.row["cell_id"]

    @property
    def finished(self) -> str:
        """The row's identity for re-runs: a re-run cell lands with a new finished_at."""
        return _iso(self.row.get("finished_at"))


def cell_from_rows(row: dict, epochs: list[dict]) -> Cell:
    """A landed cell as the driver holds it (runner.land's row and epoch dicts)."""
    epochs = sorted(epochs, key=lambda e: e["epoch"])
    cols = {c: np.array([e.get(c) for e in epochs], dtype=float if c != "cell_id" else object)
            for c in schema.EPOCH_COLUMNS if c != "cell_id"}
    return Cell(dict(row), cols)


def store_cells(store: Store) -> Iterator[Cell]:
    """Every cell of the store with its epochs (one read of each table)."""
    trials = store.read_table("trials")
    epochs = store.read_table("epochs")
    epochs = epochs.sort_by([("cell_id", "ascending"), ("epoch", "ascending")])
    ids = epochs["cell_id"].to_numpy(zero_copy_only=False)
    cols = {c: epochs[c].to_numpy(zero_copy_only=False).astype(float)
            for c in schema.EPOCH_COLUMNS if c != "cell_id"}
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.array([], int)
    bounds = {ids[s]: (s, e) for s, e in zip(starts, np.r_[starts[1:], len(ids)])}
    for row in trials.sort_by("cell_id").to_pylist():
        s, e = bounds.get(row["cell_id"], (0, 0))
        yield Cell(row, {c: v[s:e] for c, v in cols.items()})


def _iso(v) -> str:
    if v is None:
        return ""
    if isinstance(v, dt.datetime):
        return v.astimezone(dt.timezone.utc).isoformat()
    return str(v)


def _ms(v) -> int | None:
    return int(v.timestamp() * 1000) if isinstance(v, dt.datetime) else None


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and not math.isfinite(v))


# -- names -----------------------------------------------------------------------------------
def study_axes(store: Store) -> list[str]:
    """The parameters the study varies (besides architecture), in spec order: a run's name."""
    from sweep import parse_spec
    try:
        spec = parse_spec(store.spec_path.read_text(), origin=str(store.spec_path))
    except Exception:  # an unreadable spec only costs the names their settings
        return []
    names = [k.split(".", 1)[-1] for k in spec.axes()]
    return [n for n in dict.fromkeys(names) if n != "architecture"]


def run_name(row: dict, axes: list[str]) -> str:
    """Architecture and the settings that vary, e.g. 'parallel layers=2 lr=0.001'."""
    bits = [str(row.get("architecture"))]
    bits += [f"{k}={row[k]}" for k in axes if row.get(k) is not None]
    return " ".join(bits)


def safe_folder(name: str, cell_id: str) -> str:
    """A run name as one folder name: only [A-Za-z0-9._=+-], its cell_id last (unique)."""
    safe = re.sub(r"[^A-Za-z0-9._=+-]+", "_", name).strip("._")[:150]
    return f"{safe}__{cell_id}" if safe else cell_id


@dataclass
class ExportCounts:
    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    wall_s: float = 0.0
    where: str = ""
    artifacts: str = ""  # the experiment's artifact location (MLflow)
    notes: list[str] = field(default_factory=list)
