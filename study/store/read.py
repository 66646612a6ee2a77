"""The store's read side: the newest-copy rule, reading parts and merged files, and
StoreReader, the class every reader opens a results folder with (analysis, `study status`,
export); Store adds the driver's writes to it. No torch or ray here.
"""
from __future__ import annotations

import bisect
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .. import live, schema
from .errors import StoreError
from .layout import Layout, is_cell_id, listing, merged_seq, name_stem

# The newest-copy rule, the one place it is written: a cell found in several files keeps
# its rows from the highest-ranked one. A merged file ranks by its <seq> (seqs only grow, and
# a compaction's outputs get seqs above every file it reads); a part beats every merged file
# (a part is only ever written after the merged rows it replaces); rows handed to
# write_tables beat everything on disk.
PART_RANK = 1 << 62
EXTRA_RANK = PART_RANK + 1


def newest(sources: list[tuple[int, pa.Table]]) -> list[tuple[int, pa.Table]]:
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


@dataclass
class ReadReport:
    bad_parts: list[str] = field(default_factory=list)  # "path: reason"
    bad_files: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason)

    def add(self, path: Path, reason: str) -> None:
        self.bad_parts.append(f"{path}: {reason}")
        self.bad_files.append((Path(path), reason))


class Vanished(Exception):
    """A file listed a moment ago is gone: a compaction replaced it; list again."""


def error_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _empty(sch: pa.Schema, cols: list[str]) -> pa.Table:
    return pa.schema([sch.field(c) for c in cols]).empty_table()


def _row_groups(pf: pq.ParquetFile, ids: list[str]) -> list[int]:
    """The row groups whose cell_id range can hold one of `ids` (sorted)."""
    md, ci = pf.metadata, pf.schema_arrow.names.index("cell_id")
    groups = []
    for i in range(md.num_row_groups):
        st = md.row_group(i).column(ci).statistics
        if st is None or not st.has_min_max:
            groups.append(i)
            continue
        j = bisect.bisect_left(ids, st.min)
        if j < len(ids) and ids[j] <= st.max:
            groups.append(i)
    return groups


def read_merged(path: Path, sch: pa.Schema, cols: list[str], ids: list[str] | None) -> pa.Table:
    """One merged file; with `ids` (sorted), only the row groups whose cell_id range can hold
    one of them (merged files are sorted by cell_id), then only their rows."""
    try:
        pf = pq.ParquetFile(path)
        have = [c for c in cols if c in pf.schema_arrow.names]
        if ids is None:
            t = pf.read(columns=have, use_threads=False)
        else:
            groups = _row_groups(pf, ids)
            if not groups:
                return schema.conform(pf.schema_arrow.empty_table(), sch, cols)
            t = pf.read_row_groups(groups, columns=have, use_threads=False)
            t = t.filter(pc.is_in(t["cell_id"], value_set=pa.array(ids, pa.string())))
        return schema.conform(t, sch, cols)
    except FileNotFoundError:
        raise Vanished() from None


def read_parts(parts: list[Path], sch: pa.Schema, cols: list[str], ids: set[str] | None,
               report: ReadReport | None) -> pa.Table:
    """The rows of `parts` (of cells `ids`, or all); unreadable parts are left out and added
    to `report`."""
    if ids is not None:  # a part of ours is named by its cell; others may hold any cell
        parts = [p for p in parts if name_stem(p) in ids or not is_cell_id(name_stem(p))]
    if not parts:
        return _empty(sch, cols)
    filt = pc.field("cell_id").isin(sorted(ids)) if ids is not None else None
    try:
        # One multi-threaded scan (up to thousands of one-row parts). Columns a part lacks
        # (written before the schema grew) read as nulls.
        return (ds.dataset([str(p) for p in parts], schema=sch, format="parquet")
                .to_table(columns=cols, filter=filt))
    except FileNotFoundError:
        raise Vanished() from None
    except (OSError, ValueError, pa.ArrowException):
        pass  # some part is damaged or vanished: find out which, part by part
    tables = []
    for part in parts:
        try:
            t = pq.read_table(part)
            if filt is not None:
                t = t.filter(pc.is_in(t["cell_id"], value_set=pa.array(sorted(ids), pa.string())))
            tables.append(schema.conform(t, sch, cols))
        except FileNotFoundError:
            raise Vanished() from None
        except (OSError, ValueError, KeyError, pa.ArrowException) as e:
            if report is not None:
                report.add(part, error_line(e))
    return pa.concat_tables(tables) if tables else _empty(sch, cols)


def _read_merged_files(merged: dict[int, Path], sch: pa.Schema, cols: list[str],
                       ids: list[str] | None, report: ReadReport) -> list[tuple[int, pa.Table]]:
    """(seq, rows) of each readable merged file, read in parallel; unreadable ones go to
    `report`."""
    def one(item):
        seq, path = item
        try:
            return seq, read_merged(path, sch, cols, ids), None
        except Vanished:
            return seq, None, "vanished"
        except (OSError, ValueError, pa.ArrowException) as e:
            return seq, None, error_line(e)

    items = list(merged.items())
    if len(items) > 1:
        with ThreadPoolExecutor(min(8, len(items))) as pool:
            results = list(pool.map(one, items))
    else:
        results = [one(i) for i in items]
    sources = []
    for seq, t, err in results:
        if err == "vanished":
            raise Vanished()
        if err is not None:
            report.add(merged[seq], err)
            continue
        sources.append((seq, t))
    return sources


def live_listing(root: Path, table: str) -> tuple[list[Path], dict[int, Path]] | None:
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


TABLE_SCHEMAS = {"trials": schema.TRIALS, "epochs": schema.EPOCHS}


class StoreReader(Layout):
    """A results folder opened for reading: rows, epochs, which cells landed and which are in
    flight. It never moves, writes or removes a file (Store, the driver's, does)."""

    def driver_running(self) -> bool:
        """A live driver holds the store's lock. Only then may a file vanish under a read
        (its compactions) and is the live manifest the list to read; without one the
        folders hold every landed cell (those after the manifest's last coalesced write, a
        crashed driver's included) and nothing removes a file."""
        from .lock import DriverLock

        lock = DriverLock(self)
        holder = lock.holder()
        return holder is not None and not lock.is_stale(holder)

    @staticmethod
    def part_ids(folder: Path, live: bool = False) -> set[str]:
        """The cells with rows in `folder` (trials/ or epochs/), merged or not (`live`: as
        the live manifest lists them, see read_trials)."""
        folder = Path(folder)
        sch = schema.EPOCHS if folder.name == "epochs" else schema.TRIALS
        t = StoreReader(folder.parent)._read(folder, sch, ["cell_id"], None, None, live)
        return set(pc.unique(t["cell_id"]).to_pylist())

    def cell_ids(self) -> set[str]:
        """The cells that have a trial row."""
        return self.part_ids(self.trials_dir)

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

    def read_table(self, table: str, columns: Iterable[str] | None = None,
                   cell_ids: Iterable[str] | None = None, report: ReadReport | None = None,
                   live: bool = False) -> pa.Table:
        """The rows of `table` ("trials" or "epochs") as Arrow, each cell's from its newest
        copy; the arguments as in read_trials."""
        if table not in TABLE_SCHEMAS:
            raise ValueError(f"table must be one of {tuple(TABLE_SCHEMAS)}, not {table!r}")
        return self._read(self.root / table, TABLE_SCHEMAS[table], columns, cell_ids, report, live)

    def read_trials(self, quarantine: bool = False, report: ReadReport | None = None,
                    columns: Iterable[str] | None = None,
                    cell_ids: Iterable[str] | None = None, live: bool = False) -> pd.DataFrame:
        """Trial rows (each cell once, its newest row); `columns`/`cell_ids` read only those.
        `live`: read the files of the live manifest (study.live), as every reader but the
        driver does: a compaction running meanwhile never removes a file under the read.
        `quarantine`: also move the unreadable files aside (a Store's, the driver's, only)."""
        return self._read_frame("trials", quarantine, report, columns, cell_ids, live)

    def read_epochs(self, quarantine: bool = False, report: ReadReport | None = None,
                    columns: Iterable[str] | None = None,
                    cell_ids: Iterable[str] | None = None, live: bool = False) -> pd.DataFrame:
        """Epoch rows (each cell's from one file, the newest); `cell_ids` reads only the row
        groups that can hold those cells; `live` and `quarantine` as in read_trials."""
        return self._read_frame("epochs", quarantine, report, columns, cell_ids, live)

    def quarantine_bad(self, report: ReadReport) -> None:
        """Moving files is the driver's (Store.quarantine_bad): a reader only reports them."""
        raise StoreError(f"{self.root} is open read-only here; only the driver moves "
                         "unreadable files aside")

    def _read_frame(self, table: str, quarantine: bool, report: ReadReport | None,
                    columns, cell_ids, live: bool) -> pd.DataFrame:
        if quarantine and report is None:
            report = ReadReport()
        t = self.read_table(table, columns, cell_ids, report, live)
        if quarantine:
            self.quarantine_bad(report)
        return t.to_pandas()

    def _read(self, folder: Path, sch: pa.Schema, columns: Iterable[str] | None,
              cell_ids: Iterable[str] | None, report: ReadReport | None,
              live_read: bool = False) -> pa.Table:
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
            except Vanished:
                if attempt < 4:
                    continue  # a compaction replaced files we listed: list again
                raise StoreError(f"{folder} keeps changing under this reader; try again") from None
            for path, why in rep.bad_files:
                if path.parent.parent.name == live.LIVE_DIR:  # a second name: say the store's
                    path = folder / f"{name_stem(path)}.parquet"
                if report is not None:
                    report.add(path, why)
            return t.select(cols)
        raise AssertionError("unreachable")

    def _read_once(self, folder: Path, sch: pa.Schema, cols: list[str], ids: list[str] | None,
                   report: ReadReport, live_read: bool = False) -> pa.Table:
        listed = live_listing(self.root, folder.name) if live_read and self.driver_running() \
            else None
        parts, merged = listing(folder) if listed is None else listed
        ptable = read_parts(parts, sch, cols, None if ids is None else set(ids), report)
        sources = [(PART_RANK, schema.conform(ptable, sch, cols)),
                   *_read_merged_files(merged, sch, cols, ids, report)]
        kept = [t for _, t in newest(sources) if len(t)]
        if not kept:
            return _empty(sch, cols)
        return pa.concat_tables(kept) if len(kept) > 1 else kept[0]
