"""Reading a study while it runs (study/live.py): every documented reader (pyarrow, DuckDB,
Polars, pandas on analysis.live_files; analysis.load; `study status`) races a real `study run`
that compacts after every second cell, and never fails nor sees a cell twice; a driver
SIGKILLed between the compactor's steps, or while landed cells wait for the manifest's next
write, leaves a store every reader sees each cell once in, which the next run tidies;
replaced files are gone once the retention window has passed."""
from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow.dataset as ds
import pytest

import analysis
import study.live as live
from study.store import Store

from conftest import run_cli
from test_compaction import _row

SPEC = """
[study]
name = "live"

[grid]
dataset = "digits"
architecture = ["sequential", "parallel"]
layers = 2
filters = 2
kernel = 3
epochs = 1
batch_size = 64
lr = 3e-3
max_train_examples = 40
seed = [{seeds}]
"""

# The real CLI, compacting after every COMPACT_EVERY_PARTS landed cells, with a retention
# window of RETAIN_S seconds.
DRIVER = r'''
import sys
import study.live as live, study.store.compact as compact
compact.COMPACT_EVERY_PARTS = int(sys.argv[1])
live.RETAIN_S = float(sys.argv[2])
from study.cli import main
sys.exit(main(["run", *sys.argv[3:], "--executor", "local", "--no-figures", "--quiet"]))
'''


def _spec(tmp_path: Path, n_seeds: int) -> Path:
    p = tmp_path / "live.toml"
    p.write_text(SPEC.format(seeds=", ".join(map(str, range(n_seeds)))))
    return p


def _driver(spec: Path, out: Path, every: int, retain_s: float,
            env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(every), str(retain_s), str(spec),
                             "--results", str(out)], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _top_seq(files: list[str]) -> int:
    """The highest merged <seq> among live files: it grows with every compaction."""
    seqs = [int(m.group(1)) for f in files if (m := re.search(r"merged-(\d+)\.", Path(f).name))]
    return max(seqs, default=0)


# One way to read each: (table, read(out, files) -> the cell ids read). A reader that is
# handed the live files holds them a while before opening them (a notebook between cells).
def _pyarrow(out, files):
    return ds.dataset(files, format="parquet").to_table(columns=["cell_id"])["cell_id"].to_pylist()


def _duckdb(out, files):
    rows = duckdb.connect().execute(
        "select cell_id from read_parquet(?, union_by_name=true)", [files]).fetchall()
    return [r[0] for r in rows]


def _polars(out, files):
    return pl.read_parquet(files, columns=["cell_id"])["cell_id"].to_list()


def _pandas(out, files):
    return pd.read_parquet(files, columns=["cell_id"])["cell_id"].tolist()


def _load(out, files):  # reads the manifest itself
    return analysis.load(out, columns=["cell_id"])["cell_id"].tolist()


def _duckdb_epochs(out, files):
    """Epochs: each (cell, epoch) once; returned as 'cell/epoch' keys."""
    rows = duckdb.connect().execute(
        "select cell_id, epoch from read_parquet(?, union_by_name=true)", [files]).fetchall()
    return [f"{c}/{e}" for c, e in rows]


READERS = {"pyarrow": ("trials", _pyarrow), "duckdb": ("trials", _duckdb),
           "polars": ("trials", _polars), "pandas": ("trials", _pandas),
           "analysis.load": ("trials", _load), "duckdb-epochs": ("epochs", _duckdb_epochs)}


class Tally:
    def __init__(self):
        self.reads = collections.Counter()
        self.raced = collections.Counter()  # reads during which a compaction happened
        self.failures = collections.defaultdict(list)
        self.duplicates = collections.defaultdict(list)
        self.shrank = collections.defaultdict(list)  # a cell seen earlier missing later


def _reader_loop(name, table, read, out, stop, tally):
    seen: set[str] = set()
    while not stop.is_set():
        try:
            files = analysis.live_files(out, table)
            time.sleep(0.03)
            ids = read(out, files)
        except Exception as e:  # what the test counts: any failed read
            tally.failures[name].append(f"{type(e).__name__}: {str(e)[:200]}")
            continue
        tally.reads[name] += 1
        if _top_seq(analysis.live_files(out, table)) != _top_seq(files):
            tally.raced[name] += 1
        dup = [c for c, n in collections.Counter(ids).items() if n > 1]
        if dup:
            tally.duplicates[name].append(dup[:3])
        if not seen <= set(ids):
            tally.shrank[name].append(sorted(seen - set(ids))[:3])
        seen = set(ids)
        time.sleep(0.02)


def _status_loop(out, stop, tally, total):
    while not stop.is_set():
        r = run_cli("status", out, "--json")
        if r.returncode != 0:
            tally.failures["study status"].append(r.stderr.strip()[-200:])
            continue
        st = json.loads(r.stdout)
        tally.reads["study status"] += 1
        if st["done"] > total or st["done"] + st["pending"] != total:
            tally.duplicates["study status"].append(st)
        time.sleep(1.0)  # a process start each: a few are enough


@pytest.mark.slow
def test_every_reader_races_a_compacting_study_without_failing_or_double_counting(tmp_path):
    n_cells = 2 * 15
    spec, out = _spec(tmp_path, n_cells // 2), tmp_path / "res"
    # A compaction after every cell; retired files expire during the run.
    driver = _driver(spec, out, every=1, retain_s=5.0)
    tally, stop = Tally(), threading.Event()
    try:
        deadline = time.monotonic() + 60
        while not live.manifest_path(out).is_file():  # the run's first (tidying) compaction
            assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
            time.sleep(0.02)
        threads = [threading.Thread(target=_reader_loop, args=(n, t, f, out, stop, tally))
                   for n, (t, f) in READERS.items()]
        threads.append(threading.Thread(target=_status_loop, args=(out, stop, tally, n_cells)))
        for t in threads:
            t.start()
        _, err = driver.communicate(timeout=240)
        assert driver.returncode == 0, err
    finally:
        stop.set()
        driver.kill()
    for t in threads:
        t.join(timeout=60)
    compactions = _top_seq(analysis.live_files(out))
    print(f"\n{compactions} compactions; reads / raced a compaction / failed, per reader:")
    for name in [*READERS, "study status"]:
        print(f"  {name:<14} {tally.reads[name]:>4} {tally.raced[name]:>4} "
              f"{len(tally.failures[name]):>3}")
    for what in (tally.failures, tally.duplicates, tally.shrank):
        assert {k: v for k, v in what.items() if v} == {}
    assert compactions >= n_cells
    for name in READERS:  # the test cannot pass by not racing
        assert tally.reads[name] >= 10 and tally.raced[name] >= 3, (name, tally.reads, tally.raced)
    assert tally.reads["study status"] >= 2
    # Finished and idle: the live files and the plain glob both hold each cell once.
    ids = _duckdb(out, analysis.live_files(out))
    assert len(ids) == len(set(ids)) == n_cells
    glob = duckdb.connect().execute(f"select count(*), count(distinct cell_id) from read_parquet("
                                    f"'{out}/trials/*.parquet', union_by_name=true)").fetchall()
    assert glob == [(n_cells, n_cells)]


def _read_all(out) -> dict[str, list[str]]:
    return {name: sorted(f(out, analysis.live_files(out, t))) for name, (t, f) in READERS.items()}


def _kill_at(spec: Path, out: Path, step: str, flag: Path, nth: int = 2, every: int = 2) -> None:
    """A run SIGKILLed when it reaches `step` the `nth` time (a compaction's step: its second
    compaction), compacting after every `every` cells."""
    driver = _driver(spec, out, every=every, retain_s=0.0,
                     env={"STUDY_TEST_PAUSE": f"{step}:{nth}:{flag}"})
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
            time.sleep(0.02)
        driver.send_signal(signal.SIGKILL)
        assert driver.wait(timeout=30) == -signal.SIGKILL
    finally:
        driver.kill()
        driver.communicate()


@pytest.mark.slow
def test_sigkill_between_the_compactors_steps_then_every_reader_sees_each_cell_once(tmp_path):
    """Three runs, each killed inside a compaction, then one that finishes. before_removal:
    merged files in place, the files they replace still there (a cell in two files of the
    glob); before_manifest: those removed, new second names made, the old manifest still the
    published one; before_retired_removal: the new manifest published, the expired files not
    yet removed. Retention 0: no file is kept longer than the readers' promise needs."""
    spec, out = _spec(tmp_path, 6), tmp_path / "res"
    before = 0
    for step in ("before_removal", "before_manifest", "before_retired_removal"):
        _kill_at(spec, out, step, tmp_path / f"paused-{step}")
        if step == "before_removal":  # the plain glob meets cells twice here; live readers not
            (n, distinct), = duckdb.connect().execute(
                "select count(*), count(distinct cell_id) from read_parquet("
                f"'{out}/trials/*.parquet', union_by_name=true)").fetchall()
            assert n > distinct
        seen = _read_all(out)
        epoch_keys = seen.pop("duckdb-epochs")
        # With no driver alive the store's own reader lists the folders (every landed cell,
        # newest copy kept); the file readers go by the crashed driver's last manifest,
        # which may lack the cells of its last coalesced interval.
        loaded = seen.pop("analysis.load")
        assert len(set(map(tuple, seen.values()))) == 1, (step, seen)  # all: the same cells
        ids = seen["duckdb"]
        assert len(loaded) == len(set(loaded)) and set(ids) <= set(loaded), step
        assert set(loaded) == Store(out).cell_ids(), step
        assert len(ids) == len(set(ids)) == len(epoch_keys) == len(set(epoch_keys)), step
        assert len(ids) > before, step  # the run added cells, nothing was lost
        assert set(ids) <= Store(out).cell_ids()  # the driver's own view has them all
        before = len(ids)

    # The next run tidies: the missing cells land, every reader and the plain glob see each
    # of the 12 cells once, and .live/ holds only what the manifest lists.
    r = subprocess.run([sys.executable, "-c", DRIVER, "2", "0", str(spec), "--results", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    seen = _read_all(out)
    assert all(len(v) == len(set(v)) == 12 for v in seen.values()), seen
    glob = duckdb.connect().execute(f"select count(*), count(distinct cell_id) from read_parquet("
                                    f"'{out}/trials/*.parquet', union_by_name=true)").fetchall()
    assert glob == [(12, 12)]
    listed = {Path(f).name for t in live.TABLES for f in analysis.live_files(out, t)}
    assert {p.name for p in (out / ".live").glob("*/*.parquet")} == listed


@pytest.mark.slow
def test_sigkill_while_landed_cells_wait_for_the_manifest_then_the_next_run_tidies(tmp_path):
    """A run SIGKILLed at its third landing, once the cell's second names are made and before
    any manifest lists them (the landings before it may wait for the interval's write too):
    every reader sees the same cells, each once, with their epochs; the next run lands the
    rest and leaves in .live/ only what its manifest lists."""
    spec, out = _spec(tmp_path, 6), tmp_path / "res"
    _kill_at(spec, out, "landed_before_manifest", tmp_path / "paused", nth=3, every=100)
    made = {p.name for p in (out / ".live").glob("*/*.parquet")}
    listed = {Path(f).name for t in live.TABLES for f in analysis.live_files(out, t)}
    assert made - listed  # the killed landing's second names, which no manifest lists
    seen = _read_all(out)
    epoch_keys = seen.pop("duckdb-epochs")
    loaded = seen.pop("analysis.load")  # no driver alive: the folders, every landed cell
    assert len(set(map(tuple, seen.values()))) == 1, seen
    ids = seen["duckdb"]
    assert len(ids) == len(set(ids)) and len(epoch_keys) == len(set(epoch_keys))
    assert set(ids) < set(loaded) == Store(out).cell_ids()  # the killed landing's cell too
    r = subprocess.run([sys.executable, "-c", DRIVER, "100", "0", str(spec), "--results", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    seen = _read_all(out)
    assert all(len(v) == len(set(v)) == 12 for v in seen.values()), seen
    listed = {Path(f).name for t in live.TABLES for f in analysis.live_files(out, t)}
    assert {p.name for p in (out / ".live").glob("*/*.parquet")} == listed


def test_replaced_files_stay_for_the_window_then_go(tmp_path, monkeypatch):
    monkeypatch.setattr(live, "RETAIN_S", 1.0)
    monkeypatch.setattr(live, "PUBLISH_EVERY_S", 0.0)  # every landing written at once
    store = Store(tmp_path)
    store.ensure_writable()
    assert analysis.live_files(tmp_path) == []  # no manifest yet: the (empty) glob
    store.compact()  # what a run's start does: publishes an empty table, readable as such
    empty = analysis.live_files(tmp_path)
    assert pl.read_parquet(empty).height == 0 and "val_loss" in pd.read_parquet(empty).columns
    for layers in (1, 2, 3):
        store.write_result(*_row(layers))
    held = analysis.live_files(tmp_path)  # a reader lists three parts, reads later
    assert len(held) == 3
    store.compact()
    assert [p.name for p in store.trials_dir.iterdir()] == ["merged-00000001.parquet"]
    assert len(pd.read_parquet(held)) == 3  # the parts' second names outlive the compaction
    assert len(analysis.live_files(tmp_path)) == 1
    time.sleep(1.1)
    store.write_result(*_row(4))  # the next publish removes what waited out the window
    assert not any(Path(f).exists() for f in held)
    listed = {Path(f).name for t in live.TABLES for f in analysis.live_files(tmp_path, t)}
    assert {p.name for p in (tmp_path / ".live").glob("*/*.parquet")} == listed
    held = analysis.live_files(tmp_path)
    store.compact()  # merged-00000002 replaces merged-00000001 and the part of cell 4
    assert len(analysis.live_files(tmp_path)) == 1 and len(pd.read_parquet(held)) == 4
    with pytest.raises(analysis.AnalysisError, match="table must be"):
        analysis.live_files(tmp_path, "cells")
    # A store from before manifests (or copied without .live/): the folder's files.
    shutil.rmtree(tmp_path / ".live")
    assert analysis.live_files(tmp_path) == [str(p) for p in sorted(store.trials_dir.glob("*.parquet"))]
    assert len(analysis.load(tmp_path)) == 4


def test_a_relanded_cell_is_published_only_once_its_compaction_has_run(tmp_path):
    """Newest copy wins, for the live readers too: between a re-run cell's part landing and
    the compaction that follows, the manifest keeps the old row (a plain DuckDB read of the
    list must not meet the cell twice); after it, the new row."""
    store = Store(tmp_path)
    for layers in (1, 2):
        store.write_result(*_row(layers, "failed"))
    store.compact()
    row, epochs = _row(2, "ok", val_loss=0.25)
    store.write_result(row, epochs)  # the retry: its old row is in merged-00000001
    q = ("select cell_id, status, count(*) over (partition by cell_id) "
         "from read_parquet(?, union_by_name=true) order by cell_id")
    before = duckdb.connect().execute(q, [analysis.live_files(tmp_path)]).fetchall()
    assert len(before) == 2 and all(n == 1 and s == "failed" for _, s, n in before)
    assert store.maybe_compact(row["cell_id"])
    after = dict((c, s) for c, s, _ in duckdb.connect().execute(
        q, [analysis.live_files(tmp_path)]).fetchall())
    assert len(after) == 2 and after[row["cell_id"]] == "ok"
    df = analysis.load(tmp_path)
    assert sorted(df["status"]) == ["failed", "ok"]
