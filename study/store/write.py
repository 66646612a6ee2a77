"""The store's write side (the driver's, under the lock): creating the folder and its
metadata, and landing finished cells, one at a time as parts or many at once into merged
files. A part of Store. No torch or ray here.
"""
from __future__ import annotations

import errno
import json
import os
import time
import uuid
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from .. import schema
from ..rows import now
from .errors import StoreError, atomic_write_table, atomic_write_text, os_message
from .layout import Layout, listing, spec_key


def _ensure_dir(d: Path) -> None:
    """mkdir -p without Path.mkdir's stat of a folder that exists: a landing touches no file
    but its cell's."""
    try:
        os.mkdir(d)
    except FileExistsError:
        pass
    except FileNotFoundError:
        d.mkdir(parents=True, exist_ok=True)


class Writer(Layout):
    """What the driver writes; a landed cell is published to live readers and, landed in
    bulk, merged by the compactor (Compactor, in study.store.compact)."""

    # -- creating ---------------------------------------------------------------------------
    def ensure_writable(self) -> None:
        """Create the folder tree, proving it is writable before any cell starts."""
        try:
            for d in (self.root, self.trials_dir, self.epochs_dir):
                d.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError(os_message(e, self.root)) from None
            raise StoreError(f"cannot write the results folder {self.root}: "
                             f"{e.strerror or e}; choose a writable folder with --results "
                             "or fix its permissions") from None

    def save_spec(self, source: str, name: str, origin: str) -> None:
        atomic_write_text(self.spec_path, source)
        meta = self.meta()
        meta.setdefault("created_at", now().isoformat())
        meta.setdefault("study_id", uuid.uuid4().hex)  # made once: a study is its folder
        meta.update({"name": name, "origin": origin, "updated_at": now().isoformat()})
        atomic_write_text(self.meta_path, json.dumps(meta, indent=2) + "\n")

    def save_cell_ids(self, source: str, cell_ids: list[str]) -> None:
        """Cache the cell ids of the spec `source` (the driver, after enumerating them)."""
        table = pa.table({"cell_id": pa.array(cell_ids, pa.string())})
        table = table.replace_schema_metadata({"spec_key": spec_key(source)})
        atomic_write_table(self.cells_path, table)

    def study_id(self) -> str:
        """The study's id, made when it was created (two folders of one spec are two
        studies); a folder from before ids gets one on first need."""
        meta = self.meta()
        if not meta.get("study_id"):
            if not self.exists():
                raise StoreError(f"{self.root} holds no study (no spec.toml); run `study run "
                                 f"SPEC --results {self.root}` first")
            meta["study_id"] = uuid.uuid4().hex
            atomic_write_text(self.meta_path, json.dumps(meta, indent=2) + "\n")
        return meta["study_id"]

    # -- landing results ----------------------------------------------------------------------
    def write_result(self, row: dict, epochs: list[dict]) -> None:
        """Land one finished cell: epochs first, so a trial row always has its curve."""
        cell_id = row["cell_id"]
        for d in (self.trials_dir, self.epochs_dir):
            _ensure_dir(d)
        epochs_part = self.epochs_dir / f"{cell_id}.parquet"
        had_epochs = epochs_part.exists()
        atomic_write_table(epochs_part, schema.conform(epochs, schema.EPOCHS))
        try:
            atomic_write_table(self.trials_dir / f"{cell_id}.parquet",
                               schema.conform([row], schema.TRIALS))
        except BaseException:
            if not had_epochs:  # no row landed: leave no curve of an unfinished cell
                epochs_part.unlink(missing_ok=True)
            raise
        if self._loose is not None:
            self._loose += 1
        if self._loose_since is None:
            self._loose_since = time.monotonic()
        # The row is safely in place: the cell's checkpoint has done its job.
        self.checkpoint_path(cell_id).unlink(missing_ok=True)
        self.publish_landed(cell_id)

    def write_results(self, results: Iterable[tuple[dict, list[dict]]]) -> None:
        """Land many finished cells at once (rows and their epochs as dicts): see write_tables."""
        results = list(results)
        self.write_tables(schema.conform([r for r, _ in results], schema.TRIALS),
                          schema.conform([x for _, e in results for x in e], schema.EPOCHS))

    def write_tables(self, trials: pa.Table, epochs: pa.Table) -> None:
        """Land many finished cells at once, straight into merged files through the
        compaction's own writer (all of them or, at a crash, none). `trials`: one row per cell
        (schema.TRIALS), `epochs`: their epochs (schema.EPOCHS). A cell that has a part on
        disk lands through `write_result` instead, so that a part is never older than a
        merged copy of its cell."""
        trials = schema.conform(trials, schema.TRIALS)
        epochs = schema.conform(epochs, schema.EPOCHS)
        if pc.count_distinct(trials["cell_id"]).as_py() != len(trials):
            raise ValueError("write_tables: a cell appears twice in `trials`")
        parts = sorted({p.stem for p in listing(self.trials_dir)[0]}
                       & set(trials["cell_id"].to_pylist()))
        if parts:
            value_set = pa.array(parts, pa.string())
            for row in trials.filter(pc.is_in(trials["cell_id"], value_set=value_set)).to_pylist():
                self.write_result(row, epochs.filter(
                    pc.equal(epochs["cell_id"], row["cell_id"])).to_pylist())
            trials = trials.filter(pc.invert(pc.is_in(trials["cell_id"], value_set=value_set)))
        if len(trials):
            for d in (self.trials_dir, self.epochs_dir):
                d.mkdir(parents=True, exist_ok=True)
            self._compact(extra=(trials, epochs))
            if self.checkpoints_dir.is_dir():
                for cid in trials["cell_id"].to_pylist():
                    self.checkpoint_path(cid).unlink(missing_ok=True)
