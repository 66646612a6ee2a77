"""Running a study: what to run (the spec's pending cells) apart from how (an executor, taken
by name from study.executor_registry).

Both executors call the same trial function, `train.run_cell`; finished rows come back to
the driver, which alone writes the store (so a multi-node cluster needs no shared results
folder for rows, and there is a single writer under the driver lock).
"""
from __future__ import annotations

import os
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from sweep import Cell, Spec, parse_spec

from . import executor_registry as executors
from .counts import STATUS_COLUMNS, count_cells
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
    export: tuple = ()  # live export targets: ("mlflow"|"tensorboard", URI/LOGDIR or None)


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
    copied: int = 0  # same-network twins recorded from their trained cell, not trained


class Progress:
    """One progress line: cells done/total, running, failed, ETA (every few seconds).

    The ETA is measured from the first landed cell on (start-up, data loading and the first
    cell's compile/warm-up are not a rate), shown only once a few cells have landed since,
    and as a range that narrows as more land (~ 1/sqrt(cells) relative spread).
    """
    MIN_CELLS_FOR_ETA = 3

    def __init__(self, total: int, done: int, out=sys.stderr, quiet: bool = False,
                 every_s: float = 5.0, heartbeat: Callable[[], None] | None = None):
        self.total, self.done0, self.done = total, done, done
        self.running = self.failed = self.diverged = 0
        self.t0 = time.time()
        self.out, self.quiet, self.every_s = out, quiet, every_s
        self.last = 0.0
        self.heartbeat = heartbeat
        self.t_first: float | None = None  # when the first cell of this run landed
        self.done_first = done

    def eta(self) -> str:
        left = self.total - self.done
        if left <= 0:
            return "0s"
        k = self.done - self.done_first
        if self.t_first is None or k < self.MIN_CELLS_FOR_ETA:
            return "after a few cells"
        est = (time.time() - self.t_first) / k * left
        spread = 1 / k ** 0.5
        return f"{_fmt_s(est * (1 - spread))}-{_fmt_s(est * (1 + spread))}"

    def line(self) -> str:
        elapsed = time.time() - self.t0
        return (f"[study] {self.done}/{self.total} cells done, {self.running} running, "
                f"{self.failed} failed, {self.diverged} diverged, elapsed {_fmt_s(elapsed)}, "
                f"ETA {self.eta()}")

    def tick(self, force: bool = False) -> None:
        now = time.time()
        if self.t_first is None and self.done > self.done0:
            self.t_first, self.done_first = now, self.done
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


def plan(spec: Spec, store: Store, retry_failed: bool = False, trials=None,
         cells: list[Cell] | None = None) -> tuple[list[Cell], dict[str, int]]:
    """(pending cells, counts by status of the grid's cells already in the store).
    `trials`: the store's cell_id and status columns when the caller has read them already;
    `cells`: the spec's cells when already enumerated."""
    cells = spec.cells() if cells is None else cells
    df = store.read_trials(columns=STATUS_COLUMNS) if trials is None else trials
    counts = count_cells(df, [c.cell_id for c in cells], retry_failed=retry_failed)
    to_run = set(counts.to_run)
    return [c for c in cells if c.cell_id in to_run], counts.by_status()


# -- same-network twins (sweep.twins): trained once, recorded under every cell_id ----------
def same_network_plan(cells: list[Cell], pending: list[Cell]
                      ) -> tuple[list[Cell], dict[str, list[Cell]], list[tuple[Cell, str]]]:
    """Split the pending cells by network identity.

    Returns (cells to train, {trained cell_id: its pending twins, recorded when it lands},
    [(pending twin, cell_id of a cell of the same network already in the store)]).
    """
    from sweep import twins

    pending_ids = {c.cell_id for c in pending}
    train_ids, twins_of, copies = set(pending_ids), {}, []
    for group in twins.groups(cells).values():
        todo = [c for c in group if c.cell_id in pending_ids]
        if len(group) < 2 or not todo:
            continue
        done = [c for c in group if c.cell_id not in pending_ids]
        if done:
            source = twins.trained_cell(done)
            copies += [(c, source.cell_id) for c in todo]
            train_ids -= {c.cell_id for c in todo}
            continue
        rep = twins.trained_cell(todo)
        twins_of[rep.cell_id] = [c for c in todo if c is not rep]
        train_ids -= {c.cell_id for c in twins_of[rep.cell_id]}
    return [c for c in pending if c.cell_id in train_ids], twins_of, copies


def twin_result(row: dict, epochs: list[dict], twin: Cell) -> tuple[dict, list[dict]]:
    """The trained cell's row and curve under the twin's identity, marked as a copy."""
    from sweep.params import PARAMS

    out = dict(row)
    out.update({name: twin.config.get(name) for name in PARAMS})
    source = row.get("same_network_as") or row["cell_id"]
    # A trained cell whose own row was lost comes back from its copy: it is no copy itself.
    out.update(cell_id=twin.cell_id, pair_key=twin.pair_key,
               same_network_as=None if source == twin.cell_id else source,
               weights_path=None)  # the weights file holds the trained cell's module layout
    return out, [{**e, "cell_id": twin.cell_id} for e in epochs]


def record_copies(store: Store, copies: list[tuple[Cell, str]]) -> int:
    """Write the rows of twins whose network is already in the store (a resume after a
    crash between the two writes, or an extension): read the source rows, write copies."""
    sources = {src for _, src in copies}
    trials = store.read_trials(report=ReadReport())
    trials = trials[trials["cell_id"].isin(sources)]
    epochs = store.read_epochs(report=ReadReport())
    epochs = epochs[epochs["cell_id"].isin(sources)]
    n = 0
    for twin, src in copies:
        hit = trials[trials["cell_id"] == src]
        if hit.empty:
            continue  # unreadable since plan: the twin stays pending for the next run
        row = _python_row(hit.iloc[0].to_dict())
        ep = epochs[epochs["cell_id"] == src].sort_values("epoch").to_dict("records")
        store.write_result(*twin_result(row, ep, twin))
        n += 1
    return n


def _python_row(raw: dict) -> dict:
    """A pandas row back to the values the schema takes (pandas turns int columns with nulls
    into floats and nulls into NaN/NaT)."""
    import pandas as pd
    import pyarrow as pa

    from . import schema

    out = {}
    for f in schema.TRIALS:
        v = raw.get(f.name)
        if v is None or (v is pd.NaT) or (not pa.types.is_floating(f.type)
                                          and isinstance(v, float) and v != v):
            out[f.name] = None
        elif pa.types.is_integer(f.type):
            out[f.name] = int(v)
        elif pa.types.is_boolean(f.type):
            out[f.name] = bool(v)
        elif pa.types.is_timestamp(f.type):
            out[f.name] = pd.Timestamp(v).to_pydatetime()
        else:
            out[f.name] = v
    return out


@dataclass
class StoreView:
    """The one read of the store `study run` makes before its first cell."""
    total: int
    trials: "object"  # DataFrame: cell_id, status
    report: ReadReport
    pending: list[Cell]
    counts: dict[str, int]
    enumerated: list[Cell] | None  # the spec's cells, when they had to be enumerated


def preflight(spec: Spec, store: Store, opts: RunOptions) -> StoreView:
    """Checks that change nothing: the spec extends the saved one, the data is there (or is
    downloaded), the folder is writable. A refusal leaves the store exactly as it was.
    Returns the store as read (once: the plan, and the unreadable files to quarantine)."""
    from . import data as datasets

    if store.exists():
        saved = store.spec_path.read_text()
        if saved != spec.source:  # the same text extends itself: no second parse of the grid
            spec.check_extends(parse_spec(saved, origin=str(store.spec_path)))
    report = ReadReport()
    trials = store.read_trials(columns=STATUS_COLUMNS, report=report)
    ids = store.cached_cell_ids(spec.source)
    if ids is not None:  # cached cell ids: no need to enumerate the grid if nothing is left
        counts = count_cells(trials, ids, retry_failed=opts.retry_failed)
        if not counts.to_run:
            store.ensure_writable()
            return StoreView(len(ids), trials, report, [], counts.by_status(), None)
    cells = spec.cells()
    pending, counts = plan(spec, store, opts.retry_failed, trials=trials, cells=cells)
    for name in sorted({c["dataset"] for c in pending}):
        datasets.check_available(name, opts.data_dir, opts.download)
    if pending:  # e.g. a trial size the cluster cannot hold is refused before any write
        check_precision(pending, opts)  # first: a refusal here starts no Ray
        executors.get(opts.executor).preflight(opts)
    store.ensure_writable()
    return StoreView(len(cells), trials, report, pending, counts, cells)


def check_precision(pending: list[Cell], opts: RunOptions) -> None:
    """Refuse tf32 cells where they would train on a CPU (TF32 is a CUDA tensor-core format):
    under Ray without --gpus-per-trial (executors.connect then checks the GPUs asked for
    exist), or in this process without a CUDA GPU."""
    from .errors import ClusterError

    n = sum(1 for c in pending if c.config.get("precision") == "tf32")
    if not n:
        return
    if executors.get(opts.executor).gpus_on_request:
        if opts.gpus_per_trial > 0:
            return
        why = "no --gpus-per-trial was given, so they would train on CPUs"
    else:
        import torch

        if torch.cuda.is_available():
            return
        why = f"this machine has no CUDA GPU for the {opts.executor} executor"
    raise ClusterError(f"{n} pending cells have precision = tf32, which needs a CUDA GPU, but "
                       f"{why}; run them on GPUs or use precision fp32 or bf16")


def run_study(spec: Spec, opts: RunOptions, out=sys.stderr) -> RunSummary:
    """Run every pending cell of `spec` into the store at `opts.results_dir`."""
    from .options import TrialOptions

    store = Store(opts.results_dir)
    executor = executors.get(opts.executor)
    view = preflight(spec, store, opts)
    lock = DriverLock(store)
    stale = lock.acquire()
    try:
        if stale and not opts.quiet:
            print(f"[study] took over a stale lock of a driver that is gone "
                  f"(host {stale.get('host')}, pid {stale.get('pid')})", file=out)
        # Quarantine from the one read made above (its plan already counts those cells as
        # pending); the epochs files only get their footers checked.
        report = view.report
        store.quarantine_bad(report)
        store.check_epochs(quarantine=True)
        for bad in report.bad_parts:
            print(f"[study] unreadable part moved to {store.quarantine_dir}: {bad}; "
                  "its cell will run again", file=out)
        store.save_spec(spec.source, spec.name, spec.origin)
        store.compact()  # what a crashed run left; publishes the live files for readers
        if view.enumerated is not None:
            store.save_cell_ids(spec.source, [c.cell_id for c in view.enumerated])
        pending, counts = view.pending, view.counts
        twins_of, copies = {}, []
        if pending:  # pending cells imply the grid was enumerated by preflight
            pending, twins_of, copies = same_network_plan(view.enumerated or spec.cells(), pending)
        total = view.total
        done = sum(counts.values()) - (counts["failed"] if opts.retry_failed else 0)
        summary = RunSummary(total=total, already_done=done, quarantined=report.bad_parts)
        if copies:  # the trained cell landed earlier, its twin's row did not: no training
            summary.copied += record_copies(store, copies)
            if not opts.quiet:
                print(f"[study] recorded {summary.copied} same-network twin(s) from cells "
                      "already in the store, without training", file=out)
        if not pending:
            store.compact()  # what a crashed run left as parts
            if not opts.quiet and not copies:
                print(f"[study] nothing to run: all {total} cells are in {store.root}", file=out)
            return summary

        trial_opts = TrialOptions(
            results_dir=str(store.root.resolve()), study=spec.name,
            data_dir=str(Path(opts.data_dir).resolve()) if opts.data_dir else None,
            download=False,  # the driver has downloaded already; workers only read
            threads=max(1, int(opts.cpus_per_trial)), max_failures=opts.max_failures,
            save_weights=spec.save_weights,
            device="auto" if (opts.gpus_per_trial or not executor.gpus_on_request) else "cpu",
            checkpoint_every_s=float(os.environ.get("STUDY_CHECKPOINT_EVERY_S", 30)),
            inject_fault=os.environ.get("STUDY_INJECT_FAULT") or None)
        progress = Progress(total, done + summary.copied, out=out, quiet=opts.quiet,
                            heartbeat=lock.heartbeat)
        n_twins = sum(map(len, twins_of.values()))
        if not opts.quiet:
            print(f"[study] {spec.name}: {len(pending)} of {total} cells to train"
                  + (f" (+{n_twins} same-network twins recorded from them)" if n_twins else "")
                  + f" ({done} already in {store.root}), executor {opts.executor}",
                  file=out, flush=True)
        t0 = time.time()
        live = None
        if opts.export:  # off the training path: a background thread fed as rows land
            from .export import LiveExport
            live = LiveExport(store, list(opts.export), out=out)

        def land(row: dict, epochs: list[dict]) -> None:
            store.write_result(row, epochs)
            landed = [row["cell_id"]]
            if live is not None:
                live.submit(row, epochs)
            for twin in twins_of.get(row["cell_id"], ()):
                store.write_result(*(twin_row := twin_result(row, epochs, twin)))
                landed.append(twin.cell_id)
                if live is not None:
                    live.submit(*twin_row)
            for cell_id in landed:
                store.maybe_compact(cell_id)
            while store.notes:
                print(f"[study] unreadable file moved to {store.quarantine_dir}: "
                      f"{store.notes.pop(0)}; its cells will run at the next `study run`", file=out)
            summary.ran += 1
            st = row["status"]
            setattr(summary, st, getattr(summary, st) + 1)
            progress.done += 1
            if st in ("failed", "diverged"):
                setattr(progress, st, getattr(progress, st) + 1)
                if not opts.quiet:
                    print(f"[study] cell {row['cell_id']} {st}: {row.get('error')}", file=out)
            summary.copied += len(landed) - 1
            progress.done += len(landed) - 1
            progress.tick()

        try:
            executor.runner()(pending, trial_opts, land, progress, opts, store)
        finally:
            if live is not None:
                live.close(wait=sys.exc_info()[0] is None)
        store.compact()  # readers find a handful of files, not one per cell
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
    source = store.spec_path.read_text()
    ids = store.cached_cell_ids(source)
    if ids is not None:  # this very text was parsed and enumerated by `study run`
        spec = SimpleNamespace(name=store.meta().get("name")
                               or tomllib.loads(source).get("study", {}).get("name", "study"))
        cells = set(ids)
    else:
        spec = parse_spec(source, origin=str(store.spec_path))
        cells = {c.cell_id for c in spec.cells()}
    df = store.read_trials(report=ReadReport(), columns=["cell_id", "status", "wall_s", "same_network_as"],
                           live=True)  # a running driver compacts meanwhile
    counts = count_cells(df, cells, in_flight=store.in_flight(done=df["cell_id"]))
    df = df[pc.is_in(pa.array(df["cell_id"], pa.string()),
                     value_set=pa.array(list(cells), pa.string())).to_numpy(zero_copy_only=False)]
    lock = DriverLock(store)
    holder = lock.holder()
    driver_alive = bool(holder) and not lock.is_stale(holder)
    running = counts.in_flight if driver_alive else 0
    trained = df[df["same_network_as"].isna()]  # a twin's row copies its cell's time
    ok_wall = trained.loc[trained["status"] == "ok", "wall_s"]
    mean_s = float(ok_wall.mean()) if len(ok_wall) else None
    pending = counts.pending
    return {
        "study": spec.name, "results": str(store.root), "total": counts.total,
        "done": counts.done, **counts.by_status(), "pending": pending, "running": running,
        "interrupted": counts.in_flight - running,
        "compute_s": float(trained["wall_s"].fillna(0).sum()),
        "mean_cell_s": mean_s,
        "eta_compute_s": None if mean_s is None else mean_s * pending,
        "driver": holder if driver_alive else None,
    }


__all__ = ["RunOptions", "RunSummary", "run_study", "plan", "status"]
