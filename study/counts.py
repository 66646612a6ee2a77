"""How far a study is: its grid (StudyGrid: the spec parsed once, its cell ids) and the grid's
cells counted by status, here once for `study run`, `study status`, `study plan`, `study
resume` and the report (torch- and ray-free: analysis imports it)."""
from __future__ import annotations

import tomllib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

from sweep import Cell, Spec, parse_spec

STATUS_COLUMNS = ["cell_id", "status"]  # all counting reads of the store


class StudyGrid:
    """A spec's grid as the commands read it: the spec parsed at most once, its cell ids in
    grid order from the results folder's cache where this very text was enumerated before (a
    100,000-cell grid is not enumerated again), else enumerated once.

    `StudyGrid(spec, store)` is the spec in hand (`study run`, `study plan`);
    `StudyGrid.saved(store)` the one saved in the results folder (status, resume, report).
    """

    def __init__(self, spec: Spec | None, store, source: str | None = None,
                 origin: str | None = None):
        self.store = store
        self.source = spec.source if source is None else source
        self.origin = spec.origin if origin is None else origin
        self._spec, self._cells = spec, None

    @classmethod
    def saved(cls, store) -> "StudyGrid":
        """The study saved in `store` (OSError, UnicodeDecodeError: its spec.toml unreadable)."""
        return cls(None, store, store.spec_path.read_text(), str(store.spec_path))

    @property
    def spec(self) -> Spec:
        """The parsed spec, parsed on first use (SpecError where the text does not parse)."""
        if self._spec is None:
            self._spec = parse_spec(self.source, origin=self.origin)
        return self._spec

    @property
    def name(self) -> str:
        """The study's name: the parsed spec's; where the spec was not parsed (its ids came
        from the cache), the name saved with the study."""
        if self._spec is not None:
            return self._spec.name
        return (self.store.meta().get("name")
                or tomllib.loads(self.source).get("study", {}).get("name", "study"))

    def cells(self) -> list[Cell]:
        """The grid's cells, enumerated once."""
        if self._cells is None:
            self._cells = self.spec.cells()
        return self._cells

    @property
    def enumerated(self) -> bool:
        """Whether the cells were enumerated here (their ids are then worth caching)."""
        return self._cells is not None

    def cell_ids(self) -> list[str]:
        """The grid's cell ids in grid order: the enumerated cells', else the cache's, else
        enumerated now."""
        if self._cells is None:
            ids = self.store.cached_cell_ids(self.source)
            if ids is not None:
                return ids
        return [c.cell_id for c in self.cells()]


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
