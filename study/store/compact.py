"""Compaction and publishing (the driver's, under the lock): the parts, and the merged files
they touch, merged into new merged files, every one written before anything it replaces is
removed; then the files on disk published to live readers (study.live). A part of Store.
No torch or ray here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import live, schema
from .errors import atomic_write_table, store_errors
from .layout import MERGED_PREFIX, Layout, file_stat, listing, merged_name, name_stem
from .read import (EXTRA_RANK, PART_RANK, TABLE_SCHEMAS, ReadReport, Vanished, error_line,
                   newest, read_merged, read_parts)

COMPACT_EVERY_PARTS = 256  # loose parts that trigger a compaction
COMPACT_EVERY_S = 30.0  # ... or the age of the oldest loose part
MERGED_MAX_CELLS = 2000  # bounds the cost of rewriting one merged file for a re-run cell
EPOCHS_ROW_GROUP = 1024  # small row groups (~20 cells): the curves of a few cells read a few


@dataclass
class _Inputs:
    """What one compaction read: each source's trial rows by rank, each rank's epochs, and
    the merged files among them (removed once the outputs are in place)."""
    trials: list[tuple[int, pa.Table]]
    epochs: dict[int, pa.Table]
    merged: list[int] = field(default_factory=list)


def _repeated(index: dict[int, set[str]]) -> set[int]:
    """The merged files that share a cell (what a crash mid-compaction leaves)."""
    seen: dict[str, int] = {}
    repeated: set[int] = set()
    for seq, cells in index.items():
        for c in cells:
            if c in seen:
                repeated.update((seq, seen[c]))
            seen[c] = seq
    return repeated


def _touched(index: dict[int, set[str]], new_cells: set[str]) -> set[int]:
    """The merged files to rewrite with the new rows: those holding one of `new_cells`, and
    the smallest one not yet full (filled, rather than adding one more file)."""
    inputs = {s for s, cells in index.items() if cells & new_cells}
    open_files = [(len(cells), s) for s, cells in index.items() if len(cells) < MERGED_MAX_CELLS]
    if open_files:
        inputs.add(min(open_files)[1])
    return inputs


def _merge(src: _Inputs) -> tuple[pa.Table, pa.Table]:
    """Each cell's newest row, sorted by cell_id, and its epochs from the same source, sorted
    by (cell_id, epoch): a curve never outlives or mismatches its row (an epochs part left by
    a crash before its trial part landed is dropped; the cell is in flight and runs again)."""
    kept = newest(src.trials)
    trials = pa.concat_tables([t for _, t in kept]).sort_by("cell_id")
    epochs = []
    for rank, t in kept:
        e_t = src.epochs.get(rank)
        if e_t is not None and len(e_t) and len(t):
            epochs.append(e_t.filter(pc.is_in(e_t["cell_id"], value_set=t["cell_id"].combine_chunks())))
    epochs = (pa.concat_tables(epochs).sort_by([("cell_id", "ascending"), ("epoch", "ascending")])
              if epochs else schema.EPOCHS.empty_table())
    return trials, epochs


class Compactor(Layout):
    """Store's compaction; its driver state (the merged files' cells, the loose parts) is
    set up by Store.__init__."""

    def maybe_compact(self, cell_id: str | None = None) -> bool:
        """Called after each landed cell: compact when enough parts wait, when the oldest has
        waited long enough, or at once when `cell_id` replaced a row of a merged file (so
        that other tools' readers do not see the cell twice)."""
        if self._loose is None:
            self._loose = len(listing(self.trials_dir)[0])
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
            for seq, path in listing(self.trials_dir)[1].items():
                try:
                    index[seq] = set(pq.read_table(path, columns=["cell_id"])["cell_id"].to_pylist())
                except FileNotFoundError:
                    continue
                except (OSError, ValueError, pa.ArrowException) as e:
                    self._set_aside(path, e)
            self._merged = index
        return self._merged

    def _set_aside(self, path: Path, e: BaseException) -> None:
        """An unreadable merged file: quarantined, with a note the driver prints."""
        self._quarantine(path, error_line(e))
        self.notes.append(f"{path}: {error_line(e)}")

    def _compact(self, extra: tuple[pa.Table, pa.Table] | None = None) -> None:
        """Compact; `extra`: (trials, epochs) of cells landed in bulk (write_tables)."""
        tparts, tmerged = listing(self.trials_dir)
        eparts, emerged = listing(self.epochs_dir)
        index = self._merged_index()
        tmerged = {s: p for s, p in tmerged.items() if s in index}  # quarantined ones are gone
        repeated = _repeated(index)
        orphans = set(emerged) - set(tmerged)  # epochs whose trials file is gone
        if not (tparts or eparts or extra or repeated or orphans):
            self._loose, self._loose_since = 0, None
            self.publish()  # retire and remove what waited out its window
            return
        stats = {p: file_stat(p) for p in tparts + eparts}
        src, new_cells, part_notes = self._read_new(tparts, eparts, extra)
        self._read_merged_inputs(_touched(index, new_cells) | repeated | orphans,
                                 tmerged, emerged, src)
        self.notes += part_notes
        trials, epochs = _merge(src)
        # Write every output before removing any input: at any instant each landed row is in
        # some file, and the newest copy of a cell is in the highest-ranked file holding it.
        outputs = self._write_merged(trials, epochs, max([*index, *tmerged, *emerged, 0]) + 1)
        live.pause_for_test("before_removal")
        self._remove_inputs(tparts + eparts, stats, src.merged, tmerged, emerged)
        for s in src.merged:
            index.pop(s, None)
        index.update(outputs)
        self._in_merged = None
        self._loose, self._loose_since = 0, None
        self._live_stale = True  # until listed again: a failed publish retries at the next landing
        self.publish(compaction=True)

    def _read_new(self, tparts: list[Path], eparts: list[Path],
                  extra: tuple[pa.Table, pa.Table] | None) -> tuple[_Inputs, set[str], list[str]]:
        """The parts and the rows handed to write_tables, by rank; the cells they hold; the
        lines on the unreadable parts, which are quarantined (a trials part as soon as it is
        found, taking its epochs part with it)."""
        rep = ReadReport()
        t_parts = read_parts(tparts, schema.TRIALS, schema.TRIAL_COLUMNS, None, rep)
        self.quarantine_bad(rep)
        # A quarantined trials part took its epochs part with it: not one to read any more.
        eparts = [p for p in eparts if p.exists()]
        e_rep = ReadReport()
        e_parts = read_parts(eparts, schema.EPOCHS, schema.EPOCH_COLUMNS, None, e_rep)
        self.quarantine_bad(e_rep)
        src = _Inputs([(PART_RANK, t_parts)], {PART_RANK: e_parts})
        new_cells = set(pc.unique(t_parts["cell_id"]).to_pylist())
        if extra is not None:
            new_cells |= set(pc.unique(extra[0]["cell_id"]).to_pylist())
            src.trials.append((EXTRA_RANK, extra[0]))
            src.epochs[EXTRA_RANK] = extra[1]
        return src, new_cells, rep.bad_parts + e_rep.bad_parts

    def _read_merged_inputs(self, seqs: set[int], tmerged: dict[int, Path],
                            emerged: dict[int, Path], src: _Inputs) -> None:
        """Add the merged files `seqs` to `src`; an unreadable one is set aside (a trials file
        with its cells: they run again), an epochs file whose trials file is gone reads as
        a source without rows."""
        for seq in sorted(seqs):
            tpath, epath = tmerged.get(seq), emerged.get(seq)
            try:
                t = (read_merged(tpath, schema.TRIALS, schema.TRIAL_COLUMNS, None) if tpath
                     else schema.TRIALS.empty_table())
            except Vanished:
                continue
            except (OSError, ValueError, pa.ArrowException) as e:
                self._set_aside(tpath, e)
                continue
            e_t = schema.EPOCHS.empty_table()
            if epath:
                try:
                    e_t = read_merged(epath, schema.EPOCHS, schema.EPOCH_COLUMNS, None)
                except Vanished:
                    pass
                except (OSError, ValueError, pa.ArrowException) as e:
                    self._set_aside(epath, e)
            src.trials.append((seq, t))
            src.epochs[seq] = e_t
            src.merged.append(seq)

    def _write_merged(self, trials: pa.Table, epochs: pa.Table, seq: int) -> dict[int, set[str]]:
        """`trials` and `epochs` as merged files of at most MERGED_MAX_CELLS cells each, from
        <seq> on (a cell's trials and epochs under the same one); returns {seq: its cells}."""
        outputs: dict[int, set[str]] = {}
        ids = trials["cell_id"].to_pylist()
        for lo in range(0, len(ids), MERGED_MAX_CELLS):
            chunk = ids[lo:lo + MERGED_MAX_CELLS]
            e_t = epochs.filter(pc.is_in(epochs["cell_id"], value_set=pa.array(chunk, pa.string())))
            if len(e_t):
                atomic_write_table(self.epochs_dir / merged_name(seq), e_t,
                                   row_group_size=EPOCHS_ROW_GROUP)
            atomic_write_table(self.trials_dir / merged_name(seq), trials.slice(lo, len(chunk)))
            outputs[seq] = set(chunk)
            seq += 1
        return outputs

    def _remove_inputs(self, parts: list[Path], stats: dict, merged: list[int],
                       tmerged: dict[int, Path], emerged: dict[int, Path]) -> None:
        """Remove what the new merged files replace: the parts read (but not one rewritten
        since: that one is newer) and the merged files read."""
        for p in parts:
            if p.exists() and file_stat(p) == stats.get(p):
                p.unlink(missing_ok=True)
        for s in merged:
            for path in (tmerged.get(s), emerged.get(s)):
                if path is not None:
                    path.unlink(missing_ok=True)

    def _cells_in_merged(self) -> set[str] | None:
        """Every cell of the merged files (cached until the next compaction or quarantine),
        None where a cell is in two of them (what a crashed compaction leaves)."""
        if self._in_merged is None:
            index = self._merged_index()
            in_merged = set().union(*index.values())
            if len(in_merged) != sum(map(len, index.values())):
                return None  # not cached: the compaction that must follow fixes it
            self._in_merged = in_merged
        return self._in_merged

    def publish(self, compaction: bool = False) -> bool:
        """List the files on disk again and publish them to live readers at once (study.live),
        unless a cell is in two of them right now (a re-landed cell before its compaction, a
        crashed compaction's leftovers): then readers keep the previous list until the
        compaction that follows. The driver's, under the lock, at start-up, after a
        compaction or a quarantine. `compaction`: called as a compaction's last step."""
        in_merged = self._cells_in_merged()
        if in_merged is None:
            return False
        for d in (self.trials_dir, self.epochs_dir):
            if any(name_stem(p) in in_merged for p in listing(d)[0]):
                return False
        with store_errors(live.manifest_path(self.root)):
            first = self._live is None
            if first:
                self._live = live.LiveManifest(self.root, TABLE_SCHEMAS)
            with self._live.lock:  # no timer's write between the listing and this write
                self._live.relist(sweep=first)  # the first also retires a crash's leftovers
                self._live.write(pause=live.pause_for_test if compaction else None)
        self._live_stale = False
        return True

    def publish_landed(self, cell_id: str) -> bool:
        """Publish a landed cell's two parts to live readers, listing and stat-ing no other
        file; the manifest is written within live.PUBLISH_EVERY_S. A cell that replaced a row
        of a merged file waits for the compaction that follows (readers keep its old row)."""
        if self._live is None or self._live_stale:
            return self.publish()
        in_merged = self._cells_in_merged()
        if in_merged is None or cell_id in in_merged:
            return False
        with store_errors(live.manifest_path(self.root)):
            self._live.land({"trials": self.trials_dir / f"{cell_id}.parquet",
                             "epochs": self.epochs_dir / f"{cell_id}.parquet"})
        return True

    def close_live(self) -> None:
        """The end of a driver's run, however it ends: whatever landed is in the manifest, no
        timer is left. Never raises: a manifest it cannot write stays the previous one, which
        lists each cell once, and the next `study run` lists the folders again."""
        if self._live is not None:
            try:
                self._live.close()
            except OSError:
                pass
