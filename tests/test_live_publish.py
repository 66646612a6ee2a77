"""The driver's live manifest costs a landed cell the same whatever the store holds: a landing
lists and stats no file but its own cell's (counted over the real filesystem on a store of
many parts), and the manifest, written at most once per interval, lists every landed cell
exactly once by the end of each interval and at the end of a run."""
from __future__ import annotations

import collections
import os
import time
from pathlib import Path

import duckdb
import pytest

import analysis
import study.live as live
import study.store.compact as compaction
from study.rows import cell_row, now
from study.store import ReadReport, Store
from sweep import Cell

CONFIG = {"dataset": "digits", "architecture": "sequential", "layers": 2, "filters": 4,
          "kernel": 3, "epochs": 2}


def _cell(seed: int) -> tuple[dict, list[dict]]:
    """A landed cell's row and its two epochs, as the trial builds them."""
    cell = Cell.from_config({**CONFIG, "seed": seed})
    epochs = [{"cell_id": cell.cell_id, "epoch": e, "train_loss": 1.0 / e, "val_loss": 0.5,
               "train_acc": 0.5, "val_acc": 0.4, "wall_s": 0.1 * e, "train_s": 0.08}
              for e in (1, 2)]
    result = {"status": "ok", "n_params": 100, "epochs_done": 2, "train_loss": 0.5,
              "val_loss": 0.5, "wall_s": 0.2, "device": "cpu"}
    return cell_row(cell.to_dict(), result, study="tests", attempts=1, started_at=now(),
                    host="test"), epochs


def _land(store: Store, seed: int, cell: tuple[dict, list[dict]] | None = None) -> str:
    """What the runner's land() does to the store for one cell (`cell`: its row and epochs,
    built beforehand)."""
    row, epochs = cell or _cell(seed)
    store.write_result(row, epochs)
    store.maybe_compact(row["cell_id"])
    return row["cell_id"]


def _listed_cells(root: Path) -> list[str]:
    """The cell ids a DuckDB read of the live trials files meets (each cell once: no repeats)."""
    return [r[0] for r in duckdb.connect().execute(
        "select cell_id from read_parquet(?, union_by_name=true)",
        [analysis.live_files(root)]).fetchall()]


class FsCalls:
    """Within `with`: counts the calls that list or stat the filesystem (os.stat and os.lstat,
    behind pathlib's stat/exists/is_file and os.path's; os.scandir and os.listdir, behind glob
    and iterdir), with the paths they were given, while the real calls do the work."""

    NAMES = ("stat", "lstat", "scandir", "listdir")

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.real = {name: getattr(os, name) for name in self.NAMES}

    def __enter__(self):
        for name, real in self.real.items():
            def counted(path=".", *a, _real=real, _name=name, **kw):
                self.calls.append((_name, f"fd:{path}" if isinstance(path, int)
                                   else os.fsdecode(path)))
                return _real(path, *a, **kw)
            setattr(os, name, counted)
        return self

    def __exit__(self, *exc):
        for name, real in self.real.items():
            setattr(os, name, real)

    def count(self) -> collections.Counter:
        return collections.Counter(name for name, _ in self.calls)


def _cell_of(path: str) -> str:
    """The cell a store file belongs to: `<cell>.parquet`, `.live/<table>/<cell>.<tag>.parquet`,
    `checkpoints/<cell>.pt`, and their hidden temporary names `.<cell>.parquet.<tag>.tmp`."""
    return Path(path).name.lstrip(".").split(".", 1)[0]


def _fill(store: Store, seeds: range) -> None:
    for seed in seeds:
        _land(store, seed)


@pytest.mark.parametrize("interval", [0.0, 60.0])  # the landing writes the manifest, or not
def test_a_landing_lists_and_stats_no_file_but_its_own(tmp_path, monkeypatch, interval):
    """On a store of a merged file and 200 parts per table (no compaction due), a landing's
    filesystem calls touch only its own cell's files, and their number is the same as on a
    store of 10 parts: nothing in it grows with the store."""
    monkeypatch.setattr(compaction, "COMPACT_EVERY_PARTS", 10_000)
    monkeypatch.setattr(compaction, "COMPACT_EVERY_S", 3600.0)
    monkeypatch.setattr(live, "PUBLISH_EVERY_S", interval)
    counts = {}
    for n_parts in (10, 200):
        store = Store(tmp_path / f"parts-{n_parts}")
        store.ensure_writable()
        _fill(store, range(1000, 1030))
        store.compact()  # a merged file, as a running study has, then the parts on top
        _fill(store, range(n_parts))
        assert len(list(store.trials_dir.glob("*.parquet"))) == n_parts + 1
        cell = _cell(5000)  # the row as the trial built it, before it reaches the driver
        with FsCalls() as fs:
            cell_id = _land(store, 5000, cell)
        others = [(name, p) for name, p in fs.calls if _cell_of(p) != cell_id]
        assert others == [], others[:10]
        assert fs.count()["scandir"] == fs.count()["listdir"] == 0
        counts[n_parts] = fs.count()
        store.close_live()  # the end of a run: the manifest lists the landed cell
        listed = _listed_cells(store.root)
        assert cell_id in listed and len(listed) == len(set(listed)) == 30 + n_parts + 1
        trial_files = {Path(f).name for f in analysis.live_files(store.root)}
        assert sum(_cell_of(f) == cell_id for f in trial_files) == 1
    assert counts[10] == counts[200]


def test_a_coalesced_publish_lists_every_landed_cell_once_by_the_end_of_each_interval(
        tmp_path, monkeypatch):
    """Cells land faster than the interval: the manifest is written fewer times than cells
    land, and each landed cell is either listed already or the write that lists it is due
    within the interval; once it has run, and at the end of the run, every landed cell is
    listed once."""
    monkeypatch.setattr(live, "PUBLISH_EVERY_S", 0.5)
    store = Store(tmp_path)
    store.ensure_writable()
    store.compact()  # start-up: the folders listed, a manifest written
    manifest = store._live
    writes_before = manifest.writes
    landed: list[str] = []
    t0 = time.monotonic()
    for seed in range(40):
        landed.append(_land(store, seed))
        t_landed = time.monotonic()  # its files are in place
        with manifest.lock:  # the timer's write waits while the test looks
            listed = _listed_cells(tmp_path)
            assert len(listed) == len(set(listed)) and set(listed) <= set(landed)
            if landed[-1] not in listed:  # not written yet: a write is due within the interval
                assert manifest.timer is not None and manifest.timer.is_alive()
                assert manifest.due_at <= t_landed + live.PUBLISH_EVERY_S
    burst_s = time.monotonic() - t0
    writes = manifest.writes - writes_before
    # one write per interval at most, as the burst's own clock says (however slow the machine)
    assert 1 <= writes <= 1 + burst_s / live.PUBLISH_EVERY_S
    assert writes < len(landed)  # coalesced
    timer = manifest.timer
    if timer is not None:
        timer.join(timeout=30)  # the interval ends: its write runs
    listed = _listed_cells(tmp_path)
    assert sorted(listed) == sorted(landed)  # every landed cell, each once
    assert not manifest.due

    # A few more, then the end of the run (what `study run` does on its way out, error or not)
    monkeypatch.setattr(live, "PUBLISH_EVERY_S", 3600.0)
    more = [_land(store, seed) for seed in range(100, 105)]
    assert not set(more) & set(_listed_cells(tmp_path))  # due within the hour, not yet
    store.close_live()
    assert sorted(_listed_cells(tmp_path)) == sorted(landed + more)
    assert manifest.timer is None or not manifest.timer.is_alive()
    # the end-of-run compaction lists the merged file, still every cell once
    store.compact()
    assert sorted(_listed_cells(tmp_path)) == sorted(landed + more)
    listed_names = {Path(f).name for t in live.TABLES for f in analysis.live_files(tmp_path, t)}
    retired = set(live.read_manifest(tmp_path)["retired"])
    assert {f"{live.LIVE_DIR}/{p.parent.name}/{p.name}" for p in (tmp_path / live.LIVE_DIR)
            .glob("*/*.parquet") if p.name not in listed_names} <= retired


def test_a_quarantine_lists_the_folders_again(tmp_path, monkeypatch):
    """A part the driver quarantines (unreadable) leaves the live list at the next landing:
    readers do not keep opening a file the store has set aside."""
    monkeypatch.setattr(live, "PUBLISH_EVERY_S", 0.0)
    monkeypatch.setattr(compaction, "COMPACT_EVERY_PARTS", 10_000)
    store = Store(tmp_path)
    store.ensure_writable()
    store.compact()
    bad = _land(store, 1)
    _land(store, 2)
    part = store.trials_dir / f"{bad}.parquet"
    report = ReadReport()
    report.add(part, "unreadable (test)")
    store.quarantine_bad(report)
    assert not part.exists()
    good = _land(store, 3)
    listed = _listed_cells(tmp_path)
    assert bad not in listed and sorted(listed) == sorted([_cell(2)[0]["cell_id"], good])
