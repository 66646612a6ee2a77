"""The local executor: the same trial function, in this process, in order (debugging, tests).

No Ray here: `study run --executor local` never imports it.
"""
from __future__ import annotations

from sweep import Cell

from ..executor_registry import Land
from ..store import Store


def run_local(pending: list[Cell], run_opts, land: Land, progress, store: Store | None = None
              ) -> None:
    """Each cell through train.run_cell with `run_opts.trial`; the checkpoints and weights go
    straight into the results folder (this is the driver)."""
    from ..train import run_cell

    files = Store(run_opts.trial.results_dir)
    for c in pending:
        progress.running = 1
        progress.tick()
        row, epochs = run_cell(c.to_dict(), run_opts.trial, report=lambda m: progress.tick(),
                               files=files)
        progress.running = 0
        land(row, epochs)
