"""A cell's own files beside its rows: per-epoch checkpoints of cells in flight (an empty one
marks a cell started before its first checkpoint), and the final weights. They travel as bytes
(the trial serialises them; a Ray actor on the driver's node calls these for trials on other
nodes, so only the driver's machine holds them). A part of Store; moving a refused checkpoint
aside is Quarantine's. No torch or ray here.
"""
from __future__ import annotations

from pathlib import Path

from .. import atomic
from .layout import Layout


def _write_or_false(path: Path, data: bytes) -> bool:
    """study.atomic's byte writer; False where the disk refuses (the caller carries on)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.atomic_write_bytes(path, data)
        return True
    except OSError:
        return False


class CheckpointsAndWeights(Layout):
    def save_checkpoint(self, cell_id: str, data: bytes) -> bool:
        """Atomically replace the cell's checkpoint; False (nothing left behind) when the disk
        refuses: a checkpoint only saves time on a resume, so it must not fail the cell."""
        return _write_or_false(self.checkpoint_path(cell_id), data)

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
        return str(path.relative_to(self.root)) if _write_or_false(path, data) else None

    def remove_empty_checkpoints_dir(self) -> None:
        try:
            self.checkpoints_dir.rmdir()  # only when empty: in-flight checkpoints stay
        except OSError:
            pass
