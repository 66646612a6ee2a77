"""The local executor: the same trial functions, in this process, in order (debugging, tests).

No Ray here: `study run --executor local` never imports it.
"""
from __future__ import annotations

from sweep import Cell

from .. import interrupt
from ..executor_registry import Land
from ..store import Store


def run_local(units: list[list[Cell]], run_opts, land: Land, progress,
              store: Store | None = None) -> None:
    """Each unit (one cell, or a fused group) through its trial function with
    `run_opts.trial`; the checkpoints and weights go straight into the results folder (this
    is the driver)."""
    from ..fused.train import run_group

    files = Store(run_opts.trial.results_dir)
    for unit in units:
        if interrupt.requested():  # the signal's handler set it: start no more cells
            break
        progress.running, progress.trials = len(unit), 1
        progress.tick()
        results = run_group([c.to_dict() for c in unit], run_opts.trial,
                            report=lambda m: progress.tick(), files=files)
        progress.running = progress.trials = 0
        for row, epochs in results:
            land(row, epochs)
