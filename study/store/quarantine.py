"""Quarantine (the driver's, under the lock): a file that cannot be read is moved to
quarantine/ with a note saying why, never deleted. A damaged trials file takes its epochs
file with it (their cells run again); a damaged epochs file costs its cells their curves
only; a refused checkpoint restarts its cell from the first epoch. A part of Store.
No torch or ray here.
"""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .. import atomic
from ..rows import now
from .layout import Layout, listing, merged_seq
from .read import ReadReport, error_line


def _stamp() -> str:
    return now().strftime("%Y%m%dT%H%M%S")


class Quarantine(Layout):
    def quarantine_bad(self, report: ReadReport) -> None:
        """Move aside the files a read found unreadable (the driver, under the lock)."""
        for path, why in report.bad_files:
            if path.exists():
                self._quarantine(path, why)

    def check_epochs(self, quarantine: bool = False) -> list[str]:
        """Footers of the epochs files (cheap: no data read); unreadable ones are listed and,
        with `quarantine`, moved aside (their cells keep their rows, not their curves)."""
        parts, merged = listing(self.epochs_dir)
        bad = []
        for path in parts + list(merged.values()):
            try:
                pq.read_metadata(path)
            except FileNotFoundError:
                continue
            except (OSError, ValueError, pa.ArrowException) as e:
                bad.append(f"{path}: {error_line(e)}")
                if quarantine:
                    self._quarantine(path, error_line(e))
        return bad

    def quarantine_checkpoint(self, cell_id: str, reason: str, mark_in_flight: bool = False) -> None:
        """Move a checkpoint the trainer refused (unreadable, or not plain tensors and
        containers) to quarantine/ with a note; the cell restarts from its first epoch, and
        with mark_in_flight keeps its zero-byte in-flight marker."""
        path = self.checkpoint_path(cell_id)
        if not self._move_aside(path, f"checkpoints-{cell_id}-{_stamp()}.pt", reason):
            return
        if mark_in_flight:
            try:
                path.touch()
            except OSError:
                pass

    def _move_aside(self, path: Path, name: str, reason: str) -> bool:
        """`path` to quarantine/NAME, with NAME's .reason.txt; False where it was gone."""
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        dest = self.quarantine_dir / name
        try:
            os.replace(path, dest)
        except FileNotFoundError:
            return False
        atomic.atomic_write_text(dest.with_suffix(".reason.txt"), reason + "\n")
        return True

    def _quarantine(self, part: Path, reason: str) -> None:
        """A trials or epochs file to quarantine/; a trials file takes its cells' epochs with
        it (a part's are removed, a merged file's quarantined beside it)."""
        stamp = _stamp()
        if not self._move_aside(part, f"{part.parent.name}-{part.stem}-{stamp}.parquet", reason):
            return
        self._live_stale = True  # the live manifest may list it: list the folders again
        if part.parent == self.trials_dir:
            # Its epochs belong to rows we no longer trust: those cells re-run and rewrite them.
            epochs_part = self.epochs_dir / part.name
            if merged_seq(part.name) is None:
                epochs_part.unlink(missing_ok=True)
            elif epochs_part.exists():
                self._move_aside(epochs_part, f"epochs-{part.stem}-{stamp}.parquet",
                                 f"the trial rows of these epochs were in {part}, which is "
                                 f"unreadable: {reason}")
            self._merged = self._in_merged = None  # rebuilt on next need
