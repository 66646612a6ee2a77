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

The rooms of this package: layout (folders, file names and listing, metadata), read (the
newest-copy rule and StoreReader, the read-only class), write (the folder, its metadata and
landed cells), compact (compaction and publishing to live readers), quarantine, cell_files
(checkpoints, in-flight markers, weights), lock (DriverLock), errors (StoreError and the
store's atomic writes). Store, the driver's class, is StoreReader with the write side.
"""
from __future__ import annotations

from pathlib import Path

from .cell_files import CheckpointsAndWeights
from .compact import Compactor
from .errors import StoreError, atomic_write_text
from .layout import merged_seq
from .lock import DriverLock
from .quarantine import Quarantine
from .read import ReadReport, StoreReader
from .write import Writer

__all__ = ["DriverLock", "ReadReport", "Store", "StoreError", "StoreReader",
           "atomic_write_text", "merged_seq"]


# StoreReader comes last: where the driver's side and the reader's both name a method
# (quarantine_bad: a reader refuses to move files), the driver's is the one a Store has.
class Store(Writer, Compactor, Quarantine, CheckpointsAndWeights, StoreReader):
    """A results folder as its driver (`study run`, holding DriverLock) uses it: everything a
    StoreReader reads, and the writes, compactions and quarantine that only the driver does
    (a trial's checkpoints and weights go through one too, on the driver's machine)."""

    def __init__(self, root: str | Path):
        super().__init__(root)
        # The driver's view of trials/merged-*: seq -> its cells (built on first need, kept
        # up to date by this object's own compactions; only the lock holder compacts).
        self._merged: dict[int, set[str]] | None = None
        self._in_merged: set[str] | None = None  # their union; None: stale, or a cell repeats
        # The live manifest in memory (study.live): made and listed by the first publish (its
        # listing also sweeps crash leftovers), listed again after compactions and quarantines.
        self._live = None
        self._live_stale = True
        self._loose: int | None = None  # parts landed since the last compaction
        self._loose_since: float | None = None
        self.notes: list[str] = []  # files a compaction had to quarantine
