"""The Parquet results store: one folder per study.

Layout of a results folder DIR:
    trials/<cell_id>.parquet   one row per finished cell (schema.TRIALS)
    epochs/<cell_id>.parquet   one row per epoch of that cell (schema.EPOCHS)
    spec.toml                  the spec the study runs (saved at the first run)
    study.json                 name, creation time, where the spec came from
    checkpoints/<cell_id>.pt   per-epoch checkpoints of cells in flight (removed when the row lands)
    weights/<cell_id>.pt       final weights, when the spec says save_weights = true
    quarantine/                parts that could not be read, moved aside with a note
    driver.lock                held by the one `study run` driving this folder

One part per cell, written to a temporary name and renamed into place: a crash never leaves a
half-written part, a re-run of a cell replaces its row atomically, and so there is exactly one
row per cell by construction. No torch or ray here.
"""
from __future__ import annotations

import datetime as dt
import errno
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from . import schema


class StoreError(RuntimeError):
    """A problem with the results folder; the message is one line that says what to do."""


def _atomic_write_table(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise StoreError(_os_message(e, path)) from None
        raise


def _atomic_write_bytes(path: Path, data: bytes) -> bool:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False


def _os_message(e: OSError, path: Path) -> str:
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return (f"cannot write {path}: {os.strerror(e.errno)}; free some space and run the same "
                "command again (every row written so far is kept)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write {path}: {os.strerror(e.errno)}; choose a writable folder with "
                "--results or fix its permissions")
    return f"cannot write {path}: {e.strerror or e}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StoreError(_os_message(e, path)) from None


@dataclass
class ReadReport:
    bad_parts: list[str] = field(default_factory=list)  # "path: reason"


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.trials_dir = self.root / "trials"
        self.epochs_dir = self.root / "epochs"
        self.checkpoints_dir = self.root / "checkpoints"
        self.weights_dir = self.root / "weights"
        self.quarantine_dir = self.root / "quarantine"
        self.figures_dir = self.root / "figures"
        self.spec_path = self.root / "spec.toml"
        self.meta_path = self.root / "study.json"
        self.lock_path = self.root / "driver.lock"

    # -- creating ---------------------------------------------------------------------------
    def ensure_writable(self) -> None:
        """Create the folder tree, proving it is writable before any cell starts."""
        try:
            for d in (self.root, self.trials_dir, self.epochs_dir, self.checkpoints_dir):
                d.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError(_os_message(e, self.root)) from None
            raise StoreError(f"cannot write the results folder {self.root}: "
                             f"{e.strerror or e}; choose a writable folder with --results "
                             "or fix its permissions") from None

    def exists(self) -> bool:
        return self.spec_path.is_file()

    def save_spec(self, source: str, name: str, origin: str) -> None:
        atomic_write_text(self.spec_path, source)
        meta = self.meta()
        meta.setdefault("created_at", _now().isoformat())
        meta.update({"name": name, "origin": origin, "updated_at": _now().isoformat()})
        atomic_write_text(self.meta_path, json.dumps(meta, indent=2) + "\n")

    def meta(self) -> dict:
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return {}

    # -- writing results --------------------------------------------------------------------
    def write_result(self, row: dict, epochs: list[dict]) -> None:
        """Land one finished cell: epochs first, so a trial row always has its curve."""
        cell_id = row["cell_id"]
        for d in (self.trials_dir, self.epochs_dir):
            d.mkdir(parents=True, exist_ok=True)
        epochs_part = self.epochs_dir / f"{cell_id}.parquet"
        had_epochs = epochs_part.exists()
        _atomic_write_table(schema.conform(epochs, schema.EPOCHS), epochs_part)
        try:
            _atomic_write_table(schema.conform([row], schema.TRIALS),
                                self.trials_dir / f"{cell_id}.parquet")
        except BaseException:
            if not had_epochs:  # no row landed: leave no curve of an unfinished cell
                epochs_part.unlink(missing_ok=True)
            raise
        # The row is safely in place: the cell's checkpoint has done its job.
        self.checkpoint_path(cell_id).unlink(missing_ok=True)

    def checkpoint_path(self, cell_id: str) -> Path:
        return self.checkpoints_dir / f"{cell_id}.pt"

    def weights_path(self, cell_id: str) -> Path:
        return self.weights_dir / f"{cell_id}.pt"

    # -- checkpoints and weights, as bytes (the trial serialises; a Ray actor on the driver's
    # node calls these for trials on other nodes, so only the driver's machine holds them)
    def save_checkpoint(self, cell_id: str, data: bytes) -> bool:
        """Atomically replace the cell's checkpoint; False (nothing left behind) when the disk
        refuses: a checkpoint only saves time on a resume, so it must not fail the cell."""
        return _atomic_write_bytes(self.checkpoint_path(cell_id), data)

    def load_checkpoint(self, cell_id: str, mark_in_flight: bool = False) -> bytes | None:
        """The cell's checkpoint; with mark_in_flight, a cell without one gets an empty file,
        so `status` counts it running (or interrupted) before its first checkpoint."""
        path = self.checkpoint_path(cell_id)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            if mark_in_flight:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.touch()
                except OSError:
                    pass
            return None
        except OSError:
            return None

    def save_weights(self, cell_id: str, data: bytes) -> str | None:
        """The final weights; returns their path relative to the results folder, or None."""
        path = self.weights_path(cell_id)
        return str(path.relative_to(self.root)) if _atomic_write_bytes(path, data) else None

    def remove_empty_checkpoints_dir(self) -> None:
        try:
            self.checkpoints_dir.rmdir()  # only when empty: in-flight checkpoints stay
        except OSError:
            pass

    def in_flight(self) -> list[str]:
        """Cells with a checkpoint but no row: started, not finished."""
        if not self.checkpoints_dir.is_dir():
            return []
        done = self.part_ids(self.trials_dir)
        return sorted(p.stem for p in self.checkpoints_dir.glob("*.pt") if p.stem not in done)

    # -- reading ----------------------------------------------------------------------------
    @staticmethod
    def part_ids(folder: Path) -> set[str]:
        if not folder.is_dir():
            return set()
        return {p.stem for p in folder.glob("*.parquet")}

    def _read(self, folder: Path, sch: pa.Schema, quarantine: bool,
              report: ReadReport | None) -> pa.Table:
        parts = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
        if not parts:
            return sch.empty_table()
        try:
            # Fast path: one multi-threaded scan (thousands of one-row parts). Columns a
            # part lacks (written before the schema grew) read as nulls.
            return ds.dataset([str(p) for p in parts], schema=sch, format="parquet").to_table()
        except (OSError, ValueError, pa.ArrowException):
            pass  # some part is damaged or vanished: find out which, part by part
        tables = []
        for part in parts:
            try:
                t = pq.read_table(part)
                missing = {"cell_id"} - set(t.column_names)
                if missing:
                    raise ValueError(f"missing columns {sorted(missing)}")
                for f in sch:
                    if f.name not in t.column_names:
                        t = t.append_column(f, pa.nulls(len(t), f.type))
                tables.append(t.select(sch.names).cast(sch))
            except FileNotFoundError:
                continue  # replaced between listing and reading: a newer part is in place
            except (OSError, ValueError, pa.ArrowException) as e:
                reason = f"{part}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                if report is not None:
                    report.bad_parts.append(reason)
                if quarantine:
                    self._quarantine(part, reason)
        if not tables:
            return sch.empty_table()
        return pa.concat_tables(tables)

    def _quarantine(self, part: Path, reason: str) -> None:
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        stamp = _now().strftime("%Y%m%dT%H%M%S")
        dest = self.quarantine_dir / f"{part.parent.name}-{part.stem}-{stamp}.parquet"
        os.replace(part, dest)
        dest.with_suffix(".reason.txt").write_text(reason + "\n")
        if part.parent == self.trials_dir:
            # Its epochs belong to a row we no longer trust: the cell re-runs and rewrites them.
            (self.epochs_dir / part.name).unlink(missing_ok=True)

    def read_trials(self, quarantine: bool = False, report: ReadReport | None = None) -> pd.DataFrame:
        return self._read(self.trials_dir, schema.TRIALS, quarantine, report).to_pandas()

    def read_epochs(self, quarantine: bool = False, report: ReadReport | None = None) -> pd.DataFrame:
        return self._read(self.epochs_dir, schema.EPOCHS, quarantine, report).to_pandas()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# -- the driver lock ------------------------------------------------------------------------
def _proc_start(pid: int) -> str | None:
    """Process start time (clock ticks since boot): tells a live driver from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class DriverLock:
    """One driver per results folder. A lock whose process is gone (same host) or whose
    heartbeat is older than `stale_s` (another host) is stale and taken over."""

    def __init__(self, store: Store, stale_s: float = 120.0):
        self.path = store.lock_path
        self.stale_s = stale_s
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "proc_start": _proc_start(os.getpid()), "started_at": _now().isoformat()}
        self.held = False

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as stale below

    def is_stale(self, holder: dict) -> bool:
        if not holder or "pid" not in holder:
            return True
        if holder.get("host") == self.info["host"]:
            start = _proc_start(int(holder["pid"]))
            return start is None or (holder.get("proc_start") not in (None, start))
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return True
        return age > self.stale_s

    def acquire(self) -> dict | None:
        """Take the lock; returns the stale holder it took over from, if any."""
        taken_over = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue
                if not self.is_stale(holder):
                    raise StoreError(
                        f"results folder {self.path.parent} is in use by another driver (host "
                        f"{holder.get('host')}, pid {holder.get('pid')}, started "
                        f"{holder.get('started_at')}); wait for it to finish or stop it, "
                        "or use another --results folder")
                taken_over = holder
                self.path.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise StoreError(_os_message(e, self.path)) from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
            self.held = True
            return taken_over
        raise StoreError(f"could not take the lock {self.path}; remove it if no driver is running")

    def heartbeat(self) -> None:
        if self.held:
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self.held:
            holder = self.holder()
            if holder and holder.get("pid") == self.info["pid"] and holder.get("host") == self.info["host"]:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
