"""The store at the paper's scale and beyond: is every command still fast? (issue 10, points 3, 5)

Builds stores through the tool's own writer (Store.write_tables: the compaction's merged writer,
2,000 cells per write; the last cells land one by one through write_result + maybe_compact, the
driver's land path, so the store holds merged files and loose parts as after a real run), then
times, each in a fresh process (whole command where it says so), with its peak memory:

  big store (default 100,000 trial rows, 50 epochs each = 5,000,000 epoch rows):
    analysis.load + analysis.pairs                  goal < 5 s
    learning curves of 100 chosen cells (load_epochs)  goal < 0.5 s
    `study status DIR`, whole command                goal < 3 s
    `study run SPEC --results DIR`, nothing to run, whole command (--no-figures: goal < 15 s;
      and drawing its first report, unless --skip-run-report: goal < 30 s)
    a first `study report DIR` (no figures or report on disk), whole command  goal < 30 s
  one bootstrap interval of the median over 50,000 values, on its own   goal < 25 ms
  small store (the paper preset, 6,912 cells x 100 epochs):
    `study report DIR` and `study figures DIR`, whole command      goal < 30 s each

    python benchmarks/store_scale.py [--cells-scale 1.0] [--keep DIR]
    python benchmarks/store_scale.py --paper-only --export-mlflow [--keep DIR]   (issue 19:
      `study export DIR --mlflow` of the paper store into a local MLflow store, goal < 10 min)
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from study import schema  # noqa: E402
from study.store import Store  # noqa: E402
from sweep import parse_spec  # noqa: E402

# 2 x 2 x 5 x 5 x 2 x 2 x 2 x 5 x 5 x 5 = 100,000 cells
BIG_SPEC = """
[study]
name = "big"
description = "100,000 cells: the store benchmark's grid"

[grid]
dataset = ["mnist", "cifar10"]
architecture = ["sequential", "parallel"]
layers = [1, 2, 3, 4, 6]
filters = [8, 16, 24, 32, 64]
kernel = [3, 5]
activation = ["relu", "tanh"]
batch_norm = [false, true]
lr = [3e-3, 1e-3, 6e-4, 3e-4, 1e-4]
epochs = 50
batch_size = 256
weight_decay = [0.0, 1e-5, 1e-4, 3e-4, 1e-3]
seed = [0, 1, 2, 3, 4]
"""


def synth(cells, epochs: int, rng) -> tuple[pa.Table, pa.Table]:
    """Rows like a real study's: losses that depend on size and data set, twins close."""
    n = len(cells)
    cfg = {k: np.array([c.config.get(k) for c in cells], dtype=object)
           for k in ("dataset", "architecture", "layers", "filters", "kernel")}
    layers = cfg["layers"].astype(int)
    filters = cfg["filters"].astype(int)
    kernel = cfg["kernel"].astype(int)
    n_params = filters ** 2 * kernel ** 2 * layers + 100 * filters
    mnist = cfg["dataset"] == "mnist"
    n_train = np.where(mnist, 54000, 45000)
    pair_noise = {c.pair_key: v for c, v in zip(cells, rng.normal(0, 0.4, n))}
    base = np.where(mnist, 0.08, 1.2) * np.exp([pair_noise[c.pair_key] for c in cells])
    arch = np.where(cfg["architecture"] == "parallel", np.exp(rng.normal(-0.03, 0.08, n)), 1.0)
    val = base * arch
    status = rng.choice(["ok", "failed", "diverged"], p=[0.97, 0.02, 0.01], size=n)
    ok = status == "ok"
    now = np.datetime64("2026-01-01T00:00:00", "us")
    cols = {name: [c.config.get(name) for c in cells] for name in schema.PARAM_COLUMNS}
    cols.update(
        cell_id=[c.cell_id for c in cells], pair_key=[c.pair_key for c in cells],
        study=["big"] * n, status=status.tolist(), n_params=n_params.tolist(),
        filters_used=filters.tolist(), n_train=n_train.tolist(), n_val=[6000] * n,
        n_test=[10000] * n, n_classes=[10] * n, epochs_done=np.where(ok, epochs, 0).tolist(),
        train_loss=np.where(ok, val * 0.7, np.nan).tolist(), val_loss=np.where(ok, val, np.nan).tolist(),
        train_acc=np.where(ok, 0.95, np.nan).tolist(), val_acc=np.where(ok, 0.93, np.nan).tolist(),
        test_loss=np.where(ok, val * 1.02, np.nan).tolist(), test_acc=np.where(ok, 0.92, np.nan).tolist(),
        wall_s=rng.uniform(20, 90, n).tolist(), started_at=pa.array(np.full(n, now)),
        finished_at=pa.array(np.full(n, now)), attempts=[1] * n, resumed_from_epoch=[0] * n,
        host=["node-1"] * n, node_id=["n1"] * n, device=["cuda:0"] * n,
        error=np.where(ok, None, "synthetic failure").tolist(), torch_version=["2.5"] * n,
        project_version=["0.1.0"] * n)
    trials = pa.table({f.name: pa.array(cols.get(f.name, [None] * n), f.type)
                       if not isinstance(cols.get(f.name), pa.Array) else cols[f.name].cast(f.type)
                       for f in schema.TRIALS}, schema=schema.TRIALS)
    has = np.flatnonzero(ok)
    e = np.arange(1, epochs + 1)
    decay = np.exp(-e / (epochs / 4))  # curves that fall and level off
    final = val[has][:, None]
    curve_val = (final * (1 + 3 * decay)).ravel()
    epochs_t = pa.table({
        "cell_id": np.repeat(np.array(cols["cell_id"], dtype=object)[has], epochs),
        "epoch": np.tile(e, len(has)),
        "train_loss": (final * 0.7 * (1 + 4 * decay)).ravel(),
        "val_loss": curve_val,
        "train_acc": np.tile(0.95 - 0.5 * decay, len(has)),
        "val_acc": np.tile(0.93 - 0.5 * decay, len(has)),
        "wall_s": np.tile(e * 1.0, len(has)),
        "train_s": np.full(len(has) * epochs, 0.9),  # each epoch's training pass alone
    }, schema=schema.EPOCHS)
    return trials, epochs_t


def build(root: Path, spec_text: str, epochs: int, one_by_one: int, seed: int = 0) -> dict:
    spec = parse_spec(spec_text)
    t0 = time.perf_counter()
    cells = spec.cells()
    t_cells = time.perf_counter() - t0
    store = Store(root)
    store.ensure_writable()
    store.save_spec(spec.source, spec.name, "benchmarks/store_scale.py")
    store.save_cell_ids(spec.source, [c.cell_id for c in cells])  # as `study run` does
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    chunk = 2000
    bulk = len(cells) - one_by_one
    for lo in range(0, bulk, chunk):
        trials, ep = synth(cells[lo:min(lo + chunk, bulk)], epochs, rng)
        store.write_tables(trials, ep)
    t_bulk = time.perf_counter() - t0
    t0 = time.perf_counter()
    trials, ep = synth(cells[bulk:], epochs, rng)
    by_cell: dict[str, list[dict]] = {}
    for r in ep.to_pylist():
        by_cell.setdefault(r["cell_id"], []).append(r)
    for row in trials.to_pylist():  # the driver's land path, cell by cell
        store.write_result(row, by_cell.get(row["cell_id"], []))
        store.maybe_compact(row["cell_id"])
    t_land = time.perf_counter() - t0
    files = {d: len(list((root / d).glob("*.parquet"))) for d in ("trials", "epochs")}
    return {"cells": len(cells), "enumerate_s": t_cells, "bulk_s": t_bulk, "land_s": t_land,
            "land_n": one_by_one, "files": files}


def timed(cmd: list[str], timeout: float = 900) -> tuple[float, float, float, str]:
    """(wall s, CPU s, peak RSS MiB, output) of a fresh process, the interpreter's start
    included. CPU (user + system) is the figure that holds under contention from other work."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024, out


PY_TIMED = r"""
import resource, sys, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
{setup}
t0, c0 = time.perf_counter(), cpu()
{body}
print(f"TIMED {{time.perf_counter() - t0:.3f}} {{cpu() - c0:.3f}}")
"""


def py_measure(setup: str, body: str) -> tuple[float, float, float, str]:
    """(wall s, CPU s, peak RSS MiB, output) of `body` alone, in a fresh process after `setup`."""
    _, _, peak, out = timed([sys.executable, "-c", PY_TIMED.format(setup=setup, body=body)])
    line = [ln for ln in out.splitlines() if ln.startswith("TIMED")]
    if not line:
        raise RuntimeError(out)
    _, took, cpu = line[-1].split()
    return float(took), float(cpu), peak, out


def cli_measure(*args: str, timeout: float = 900) -> tuple[float, float, float, str]:
    """Whole command: `python -m study.cli ...` from interpreter start to exit."""
    return timed([sys.executable, "-m", "study.cli", *map(str, args)], timeout=timeout)


def bootstrap_ms() -> None:
    """One bootstrap interval of the median over 50,000 values, best of 5, on its own (the
    statistics average seeds first, so fewer rows could otherwise meet the goal for it)."""
    from analysis.stats import bootstrap_median_ci

    x = np.random.default_rng(0).lognormal(size=50_000)
    took = []
    for _ in range(5):
        t0 = time.perf_counter()
        bootstrap_median_ci(x)
        took.append(time.perf_counter() - t0)
    ms = 1000 * min(took)
    print(f"{'one bootstrap interval of the median, 50,000 values':<62} {ms:7.2f} ms "
          f"(goal < 25 ms: {'ok' if ms < 25 else 'OVER'})", flush=True)


def report(name: str, took: float, cpu: float, peak: float, goal: float) -> None:
    verdict = "ok" if took < goal else "OVER"
    print(f"{name:<62} wall {took:7.2f} s (goal < {goal:g} s: {verdict}), CPU {cpu:6.2f} s, "
          f"peak {peak:,.0f} MiB", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", help="build the stores under this folder and keep them")
    ap.add_argument("--reuse", action="store_true", help="reuse stores already built under --keep")
    ap.add_argument("--skip-run-report", action="store_true",
                    help="skip the `study run` that also draws the report on the big store")
    ap.add_argument("--paper-only", action="store_true",
                    help="build only the paper store (6,912 cells x 100 epochs)")
    ap.add_argument("--export-mlflow", action="store_true",
                    help="time `study export DIR --mlflow` of the paper store (local store)")
    args = ap.parse_args()
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="store-scale-"))
    big, small = base / "big", base / "paper"
    print(f"stores under {base}; {os.cpu_count()} CPUs", flush=True)
    stores = [(small, None, 100)] if args.paper_only else [(big, BIG_SPEC, 50), (small, None, 100)]
    try:
        for root, text, epochs in stores:
            if args.reuse and (root / "spec.toml").exists():
                continue
            shutil.rmtree(root, ignore_errors=True)
            if text is None:
                from sweep import load_spec
                text = load_spec("paper").source
            b = build(root, text, epochs, one_by_one=300)
            print(f"built {root.name}: {b['cells']:,} cells x {epochs} epochs; spec.cells() "
                  f"{b['enumerate_s']:.1f} s, bulk writes {b['bulk_s']:.1f} s, "
                  f"{b['land_n']} landed one by one {b['land_s']:.1f} s; files {b['files']}",
                  flush=True)

        print(f"load average before measuring: {os.getloadavg()[0]:.1f}", flush=True)
        if args.export_mlflow:
            shutil.rmtree(small / "mlflow", ignore_errors=True)
            m = cli_measure("export", small, "--mlflow", timeout=3600)
            print(m[3][-1500:])
            report("`study export --mlflow` of the paper store (6,912 cells)", *m[:3], 600)
            m = cli_measure("export", small, "--mlflow", timeout=3600)
            report("  again (nothing to export: idempotent)", *m[:3], 60)
            print(f"load average after: {os.getloadavg()[0]:.1f}", flush=True)
        if args.paper_only:
            return
        big_s = repr(str(big))
        m = py_measure("import analysis",
                       f"df = analysis.load({big_s})\np = analysis.pairs(df)\nprint(len(df), len(p))")
        report("analysis.load + analysis.pairs (100,000 rows)", *m[:3], 5)
        m = py_measure("import analysis, numpy as np\nfrom study.store import Store\n"
                       f"ids = np.random.default_rng(1).choice(sorted(Store({big_s}).cell_ids()), "
                       "100, replace=False).tolist()",
                       f"ep = analysis.load_epochs({big_s}, ids)\n"
                       "assert ep['cell_id'].nunique() == len(set(ids) & set(ep['cell_id']))")
        report("learning curves of 100 chosen cells (load_epochs)", *m[:3], 0.5)
        m = cli_measure("status", big)
        report("`study status` whole command", *m[:3], 3)
        spec_path = base / "big.toml"
        spec_path.write_text(BIG_SPEC)
        m = cli_measure("run", spec_path, "--results", big, "--executor", "local", "--no-figures")
        assert "nothing to run" in m[3], m[3]
        report("`study run`, nothing to run, --no-figures, whole command", *m[:3], 15)
        if not args.skip_run_report:
            (big / "report.html").unlink(missing_ok=True)  # so that this run draws its first
            m = cli_measure("run", spec_path, "--results", big, "--executor", "local")
            report("`study run`, nothing to run, drawing its first report", *m[:3], 30)
        shutil.rmtree(big / "figures", ignore_errors=True)
        (big / "report.html").unlink(missing_ok=True)
        m = cli_measure("report", big)
        report("a first `study report` on the big store (100,000 cells)", *m[:3], 30)
        bootstrap_ms()
        for cmd in ("report", "figures"):
            m = cli_measure(cmd, small)
            if "report:" not in m[3] and "figure:" not in m[3]:
                print(m[3][-2000:])
            report(f"`study {cmd}` on the paper store (6,912 cells), whole command", *m[:3], 30)
        print(f"load average after: {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
