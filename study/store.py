"""The Parquet results store: one folder per study.

Layout of a results folder DIR:
    trials/merged-<seq>.parquet  finished cells, one row each (schema.TRIALS), sorted by cell_id
    trials/<cell_id>.parquet     a cell landed since the last compaction (one row)
    epochs/merged-<seq>.parquet  one row per epoch of the cells of trials/merged-<seq>
    epochs/<cell_id>.parquet     the epochs of a cell landed since the last compaction
    spec.toml                    the spec the study runs (saved at the first run)
    study.json                   name, creation time, where the spec came from
    cells.parquet                the spec's cell ids (a cache: enumerating 100,000 cells takes
                                 seconds; keyed by the spec's text and the sweep code)
    checkpoints/<cell_id>.pt     per-epoch checkpoints of cells in flight (removed when the row lands)
    weights/<cell_id>.pt         final weights, when the spec says save_weights = true
    quarantine/                  files that could not be read, moved aside with a note
    driver.lock                  held by the one `study run` driving this folder
    .live/manifest.json          the files live readers open (study.live): second names in
                                 .live/trials/, .live/epochs/ of the files above, kept a
                                 while once replaced

Reading it yourself: every row of the study is in `DIR/trials/*.parquet` and every epoch in
`DIR/epochs/*.parquet` (files being written are hidden `.*.tmp` names the glob skips), each
cell exactly once when no compaction is under way, e.g. DuckDB
`read_parquet('DIR/trials/*.parquet', union_by_name=true)`, Polars
`pl.read_parquet('DIR/trials/*.parquet')`, pandas `pd.read_parquet('DIR/trials')`. While a
study runs, read the files `study.live.live_files(DIR)` lists instead (`read_*(live=True)`
here): each cell once, and no file removed under the read.

Landing a cell writes its two parts, each to a temporary name renamed into place: a crash never
leaves a half-written file, and a re-run of a cell replaces its part atomically. The driver
compacts as it runs (every COMPACT_EVERY_PARTS parts or COMPACT_EVERY_S seconds, at once when a
landed cell replaces a row of a merged file, and at the end of a run): it writes new merged
files (at most MERGED_MAX_CELLS cells each, the trials and epochs files of one cell under the
same <seq>) holding the parts and the merged files they touch, renames them into place, and
only then removes what they replace. So a cell is on disk twice only in the instant between
those renames and removals (or after a crash in it), and a reader that meets a cell twice keeps
the newest copy: a part beats any merged file (a part is only ever written after the merged
rows it replaces), a higher <seq> beats a lower one (seqs only grow, and a compaction's outputs
get seqs above every file it reads). The next compaction removes such leftovers. An unreadable
file is moved to quarantine/ by the driver (a damaged trials file takes its epochs file with
it: those cells run again). No torch or ray here.
"""
from __future__ import annotations

import bisect
import datetime as dt
import errno
import json
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from . import live, schema
from .atomic import atomic_write_bytes, atomic_write_table
from .atomic import atomic_write_text as _atomic_write_text

MERGED_PREFIX = "merged-"
COMPACT_EVERY_PARTS = 256  # loose parts that trigger a compaction
COMPACT_EVERY_S = 30.0  # ... or the age of the oldest loose part
MERGED_MAX_CELLS = 2000  # bounds the cost of rewriting one merged file for a re-run cell
EPOCHS_ROW_GROUP = 1024  # small row groups (~20 cells): the curves of a few cells read a few
_PART_RANK = 1 << 62  # a part beats every merged file
_EXTRA_RANK = _PART_RANK + 1  # rows handed to write_results beat everything on disk


class StoreError(RuntimeError):
    """A problem with the results folder; the message is one line that says what to do."""


def _atomic_write_table(table: pa.Table, path: Path, **write_kw) -> None:
    try:
        atomic_write_table(path, table, fsync=True, **write_kw)
    except OSError as e:
        raise StoreError(_os_message(e, path)) from None


def _atomic_write_bytes(path: Path, data: bytes) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        return True
    except OSError:
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
    """study.atomic's text writer, its OSError as a StoreError with a one-line message."""
    try:
        _atomic_write_text(path, text)
    except OSError as e:
        raise StoreError(_os_message(e, path)) from None


@dataclass
class ReadReport:
    bad_parts: list[str] = field(default_factory=list)  # "path: reason"
    bad_files: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason)

    def add(self, path: Path, reason: str) -> None:
        self.bad_parts.append(f"{path}: {reason}")
        self.bad_files.append((Path(path), reason))


class _Vanished(Exception):
    """A file listed a moment ago is gone: a compaction replaced it; list again."""


def merged_seq(name: str) -> int | None:
    """<seq> of a merged file's name, None for a part."""
    if name.startswith(MERGED_PREFIX) and name.endswith(".parquet"):
        digits = name[len(MERGED_PREFIX):-len(".parquet")]
        if digits.isdigit():
            return int(digits)
    return None


def _listing(folder: Path) -> tuple[list[Path], dict[int, Path]]:
    """(parts, {seq: merged file}) of a trials/ or epochs/ folder."""
    parts, merged = [], {}
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith(".") or not e.name.endswith(".parquet"):
                    continue
                seq = merged_seq(e.name)
                if seq is None:
                    parts.append(Path(e.path))
                else:
                    merged[seq] = Path(e.path)
    except (FileNotFoundError, NotADirectoryError):
        pass  # no store there (yet): nothing to read
    return sorted(parts), dict(sorted(merged.items()))


def _name_stem(p: Path) -> str:
    """A part's cell id: its name up to the first dot (`<cell_id>.parquet`, or a live
    reader's second name `<cell_id>.<tag>.parquet`)."""
    return p.name.split(".", 1)[0]


def _live_listing(root: Path, table: str) -> tuple[list[Path], dict[int, Path]] | None:
    """(parts, {seq: merged file}) as the live manifest lists them (their second names under
    .live/), or None where no manifest was published (a store from before manifests)."""
    m = live.read_manifest(root)
    if m is None:
        return None
    parts, merged = [], {}
    for e in m[table]:
        seq = merged_seq(e["name"]) if e.get("name") else None
        if seq is not None:
            merged[seq] = root / e["file"]
        else:  # a part, or the empty file of a table without rows
            parts.append(root / e["file"])
    return sorted(parts), dict(sorted(merged.items()))


def _is_cell_id(stem: str) -> bool:
    return len(stem) == 16 and all(c in "0123456789abcdef" for c in stem)


def _conform_table(t: pa.Table, sch: pa.Schema, cols: list[str]) -> pa.Table:
    """Exactly `cols` of `sch`, in order; columns an older writer did not have read as nulls."""
    if "cell_id" not in t.column_names:
        raise ValueError("missing columns ['cell_id']")
    out = []
    for c in cols:
        f = sch.field(c)
        out.append(t[c].cast(f.type) if c in t.column_names else pa.nulls(len(t), f.type))
    return pa.Table.from_arrays(out, schema=pa.schema([sch.field(c) for c in cols]))


def _reason(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _read_merged(path: Path, sch: pa.Schema, cols: list[str], ids: list[str] | None) -> pa.Table:
    """One merged file; with `ids` (sorted), only the row groups whose cell_id range can hold
    one of them (merged files are sorted by cell_id), then only their rows."""
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        have = [c for c in cols if c in names]
        if ids is None:
            t = pf.read(columns=have, use_threads=False)
        else:
            md = pf.metadata
            ci = names.index("cell_id")
            groups = []
            for i in range(md.num_row_groups):
                st = md.row_group(i).column(ci).statistics
                if st is None or not st.has_min_max:
                    groups.append(i)
                    continue
                j = bisect.bisect_left(ids, st.min)
                if j < len(ids) and ids[j] <= st.max:
                    groups.append(i)
            if not groups:
                return _conform_table(pf.schema_arrow.empty_table(), sch, cols)
            t = pf.read_row_groups(groups, columns=have, use_threads=False)
            t = t.filter(pc.is_in(t["cell_id"], value_set=pa.array(ids, pa.string())))
        return _conform_table(t, sch, cols)
    except FileNotFoundError:
        raise _Vanished() from None


def _newest(sources: list[tuple[int, pa.Table]]) -> list[tuple[int, pa.Table]]:
    """Keep each cell's rows from its highest-ranked source only. Fast when no cell repeats."""
    sources = sorted(sources, key=lambda s: -s[0])
    uniq = [pc.unique(t["cell_id"]) for _, t in sources]
    n = sum(len(u) for u in uniq)
    if n == 0 or len(sources) < 2:
        return sources
    every = pa.chunked_array(uniq, pa.string())
    if pc.count_distinct(every).as_py() == n:
        return sources
    out, seen = [], None
    for (rank, t), u in zip(sources, uniq):
        if seen is not None and len(t):
            t = t.filter(pc.invert(pc.is_in(t["cell_id"], value_set=seen)))
        out.append((rank, t))
        seen = u if seen is None else pa.concat_arrays([seen, u.cast(pa.string())])
    return out


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
        self.cells_path = self.root / "cells.parquet"
        self.lock_path = self.root / "driver.lock"
        # The driver's view of trials/merged-*: seq -> its cells (built on first need, kept
        # up to date by this object's own compactions; only the lock holder compacts).
        self._merged: dict[int, set[str]] | None = None
        self._in_merged: set[str] | None = None  # their union; None: stale, or a cell repeats
        self._published = False  # by this object: its first publish also sweeps crash leftovers
        self._loose: int | None = None  # parts landed since the last compaction
        self._loose_since: float | None = None
        self.notes: list[str] = []  # files a compaction had to quarantine

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
        meta.setdefault("study_id", uuid.uuid4().hex)  # made once: a study is its folder
        meta.update({"name": name, "origin": origin, "updated_at": _now().isoformat()})
        atomic_write_text(self.meta_path, json.dumps(meta, indent=2) + "\n")

    def save_cell_ids(self, source: str, cell_ids: list[str]) -> None:
        """Cache the cell ids of the spec `source` (the driver, after enumerating them)."""
        table = pa.table({"cell_id": pa.array(cell_ids, pa.string())})
        table = table.replace_schema_metadata({"spec_key": _spec_key(source)})
        _atomic_write_table(table, self.cells_path)

    def cached_cell_ids(self, source: str) -> list[str] | None:
        """The cell ids of spec `source` in grid order, if cached for this very text and
        sweep code; None otherwise."""
        try:
            pf = pq.ParquetFile(self.cells_path)
            meta = pf.schema_arrow.metadata or {}
            if meta.get(b"spec_key", b"").decode() != _spec_key(source):
                return None
            return pf.read(columns=["cell_id"])["cell_id"].to_pylist()
        except (OSError, ValueError, KeyError, pa.ArrowException):
            return None

    def meta(self) -> dict:
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return {}

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
        if self._loose is not None:
            self._loose += 1
        if self._loose_since is None:
            self._loose_since = time.monotonic()
        # The row is safely in place: the cell's checkpoint has done its job.
        self.checkpoint_path(cell_id).unlink(missing_ok=True)
        self.publish()

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
        trials = _conform_table(trials, schema.TRIALS, schema.TRIAL_COLUMNS)
        epochs = _conform_table(epochs, schema.EPOCHS, schema.EPOCH_COLUMNS)
        if pc.count_distinct(trials["cell_id"]).as_py() != len(trials):
            raise ValueError("write_tables: a cell appears twice in `trials`")
        parts = sorted({p.stem for p in _listing(self.trials_dir)[0]}
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

    def quarantine_checkpoint(self, cell_id: str, reason: str, mark_in_flight: bool = False) -> None:
        """Move a checkpoint the trainer refused (unreadable, or not plain tensors and
        containers) to quarantine/ with a note; the cell restarts from its first epoch, and
        with mark_in_flight keeps its zero-byte in-flight marker."""
        path = self.checkpoint_path(cell_id)
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        dest = self.quarantine_dir / f"checkpoints-{cell_id}-{_now().strftime('%Y%m%dT%H%M%S')}.pt"
        try:
            os.replace(path, dest)
        except FileNotFoundError:
            return
        _atomic_write_text(dest.with_suffix(".reason.txt"), reason + "\n")
        if mark_in_flight:
            try:
                path.touch()
            except OSError:
                pass

    def save_weights(self, cell_id: str, data: bytes) -> str | None:
        """The final weights; returns their path relative to the results folder, or None."""
        path = self.weights_path(cell_id)
        return str(path.relative_to(self.root)) if _atomic_write_bytes(path, data) else None

    def remove_empty_checkpoints_dir(self) -> None:
        try:
            self.checkpoints_dir.rmdir()  # only when empty: in-flight checkpoints stay
        except OSError:
            pass

    def in_flight(self, done: Iterable[str] | None = None) -> list[str]:
        """Cells with a checkpoint but no row: started, not finished. `done`: the cells with
        a row, when the caller has read them already."""
        if not self.checkpoints_dir.is_dir():
            return []
        ckpts = [p.stem for p in self.checkpoints_dir.glob("*.pt")]
        if not ckpts:
            return []
        done = self.cell_ids() if done is None else set(done)
        return sorted(c for c in ckpts if c not in done)

    # -- compaction (the driver's, under the lock) ------------------------------------------
    def maybe_compact(self, cell_id: str | None = None) -> bool:
        """Called after each landed cell: compact when enough parts wait, when the oldest has
        waited long enough, or at once when `cell_id` replaced a row of a merged file (so
        that other tools' readers do not see the cell twice)."""
        if self._loose is None:
            self._loose = len(_listing(self.trials_dir)[0])
        due = (self._loose >= COMPACT_EVERY_PARTS
               or (self._loose and self._loose_since is not None
                   and time.monotonic() - self._loose_since >= COMPACT_EVERY_S))
        if not due and cell_id is not None:
            due = any(cell_id in cells for cells in self._merged_index().values())
        if due:
            self.compact()
        return bool(due)

    def compact(self) -> None:
        """Merge every part (and every merged file one of them supersedes) into merged files;
        remove what a killed compaction left half-written (the driver, under the lock)."""
        for d in (self.trials_dir, self.epochs_dir):
            for tmp in d.glob(f".{MERGED_PREFIX}*.tmp") if d.is_dir() else ():
                tmp.unlink(missing_ok=True)
        self._compact()

    def _merged_index(self) -> dict[int, set[str]]:
        if self._merged is None:
            index = {}
            for seq, path in _listing(self.trials_dir)[1].items():
                try:
                    index[seq] = set(pq.read_table(path, columns=["cell_id"])["cell_id"].to_pylist())
                except FileNotFoundError:
                    continue
                except (OSError, ValueError, pa.ArrowException) as e:
                    self._quarantine(path, _reason(e))
                    self.notes.append(f"{path}: {_reason(e)}")
            self._merged = index
        return self._merged

    def _compact(self, extra: tuple[pa.Table, pa.Table] | None = None) -> None:
        tparts, tmerged = _listing(self.trials_dir)
        eparts, emerged = _listing(self.epochs_dir)
        index = self._merged_index()
        tmerged = {s: p for s, p in tmerged.items() if s in index}  # quarantined ones are gone
        seen: dict[str, int] = {}
        repeated: set[int] = set()  # merged files sharing a cell: a crash mid-compaction
        for seq, cells in index.items():
            for c in cells:
                if c in seen:
                    repeated.update((seq, seen[c]))
                seen[c] = seq
        orphans = set(emerged) - set(tmerged)  # epochs whose trials file is gone
        if not (tparts or eparts or extra or repeated or orphans):
            self._loose, self._loose_since = 0, None
            self.publish()  # retire and remove what waited out its window
            return
        stats = {p: _stat(p) for p in tparts + eparts}
        rep = ReadReport()
        t_parts = self._read_parts(tparts, schema.TRIALS, schema.TRIAL_COLUMNS, None, True, rep)
        e_parts = self._read_parts(eparts, schema.EPOCHS, schema.EPOCH_COLUMNS, None, True, rep)
        new_cells = set(pc.unique(t_parts["cell_id"]).to_pylist())
        if extra is not None:
            new_cells |= set(pc.unique(extra[0]["cell_id"]).to_pylist())
        inputs = {s for s, cells in index.items() if cells & new_cells} | repeated
        open_files = [(len(cells), s) for s, cells in index.items()
                      if len(cells) < MERGED_MAX_CELLS]
        if open_files:
            inputs.add(min(open_files)[1])  # fill the smallest file rather than add one more
        inputs |= orphans
        t_sources: list[tuple[int, pa.Table]] = [(_PART_RANK, t_parts)]
        e_by_rank: dict[int, pa.Table] = {_PART_RANK: e_parts}
        if extra is not None:
            t_sources.append((_EXTRA_RANK, extra[0]))
            e_by_rank[_EXTRA_RANK] = extra[1]
        done_inputs = []
        for seq in sorted(inputs):
            tpath, epath = tmerged.get(seq), emerged.get(seq)
            try:
                t = (_read_merged(tpath, schema.TRIALS, schema.TRIAL_COLUMNS, None) if tpath
                     else schema.TRIALS.empty_table())
            except _Vanished:
                continue
            except (OSError, ValueError, pa.ArrowException) as e:
                self._quarantine(tpath, _reason(e))
                self.notes.append(f"{tpath}: {_reason(e)}")
                continue
            e_t = schema.EPOCHS.empty_table()
            if epath:
                try:
                    e_t = _read_merged(epath, schema.EPOCHS, schema.EPOCH_COLUMNS, None)
                except _Vanished:
                    pass
                except (OSError, ValueError, pa.ArrowException) as e:
                    self._quarantine(epath, _reason(e))
                    self.notes.append(f"{epath}: {_reason(e)}")
            t_sources.append((seq, t))
            e_by_rank[seq] = e_t
            done_inputs.append(seq)
        self.notes += rep.bad_parts
        # A cell's epochs come from the same source as its winning trial row: a curve never
        # outlives or mismatches its row (an epochs part left by a crash before its trial part
        # landed is dropped; the cell is in flight and runs again).
        kept = _newest(t_sources)
        trials = pa.concat_tables([t for _, t in kept]).sort_by("cell_id")
        epochs = []
        for rank, t in kept:
            e_t = e_by_rank.get(rank)
            if e_t is not None and len(e_t) and len(t):
                epochs.append(e_t.filter(pc.is_in(e_t["cell_id"], value_set=t["cell_id"].combine_chunks())))
        epochs = (pa.concat_tables(epochs).sort_by([("cell_id", "ascending"), ("epoch", "ascending")])
                  if epochs else schema.EPOCHS.empty_table())
        # Write every output before removing any input: at any instant each landed row is in
        # some file, and the newest copy of a cell is in the highest-ranked file holding it.
        seq = max([*index, *tmerged, *emerged, 0]) + 1
        outputs: dict[int, set[str]] = {}
        ids = trials["cell_id"].to_pylist()
        for lo in range(0, len(ids), MERGED_MAX_CELLS):
            chunk = ids[lo:lo + MERGED_MAX_CELLS]
            t = trials.slice(lo, len(chunk))
            e_t = epochs.filter(pc.is_in(epochs["cell_id"], value_set=pa.array(chunk, pa.string())))
            if len(e_t):
                _atomic_write_table(e_t, self.epochs_dir / f"{MERGED_PREFIX}{seq:08d}.parquet",
                                    row_group_size=EPOCHS_ROW_GROUP)
            _atomic_write_table(t, self.trials_dir / f"{MERGED_PREFIX}{seq:08d}.parquet")
            outputs[seq] = set(chunk)
            seq += 1
        live.pause_for_test("before_removal")
        for p in tparts + eparts:
            if p.exists() and _stat(p) == stats.get(p):  # a part rewritten meanwhile is newer
                p.unlink(missing_ok=True)
        for s in done_inputs:
            for path in (tmerged.get(s), emerged.get(s)):
                if path is not None:
                    path.unlink(missing_ok=True)
            index.pop(s, None)
        index.update(outputs)
        self._in_merged = None
        self._loose, self._loose_since = 0, None
        self.publish(compaction=True)

    def publish(self, compaction: bool = False) -> bool:
        """Publish the files on disk to live readers (study.live), unless a cell is in two of
        them right now (a re-landed cell before its compaction, a crashed compaction's
        leftovers): then readers keep the previous list until the compaction that follows.
        The driver's, under the lock. `compaction`: called as a compaction's last step."""
        in_merged = self._in_merged
        if in_merged is None:
            index = self._merged_index()
            in_merged = set().union(*index.values())
            if len(in_merged) != sum(map(len, index.values())):
                return False  # not cached: the compaction that must follow fixes it
            self._in_merged = in_merged
        for d in (self.trials_dir, self.epochs_dir):
            if any(_name_stem(p) in in_merged for p in _listing(d)[0]):
                return False
        try:
            live.publish(self.root, {"trials": schema.TRIALS, "epochs": schema.EPOCHS},
                         pause=live.pause_for_test if compaction else None,
                         sweep=not self._published)
        except OSError as e:
            raise StoreError(_os_message(e, live.manifest_path(self.root))) from None
        self._published = True
        return True

    # -- reading ----------------------------------------------------------------------------
    @staticmethod
    def part_ids(folder: Path, live: bool = False) -> set[str]:
        """The cells with rows in `folder` (trials/ or epochs/), merged or not (`live`: as
        the live manifest lists them, see read_trials)."""
        folder = Path(folder)
        sch = schema.EPOCHS if folder.name == "epochs" else schema.TRIALS
        store = Store(folder.parent)
        t = store._read(folder, sch, ["cell_id"], None, False, None, live)
        return set(pc.unique(t["cell_id"]).to_pylist())

    def cell_ids(self) -> set[str]:
        """The cells that have a trial row."""
        return self.part_ids(self.trials_dir)

    def _read_parts(self, parts: list[Path], sch: pa.Schema, cols: list[str],
                    ids: set[str] | None, quarantine: bool, report: ReadReport | None) -> pa.Table:
        if ids is not None:  # a part of ours is named by its cell; others may hold any cell
            parts = [p for p in parts if _name_stem(p) in ids or not _is_cell_id(_name_stem(p))]
        if not parts:
            return pa.schema([sch.field(c) for c in cols]).empty_table()
        filt = pc.field("cell_id").isin(sorted(ids)) if ids is not None else None
        try:
            # One multi-threaded scan (up to thousands of one-row parts). Columns a part lacks
            # (written before the schema grew) read as nulls.
            return (ds.dataset([str(p) for p in parts], schema=sch, format="parquet")
                    .to_table(columns=cols, filter=filt))
        except FileNotFoundError:
            raise _Vanished() from None
        except (OSError, ValueError, pa.ArrowException):
            pass  # some part is damaged or vanished: find out which, part by part
        tables = []
        for part in parts:
            try:
                t = pq.read_table(part)
                if filt is not None:
                    t = t.filter(pc.is_in(t["cell_id"], value_set=pa.array(sorted(ids), pa.string())))
                tables.append(_conform_table(t, sch, cols))
            except FileNotFoundError:
                raise _Vanished() from None
            except (OSError, ValueError, KeyError, pa.ArrowException) as e:
                if report is not None:
                    report.add(part, _reason(e))
                if quarantine:
                    self._quarantine(part, _reason(e))
        if not tables:
            return pa.schema([sch.field(c) for c in cols]).empty_table()
        return pa.concat_tables(tables)

    def _read(self, folder: Path, sch: pa.Schema, columns: Iterable[str] | None,
              cell_ids: Iterable[str] | None, quarantine: bool,
              report: ReadReport | None, live_read: bool = False) -> pa.Table:
        cols = list(sch.names) if columns is None else list(dict.fromkeys(columns))
        unknown = [c for c in cols if c not in sch.names]
        if unknown:
            raise KeyError(f"columns not in the store schema: {unknown}")
        rcols = cols if "cell_id" in cols else ["cell_id", *cols]
        ids = None if cell_ids is None else sorted(set(cell_ids))
        for attempt in range(5):
            rep = ReadReport()
            try:
                t = self._read_once(folder, sch, rcols, ids, rep, live_read)
            except _Vanished:
                if attempt < 4:
                    continue  # a compaction replaced files we listed: list again
                raise StoreError(f"{folder} keeps changing under this reader; try again") from None
            for path, reason in rep.bad_files:
                if path.parent.parent.name == live.LIVE_DIR:  # a second name: say the store's
                    path = folder / f"{_name_stem(path)}.parquet"
                if report is not None:
                    report.add(path, reason)
                if quarantine:
                    self._quarantine(path, reason)
            return t.select(cols)
        raise AssertionError("unreachable")

    def _read_once(self, folder: Path, sch: pa.Schema, cols: list[str], ids: list[str] | None,
                   report: ReadReport, live_read: bool = False) -> pa.Table:
        listed = _live_listing(self.root, folder.name) if live_read else None
        parts, merged = _listing(folder) if listed is None else listed
        idset = None if ids is None else set(ids)
        ptable = self._read_parts(parts, sch, cols, idset, False, report)
        sources = [(_PART_RANK, _conform_table(ptable, sch, cols))]

        def one(item):
            seq, path = item
            try:
                return seq, _read_merged(path, sch, cols, ids), None
            except _Vanished:
                return seq, None, "vanished"
            except (OSError, ValueError, pa.ArrowException) as e:
                return seq, None, _reason(e)

        items = list(merged.items())
        if len(items) > 1:
            with ThreadPoolExecutor(min(8, len(items))) as pool:
                results = list(pool.map(one, items))
        else:
            results = [one(i) for i in items]
        for seq, t, err in results:
            if err == "vanished":
                raise _Vanished()
            if err is not None:
                report.add(merged[seq], err)
                continue
            sources.append((seq, t))
        kept = [t for _, t in _newest(sources) if len(t)]
        if not kept:
            return pa.schema([sch.field(c) for c in cols]).empty_table()
        return pa.concat_tables(kept) if len(kept) > 1 else kept[0]

    def check_epochs(self, quarantine: bool = False) -> list[str]:
        """Footers of the epochs files (cheap: no data read); unreadable ones are listed and,
        with `quarantine`, moved aside (their cells keep their rows, not their curves)."""
        parts, merged = _listing(self.epochs_dir)
        bad = []
        for path in parts + list(merged.values()):
            try:
                pq.read_metadata(path)
            except FileNotFoundError:
                continue
            except (OSError, ValueError, pa.ArrowException) as e:
                bad.append(f"{path}: {_reason(e)}")
                if quarantine:
                    self._quarantine(path, _reason(e))
        return bad

    def quarantine_bad(self, report: ReadReport) -> None:
        """Move aside the files a read found unreadable (the driver, under the lock)."""
        for path, reason in report.bad_files:
            if path.exists():
                self._quarantine(path, reason)

    def _quarantine(self, part: Path, reason: str) -> None:
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        stamp = _now().strftime("%Y%m%dT%H%M%S")
        dest = self.quarantine_dir / f"{part.parent.name}-{part.stem}-{stamp}.parquet"
        try:
            os.replace(part, dest)
        except FileNotFoundError:
            return
        _atomic_write_text(dest.with_suffix(".reason.txt"), reason + "\n")
        if part.parent == self.trials_dir:
            # Its epochs belong to rows we no longer trust: those cells re-run and rewrite them.
            twin = self.epochs_dir / part.name
            if merged_seq(part.name) is None:
                twin.unlink(missing_ok=True)
            elif twin.exists():
                edest = self.quarantine_dir / f"epochs-{part.stem}-{stamp}.parquet"
                os.replace(twin, edest)
                _atomic_write_text(
                    edest.with_suffix(".reason.txt"),
                    f"the trial rows of these epochs were in {part}, which is unreadable: {reason}\n")
            self._merged = self._in_merged = None  # rebuilt on next need

    def read_trials(self, quarantine: bool = False, report: ReadReport | None = None,
                    columns: Iterable[str] | None = None,
                    cell_ids: Iterable[str] | None = None, live: bool = False) -> pd.DataFrame:
        """Trial rows (each cell once, its newest row); `columns`/`cell_ids` read only those.
        `live`: read the files of the live manifest (study.live), as every reader but the
        driver does: a compaction running meanwhile never removes a file under the read."""
        return self._read(self.trials_dir, schema.TRIALS, columns, cell_ids, quarantine,
                          report, live).to_pandas()

    def read_epochs(self, quarantine: bool = False, report: ReadReport | None = None,
                    columns: Iterable[str] | None = None,
                    cell_ids: Iterable[str] | None = None, live: bool = False) -> pd.DataFrame:
        """Epoch rows (each cell's from one file, the newest); `cell_ids` reads only the row
        groups that can hold those cells; `live` as in read_trials."""
        return self._read(self.epochs_dir, schema.EPOCHS, columns, cell_ids, quarantine,
                          report, live).to_pandas()


def _spec_key(source: str) -> str:
    """The spec's text and the code that turns it into cell ids (a new sweep version may
    hash differently: its cache is not reused)."""
    import hashlib

    import sweep
    h = hashlib.sha256(source.encode())
    for name in ("spec.py", "params.py"):
        try:
            h.update((Path(sweep.__file__).parent / name).read_bytes())
        except OSError:
            h.update(name.encode())
    return h.hexdigest()


def _stat(p: Path):
    try:
        s = p.stat()
        return (s.st_ino, s.st_mtime_ns, s.st_size)
    except OSError:
        return None


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
