"""Running a study: what to run (the spec's pending cells) apart from how (an executor).

Both executors call the same trial function, `train.run_cell`; finished rows come back to
the driver, which alone writes the store (so a multi-node cluster needs no shared results
folder for rows, and there is a single writer under the driver lock).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sweep import Cell, Spec, SpecError, parse_spec

from .store import DriverLock, ReadReport, Store, StoreError


@dataclass
class RunOptions:
    results_dir: str
    data_dir: str | None = None
    download: bool = False
    executor: str = "ray"  # ray | local
    address: str | None = None
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    max_concurrent: int | None = None
    max_failures: int = 2
    retry_failed: bool = False
    quiet: bool = False


@dataclass
class RunSummary:
    total: int
    already_done: int
    ran: int = 0
    ok: int = 0
    failed: int = 0
    diverged: int = 0
    wall_s: float = 0.0
    quarantined: list[str] = field(default_factory=list)


class Progress:
    """One progress line: cells done/total, running, failed, ETA (every few seconds)."""

    def __init__(self, total: int, done: int, out=sys.stderr, quiet: bool = False,
                 every_s: float = 5.0, heartbeat: Callable[[], None] | None = None):
        self.total, self.done0, self.done = total, done, done
        self.running = self.failed = self.diverged = 0
        self.t0 = time.time()
        self.out, self.quiet, self.every_s = out, quiet, every_s
        self.last = 0.0
        self.heartbeat = heartbeat

    def line(self) -> str:
        ran = self.done - self.done0
        elapsed = time.time() - self.t0
        left = self.total - self.done
        eta = "?" if ran == 0 else _fmt_s(elapsed / ran * left)
        return (f"[study] {self.done}/{self.total} cells done, {self.running} running, "
                f"{self.failed} failed, {self.diverged} diverged, elapsed {_fmt_s(elapsed)}, ETA {eta}")

    def tick(self, force: bool = False) -> None:
        now = time.time()
        if force or now - self.last >= self.every_s:
            self.last = now
            if self.heartbeat:
                self.heartbeat()
            if not self.quiet:
                print(self.line(), file=self.out, flush=True)


def _fmt_s(s: float) -> str:
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def plan(spec: Spec, store: Store, retry_failed: bool = False) -> tuple[list[Cell], dict[str, int]]:
    """(pending cells, counts by status of the grid's cells already in the store)."""
    cells = spec.cells()
    df = store.read_trials()
    status = dict(zip(df["cell_id"], df["status"]))
    counts = {"ok": 0, "failed": 0, "diverged": 0}
    pending = []
    for c in cells:
        s = status.get(c.cell_id)
        if s in counts:
            counts[s] += 1
        if s is None or (s == "failed" and retry_failed):
            pending.append(c)
    return pending, counts


def preflight(spec: Spec, store: Store, opts: RunOptions) -> None:
    """Checks that change nothing: the spec extends the saved one, the data is there (or is
    downloaded), the folder is writable. A refusal leaves the store exactly as it was."""
    from . import data as datasets

    if store.exists():
        old = parse_spec(store.spec_path.read_text(), origin=str(store.spec_path))
        spec.check_extends(old)
    pending, _ = plan(spec, store, opts.retry_failed)
    for name in sorted({c["dataset"] for c in pending}):
        datasets.check_available(name, opts.data_dir, opts.download)
    if pending and opts.executor == "ray":
        from .executors import connect
        connect(opts)  # a trial size the cluster cannot hold is refused before any write
    store.ensure_writable()


def run_study(spec: Spec, opts: RunOptions, out=sys.stderr) -> RunSummary:
    """Run every pending cell of `spec` into the store at `opts.results_dir`."""
    from .options import TrialOptions

    store = Store(opts.results_dir)
    preflight(spec, store, opts)
    lock = DriverLock(store)
    stale = lock.acquire()
    try:
        if stale and not opts.quiet:
            print(f"[study] took over a stale lock of a driver that is gone "
                  f"(host {stale.get('host')}, pid {stale.get('pid')})", file=out)
        report = ReadReport()
        store.read_trials(quarantine=True, report=report)
        store.read_epochs(quarantine=True, report=ReadReport())
        for bad in report.bad_parts:
            print(f"[study] unreadable part moved to {store.quarantine_dir}: {bad}; "
                  "its cell will run again", file=out)
        store.save_spec(spec.source, spec.name, spec.origin)
        pending, counts = plan(spec, store, opts.retry_failed)
        total = len(spec.cells())
        done = sum(counts.values()) - (counts["failed"] if opts.retry_failed else 0)
        summary = RunSummary(total=total, already_done=done, quarantined=report.bad_parts)
        if not pending:
            if not opts.quiet:
                print(f"[study] nothing to run: all {total} cells are in {store.root}", file=out)
            return summary

        trial_opts = TrialOptions(
            results_dir=str(store.root.resolve()), study=spec.name,
            data_dir=str(Path(opts.data_dir).resolve()) if opts.data_dir else None,
            download=False,  # the driver has downloaded already; workers only read
            threads=max(1, int(opts.cpus_per_trial)), max_failures=opts.max_failures,
            save_weights=spec.save_weights,
            device="auto" if (opts.gpus_per_trial or opts.executor == "local") else "cpu",
            checkpoint_every_s=float(os.environ.get("STUDY_CHECKPOINT_EVERY_S", 30)),
            inject_fault=os.environ.get("STUDY_INJECT_FAULT") or None)
        progress = Progress(total, done, out=out, quiet=opts.quiet, heartbeat=lock.heartbeat)
        if not opts.quiet:
            print(f"[study] {spec.name}: {len(pending)} of {total} cells to run "
                  f"({done} already in {store.root}), executor {opts.executor}", file=out, flush=True)
        t0 = time.time()

        def land(row: dict, epochs: list[dict]) -> None:
            store.write_result(row, epochs)
            summary.ran += 1
            st = row["status"]
            setattr(summary, st, getattr(summary, st) + 1)
            progress.done += 1
            if st in ("failed", "diverged"):
                setattr(progress, st, getattr(progress, st) + 1)
                if not opts.quiet:
                    print(f"[study] cell {row['cell_id']} {st}: {row.get('error')}", file=out)
            progress.tick()

        if opts.executor == "local":
            from .executors import run_local
            run_local(pending, trial_opts, land, progress)
        elif opts.executor == "ray":
            from .executors import run_ray
            run_ray(pending, trial_opts, land, progress, opts, store)
        else:
            raise SpecError(f"unknown executor {opts.executor!r}; use ray or local")
        summary.wall_s = time.time() - t0
        store.remove_empty_checkpoints_dir()  # only in-flight cells' checkpoints stay
        progress.running = 0
        progress.tick(force=True)
        return summary
    finally:
        lock.release()


def status(store: Store) -> dict:
    """Counts for `study status`: from the store, the lock and the checkpoints."""
    if not store.exists():
        raise StoreError(f"{store.root} holds no study (no spec.toml); run `study run SPEC "
                         f"--results {store.root}` first")
    spec = parse_spec(store.spec_path.read_text(), origin=str(store.spec_path))
    cells = {c.cell_id for c in spec.cells()}
    df = store.read_trials(report=ReadReport())
    df = df[df["cell_id"].isin(cells)]
    by = df["status"].value_counts().to_dict()
    holder = DriverLock(store).holder()
    lock = DriverLock(store)
    driver_alive = bool(holder) and not lock.is_stale(holder)
    in_flight = [c for c in store.in_flight() if c in cells]
    running = len(in_flight) if driver_alive else 0
    done = int(len(df))
    ok_wall = df.loc[df["status"] == "ok", "wall_s"]
    mean_s = float(ok_wall.mean()) if len(ok_wall) else None
    pending = len(cells) - done
    return {
        "study": spec.name, "results": str(store.root), "total": len(cells), "done": done,
        "ok": int(by.get("ok", 0)), "failed": int(by.get("failed", 0)),
        "diverged": int(by.get("diverged", 0)), "pending": pending, "running": running,
        "interrupted": len(in_flight) - running,
        "compute_s": float(df["wall_s"].fillna(0).sum()),
        "mean_cell_s": mean_s,
        "eta_compute_s": None if mean_s is None else mean_s * pending,
        "driver": holder if driver_alive else None,
    }


__all__ = ["RunOptions", "RunSummary", "run_study", "plan", "status"]
