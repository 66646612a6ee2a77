"""How far a study is: its grid's cells counted by status, counted here once for `study run`,
`study status`, `study plan` and the report (torch- and ray-free: analysis imports it)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

STATUS_COLUMNS = ["cell_id", "status"]  # all counting reads of the store


@dataclass
class CellCounts:
    total: int | None  # cells in the grid; None where the grid is unknown (no readable spec)
    ok: int
    failed: int
    diverged: int
    in_flight: int  # cells with a checkpoint but no row: running, or interrupted
    outside: int  # rows of cells that are not in the grid
    to_run: list[str] = field(default_factory=list)  # grid order: no row yet, or failed and retried

    @property
    def done(self) -> int:
        """Cells with a row: ok, failed or diverged."""
        return self.ok + self.failed + self.diverged

    @property
    def pending(self) -> int | None:
        """Cells without a row (in flight or not started)."""
        return None if self.total is None else self.total - self.done

    def by_status(self) -> dict[str, int]:
        return {"ok": self.ok, "failed": self.failed, "diverged": self.diverged}


def count_cells(trials, cell_ids: Iterable[str] | None = None, in_flight: Iterable[str] = (),
                retry_failed: bool = False) -> CellCounts:
    """Count a grid's cells from the store's rows (`trials`: a DataFrame with cell_id and
    status, each cell once) and the cells holding a checkpoint (`in_flight`).

    `cell_ids`: the grid's cells, in grid order; None counts every row (grid unknown).
    `to_run` lists the cells a `study run` would start: those without a row, and with
    `retry_failed` those that failed.
    """
    status = dict(zip(trials["cell_id"], trials["status"]))
    if cell_ids is None:
        grid, in_grid = None, status
    else:
        grid = list(cell_ids)
        in_grid = {c: status[c] for c in grid if c in status}
    by = Counter(in_grid.values())
    member = (lambda c: True) if grid is None else set(grid).__contains__
    to_run = [] if grid is None else [
        c for c in grid if c not in in_grid or (retry_failed and in_grid[c] == "failed")]
    return CellCounts(
        total=None if grid is None else len(grid), ok=by["ok"], failed=by["failed"],
        diverged=by["diverged"],
        in_flight=sum(1 for c in set(in_flight) if c not in status and member(c)),
        outside=len(status) - len(in_grid), to_run=to_run)
