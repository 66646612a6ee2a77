"""Readers of a running study: failed reads and double-counted cells, per way of reading.

Runs a real `study run` (near-empty digits cells, a compaction after every EVERY cells) and,
in threads alongside it, DuckDB, pyarrow, Polars and pandas reading the trials table in a
loop, each either through `analysis.live_files` (the documented way for a live study) or
through the plain glob `DIR/trials/*.parquet` (right for a finished study only). Each reader
lists its files, waits HOLD seconds (a notebook between cells), then reads them.

    PYTHONPATH=$PWD python benchmarks/live_readers.py --cells 120 --way glob
    PYTHONPATH=$PWD python benchmarks/live_readers.py --cells 120 --way live
    PYTHONPATH=$PWD python benchmarks/live_readers.py --cells 120 --way live --retain-s 0

Prints, per reader: reads made, reads during which a compaction ran, failed reads, reads that
met a cell twice. `--retain-s 0` shows what the retention window is for.
"""
from __future__ import annotations

import argparse
import collections
import glob
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow.dataset as ds

import analysis
import study.live as live

SPEC = """
[study]
name = "live-bench"
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
DRIVER = r'''
import sys
import study.live as live, study.store.compact as compact
compact.COMPACT_EVERY_PARTS = int(sys.argv[1])
live.RETAIN_S = float(sys.argv[2])
from study.cli import main
sys.exit(main(["run", *sys.argv[3:], "--executor", "local", "--no-figures", "--quiet"]))
'''
READ = {
    "duckdb": lambda f: [r[0] for r in duckdb.connect().execute(
        "select cell_id from read_parquet(?, union_by_name=true)", [f]).fetchall()],
    "pyarrow": lambda f: ds.dataset(f, format="parquet").to_table(columns=["cell_id"])["cell_id"].to_pylist(),
    "polars": lambda f: pl.read_parquet(f, columns=["cell_id"])["cell_id"].to_list(),
    "pandas": lambda f: pd.read_parquet(f, columns=["cell_id"])["cell_id"].tolist(),
}


def files_of(out: Path, way: str) -> list[str]:
    if way == "live":  # once the run has published its first manifest
        return analysis.live_files(out) if live.manifest_path(out).is_file() else []
    return sorted(glob.glob(f"{out}/trials/*.parquet"))


def merged_names(out: Path) -> frozenset:
    return frozenset(p.name for p in (out / "trials").glob("merged-*.parquet"))


def loop(name, out, way, hold, stop, tally):
    while not stop.is_set():
        before = merged_names(out)
        files = files_of(out, way)
        if not files:
            time.sleep(0.01)
            continue
        time.sleep(hold)
        try:
            ids = READ[name](files)
        except Exception:  # noqa: BLE001 - what is measured: any failed read
            tally[name]["failed"] += 1
        else:
            tally[name]["twice"] += len(ids) != len(set(ids))
        tally[name]["reads"] += 1
        tally[name]["raced"] += merged_names(out) != before
        time.sleep(0.02)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=120)
    ap.add_argument("--way", choices=["live", "glob"], default="live")
    ap.add_argument("--every", type=int, default=1, help="compact after every N landed cells")
    ap.add_argument("--retain-s", type=float, default=live.RETAIN_S)
    ap.add_argument("--hold", type=float, default=0.03)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="live-bench-"))
    spec, out = tmp / "spec.toml", tmp / "res"
    spec.write_text(SPEC.format(seeds=", ".join(map(str, range(a.cells // 2)))))
    tally = {n: collections.Counter() for n in READ}
    stop = threading.Event()
    threads = [threading.Thread(target=loop, args=(n, out, a.way, a.hold, stop, tally)) for n in READ]
    t0 = time.perf_counter()
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(a.every), str(a.retain_s),
                               str(spec), "--results", str(out)])
    for t in threads:
        t.start()
    rc = driver.wait()
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    print(f"{a.way} readers, {a.cells} cells, compaction every {a.every} cell(s), retention "
          f"{a.retain_s:g} s, hold {a.hold:g} s: run {wall:.1f} s (exit {rc})")
    print(f"{'reader':<8} {'reads':>6} {'raced':>6} {'failed':>7} {'twice':>6}")
    for n, c in tally.items():
        print(f"{n:<8} {c['reads']:>6} {c['raced']:>6} {c['failed']:>7} {c['twice']:>6}")


if __name__ == "__main__":
    main()
