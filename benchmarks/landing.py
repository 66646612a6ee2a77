"""The store's cost of landing a cell, whatever the store holds: `write_result` and
`maybe_compact` (what the runner's land() does for each cell, without Ray or training) timed
over 300 cells (one compaction among them) on stores that already hold N cells (landed in
bulk). Constant CPU per cell across N: nothing in a landing grows with the store.

    PYTHONPATH=$PWD python benchmarks/landing.py [N ...]     # default: 0 20000 50000
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time

import study.rows
from study.rows import cell_row, now
from study.store import Store
from sweep import Cell

CONFIG = {"dataset": "digits", "architecture": "sequential", "layers": 2, "filters": 1,
          "kernel": 1, "epochs": 20}
_version = study.rows.torch_version()
study.rows.torch_version = lambda: _version  # building rows is the trial's cost, not the store's


def cell(seed: int) -> tuple[dict, list[dict]]:
    """A near-empty cell's row and its 20 epoch rows, as the trial builds them."""
    c = Cell.from_config({**CONFIG, "seed": seed})
    result = {"status": "ok", "n_params": 100, "epochs_done": 20, "train_loss": 0.5,
              "val_loss": 0.5, "wall_s": 0.2, "device": "cpu"}
    epochs = [{"cell_id": c.cell_id, "epoch": e, "train_loss": 1.0 / e, "val_loss": 0.5,
               "train_acc": 0.5, "val_acc": 0.4, "wall_s": 0.01 * e, "train_s": 0.008}
              for e in range(1, 21)]
    return cell_row(c.to_dict(), result, study="landing", attempts=1, started_at=now(),
                    host="bench"), epochs


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [0, 20_000, 50_000]
    first = None
    for n in sizes:
        root = tempfile.mkdtemp(prefix="landing-")
        try:
            store = Store(root)
            store.ensure_writable()
            if n:
                store.write_results(cell(s) for s in range(10**6, 10**6 + n))
            store.compact()  # a run's start: the folders listed, the live manifest written
            todo = [cell(s) for s in range(300)]
            c0, w0 = time.process_time(), time.perf_counter()
            for row, epochs in todo:
                store.write_result(row, epochs)
                store.maybe_compact(row["cell_id"])
            cpu = (time.process_time() - c0) / len(todo) * 1000
            wall = (time.perf_counter() - w0) / len(todo) * 1000
            getattr(store, "close_live", lambda: None)()  # (absent before coalesced publishing)
            first = first or cpu
            print(f"store of {n:6d} cells: landing 300 more: CPU {cpu:5.2f} ms/cell "
                  f"({cpu / first:.2f}x the first size), wall {wall:5.2f} ms/cell", flush=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
