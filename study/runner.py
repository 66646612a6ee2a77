"""Running a study: what to run (the spec's pending cells) apart from how (an executor, taken
by name from study.executor_registry).

Both executors call the same trial function, `train.run_cell`; finished rows come back to
the driver, which alone writes the store (so a multi-node cluster needs no shared results
folder for rows, and there is a single writer under the driver lock).
"""
from __future__ import annotations

import datetime as dt
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from sweep import Cell, Spec, fusion
from sweep.values import plain_value

from . import executor_registry as executors
from . import schema
from .analysis_plan import record_for_run
from .counts import STATUS_COLUMNS, StudyGrid, count_cells
from .options import TrialOptions
from .progress import Progress
from .store import DriverLock, ReadReport, Store, StoreError, atomic_write_text
from .trials import compute_seconds, trained_cells, training_modes


@dataclass
class RunOptions:
    """A `study run`: how its cells run (the executor, the trial size, what to retry, print
    and export). `trial` holds what the driver and every cell share: the results and data
    folders, --download, the retries per cell; run_study fills in the rest of it (the
    study's name, threads, device, ...) before the executor gets it."""
    trial: TrialOptions
    executor: str = "ray"  # ray | local
    address: str | None = None
    cpus_per_trial: float = 1
    gpus_per_trial: float = 0
    max_concurrent: int | None = None
    retry_failed: bool = False
    quiet: bool = False
    export: tuple = ()  # live export targets: ("mlflow"|"tensorboard", URI/LOGDIR or None)
    # Fused training (sweep.fusion, study.fused): "off", "auto" (fuse on CUDA, solo on a
    # CPU) or a K: up to K cells of one group key train as one grouped model per trial.
    fuse: int | str = "auto"
    # Small units one after another in one Ray trial (study.bundles): "auto", "off" or the
    # most units in a trial. Changes no value a cell trains to; not recorded with the study.
    bundle: int | str = "auto"


FUSE_FILE = "fuse.txt"  # the study's --fuse mode: a resume keeps it unless told otherwise


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
    copied: int = 0  # same-network copies recorded from their trained cell, not trained
    peak_running: int = 0  # the most cells that trained at once
    peak_trials: int = 0  # ... in this many trials (a fused group is one trial)


# -- same-network copies (sweep.same_network): trained once, recorded under every cell_id ----------
def same_network_plan(cells: list[Cell], pending: list[Cell]
                      ) -> tuple[list[Cell], dict[str, list[Cell]], list[tuple[Cell, str]]]:
    """Split the pending cells by network identity.

    Returns (cells to train, {trained cell_id: its pending copies, recorded when it lands},
    [(pending copy, cell_id of a cell of the same network already in the store)]).
    """
    from sweep import same_network

    pending_ids = {c.cell_id for c in pending}
    train_ids, copies_of, copies = set(pending_ids), {}, []
    for group in same_network.groups(cells).values():
        todo = [c for c in group if c.cell_id in pending_ids]
        if len(group) < 2 or not todo:
            continue
        done = [c for c in group if c.cell_id not in pending_ids]
        if done:
            source = same_network.trained_cell(done)
            copies += [(c, source.cell_id) for c in todo]
            train_ids -= {c.cell_id for c in todo}
            continue
        rep = same_network.trained_cell(todo)
        copies_of[rep.cell_id] = [c for c in todo if c is not rep]
        train_ids -= {c.cell_id for c in copies_of[rep.cell_id]}
    return [c for c in pending if c.cell_id in train_ids], copies_of, copies


def copy_result(row: dict, epochs: list[dict], copy: Cell) -> tuple[dict, list[dict]]:
    """The trained cell's row and curve under the copy's identity, marked as a copy."""
    from sweep.params import PARAMS

    out = dict(row)
    out.update({name: copy.config.get(name) for name in PARAMS})
    source = row.get("same_network_as") or row["cell_id"]
    # A trained cell whose own row was lost comes back from its copy: it is no copy itself.
    out.update(cell_id=copy.cell_id, pair_key=copy.pair_key,
               same_network_as=None if source == copy.cell_id else source,
               weights_path=None)  # the weights file holds the trained cell's module layout
    return out, [{**e, "cell_id": copy.cell_id} for e in epochs]


def record_copies(store: Store, copies: list[tuple[Cell, str]]) -> int:
    """Write the rows of copies whose network is already in the store (a resume after a
    crash between the two writes, or an extension): read the source rows, write copies."""
    sources = {src for _, src in copies}
    trials = store.read_trials(report=ReadReport(), cell_ids=sources)
    epochs = store.read_epochs(report=ReadReport(), cell_ids=sources)
    n = 0
    for copy, src in copies:
        hit = trials[trials["cell_id"] == src]
        if hit.empty:
            continue  # unreadable since plan: the copy stays pending for the next run
        row = _python_row(hit.iloc[0].to_dict())
        ep = epochs[epochs["cell_id"] == src].sort_values("epoch").to_dict("records")
        store.write_result(*copy_result(row, ep, copy))
        n += 1
    return n


def _python_row(raw: dict) -> dict:
    """A pandas row back to the values the schema takes (sweep.values)."""
    # a float column's NaN is a value of its own (a diverged cell's loss): kept as read
    return {f.name: raw.get(f.name) if pa.types.is_floating(f.type)
            else plain_value(raw.get(f.name), _python_type(f.type)) for f in schema.TRIALS}


def _python_type(arrow_type: pa.DataType) -> type:
    if pa.types.is_integer(arrow_type):
        return int
    if pa.types.is_boolean(arrow_type):
        return bool
    return dt.datetime if pa.types.is_timestamp(arrow_type) else str


@dataclass
class StoreView:
    """The one read of the store `study run` makes before its first cell."""
    total: int
    trials: "object"  # DataFrame: cell_id, status
    report: ReadReport
    pending: list[Cell]
    counts: dict[str, int]
    grid: StudyGrid  # the spec's grid: its cells enumerated where any is pending


def preflight(spec: Spec, store: Store, opts: RunOptions) -> StoreView:
    """Checks that change nothing: the spec extends the saved one, the data is there (or is
    downloaded), the folder is writable. A refusal leaves the store exactly as it was.
    Returns the store as read (once: the plan, and the unreadable files to quarantine)."""
    from . import data as datasets

    if store.exists():
        saved = StudyGrid.saved(store)
        if saved.source != spec.source:  # the same text extends itself: no second parse
            spec.check_extends(saved.spec)
    report = ReadReport()
    trials = store.read_trials(columns=STATUS_COLUMNS, report=report)
    grid = StudyGrid(spec, store)
    # cached cell ids: no need to enumerate the grid if nothing is left to run
    counts = count_cells(trials, grid.cell_ids(), retry_failed=opts.retry_failed)
    if not counts.to_run:
        store.ensure_writable()
        return StoreView(counts.total, trials, report, [], counts.by_status(), grid)
    to_run = set(counts.to_run)
    pending = [c for c in grid.cells() if c.cell_id in to_run]
    for name in sorted({c["dataset"] for c in pending}):
        datasets.check_available(name, opts.trial.data_dir, opts.trial.download)
    check_precision(pending, opts)  # first: a refusal here starts no Ray
    # e.g. a trial size the cluster cannot hold is refused before any write
    executors.get(opts.executor).preflight(opts)
    store.ensure_writable()
    return StoreView(counts.total, trials, report, pending, counts.by_status(), grid)


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
    """Run every pending cell of `spec` into the store at `opts.trial.results_dir`."""
    store = Store(opts.trial.results_dir)
    executor = executors.get(opts.executor)
    view = preflight(spec, store, opts)
    lock = DriverLock(store)
    stale = lock.acquire()
    try:
        if stale and not opts.quiet:
            print(f"[study] took over a stale lock of a driver that is gone "
                  f"(host {stale.get('host')}, pid {stale.get('pid')})", file=out)
        _take_over_store(spec, store, view, out)
        atomic_write_text(store.root / FUSE_FILE, f"{opts.fuse}\n")
        pending, copies_of, copies = view.pending, {}, []
        if pending:  # pending cells imply the grid was enumerated by preflight
            pending, copies_of, copies = same_network_plan(view.grid.cells(), pending)
        counts = view.counts
        done = sum(counts.values()) - (counts["failed"] if opts.retry_failed else 0)
        summary = RunSummary(total=view.total, already_done=done,
                             quarantined=view.report.bad_parts)
        if copies:  # the trained cell landed earlier, its copy's row did not: no training
            summary.copied += record_copies(store, copies)
            if not opts.quiet:
                print(f"[study] recorded {summary.copied} same-network "
                      f"{'copy' if summary.copied == 1 else 'copies'} from cells "
                      "already in the store, without training", file=out)
        if not pending:
            store.compact()  # what a crashed run left as parts
            if not opts.quiet and not copies:
                print(f"[study] nothing to run: all {view.total} cells are in {store.root}",
                      file=out)
            return summary
        _train(spec, store, executor, opts, pending, copies_of, summary, lock, out)
        return summary
    finally:
        store.close_live()  # cells landed in the last interval, listed while the lock is ours
        lock.release()


def _take_over_store(spec: Spec, store: Store, view: StoreView, out) -> None:
    """Under the lock, before any cell: quarantine what preflight's read found unreadable
    (its plan already counts those cells as pending; the epochs files only get their
    footers checked), save the spec, compact what a crashed run left, cache the cell ids."""
    store.quarantine_bad(view.report)
    store.check_epochs(quarantine=True)
    for bad in view.report.bad_parts:
        print(f"[study] unreadable part moved to {store.quarantine_dir}: {bad}; "
              "its cell will run again", file=out)
    store.save_spec(spec.source, spec.name, spec.origin)
    record_for_run(store.root, spec, has_data=len(view.trials) > 0, out=out)  # before any cell
    store.compact()  # what a crashed run left; publishes the live files for readers
    if view.grid.enumerated:
        store.save_cell_ids(spec.source, view.grid.cell_ids())


def _train(spec: Spec, store: Store, executor: executors.Executor, opts: RunOptions,
           pending: list[Cell], copies_of: dict[str, list[Cell]], summary: RunSummary,
           lock: DriverLock, out) -> None:
    """The pending cells through the executor, each landing as it finishes; then the store
    compacted and the last progress line."""
    run_opts = replace(opts, trial=_trial_options(spec, store, executor, opts))
    progress = Progress(summary.total, summary.already_done + summary.copied, out=out,
                        quiet=opts.quiet, heartbeat=lock.heartbeat)
    n_copies = sum(map(len, copies_of.values()))
    units = fusion.pack(pending, fuse_size(opts, executor))
    n_groups = sum(1 for u in units if len(u) > 1)
    if not opts.quiet:
        print(f"[study] {spec.name}: {len(pending)} of {summary.total} cells to train"
              + (f" (+{n_copies} same-network copies recorded from them)" if n_copies else "")
              + f" ({summary.already_done} already in {store.root}), executor {opts.executor}"
              + (f", {sum(len(u) for u in units if len(u) > 1)} of them in {n_groups} fused "
                 f"groups (--fuse {opts.fuse})" if n_groups else ""),
              file=out, flush=True)
    t0 = time.time()
    live = None
    if opts.export:  # off the training path: a background thread fed as rows land
        from .export import LiveExport
        live = LiveExport(store, list(opts.export), out=out)
    land = _lander(store, copies_of, live, summary, progress, opts.quiet, out)
    try:
        executor.runner()(units, run_opts, land, progress, store)
    finally:
        if live is not None:
            live.close(wait=sys.exc_info()[0] is None)
    store.compact()  # readers find a handful of files, not one per cell
    summary.wall_s = time.time() - t0
    summary.peak_running, summary.peak_trials = progress.peak_running, progress.peak_trials
    store.remove_empty_checkpoints_dir()  # only in-flight cells' checkpoints stay
    progress.running = 0
    progress.tick(force=True)


def fuse_size(opts: RunOptions, executor: executors.Executor):
    """The K of --fuse for pack: 1 (solo) for "off" and for "auto" without a CUDA GPU; a
    given K as it is; for "auto" on GPUs, a function of the cell (sweep.fusion.auto_k)."""
    if opts.fuse == "off":
        return 1
    if opts.fuse != "auto":
        return int(opts.fuse)
    if executor.gpus_on_request:
        gpus = opts.gpus_per_trial
    else:  # this process trains: it has torch, and a GPU or not
        import torch

        gpus = 1.0 if torch.cuda.is_available() else 0.0
    if gpus <= 0:
        return 1
    return lambda config: fusion.auto_k(config, gpus)


def _trial_options(spec: Spec, store: Store, executor: executors.Executor,
                   opts: RunOptions) -> TrialOptions:
    """The options every cell trains with, as a worker needs them: absolute folders (a
    worker's working directory is not the driver's), no download (the driver has downloaded
    already; workers only read), a torch thread per CPU of the trial, a GPU where the
    executor gives one, the spec's save_weights, and the test hooks of the environment."""
    data_dir = opts.trial.data_dir
    return replace(
        opts.trial, results_dir=str(store.root.resolve()), study=spec.name,
        data_dir=str(Path(data_dir).resolve()) if data_dir else None, download=False,
        threads=max(1, int(opts.cpus_per_trial)), save_weights=spec.save_weights,
        device="auto" if (opts.gpus_per_trial or not executor.gpus_on_request) else "cpu",
        checkpoint_every_s=float(os.environ.get("STUDY_CHECKPOINT_EVERY_S", 30)),
        inject_fault=os.environ.get("STUDY_INJECT_FAULT") or None,
        epoch_hold=os.environ.get("STUDY_EPOCH_HOLD") or None)


def _lander(store: Store, copies_of: dict[str, list[Cell]], live, summary: RunSummary,
            progress: Progress, quiet: bool, out) -> executors.Land:
    """The executors' `land(row, epochs)`: write the row (and its same-network copies'),
    feed the live export, compact when due, count it and say what failed."""
    def land(row: dict, epochs: list[dict]) -> None:
        store.write_result(row, epochs)
        landed = [row["cell_id"]]
        if live is not None:
            live.submit(row, epochs)
        for copy in copies_of.get(row["cell_id"], ()):
            store.write_result(*(copy_row := copy_result(row, epochs, copy)))
            landed.append(copy.cell_id)
            if live is not None:
                live.submit(*copy_row)
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
            if not quiet:
                print(f"[study] cell {row['cell_id']} {st}: {row.get('error')}", file=out)
        summary.copied += len(landed) - 1
        progress.done += len(landed) - 1
        progress.tick()
    return land


def status(store: Store) -> dict:
    """Counts for `study status`: from the store, the lock and the checkpoints."""
    if not store.exists():
        raise StoreError(f"{store.root} holds no study (no spec.toml); run `study run SPEC "
                         f"--results {store.root}` first")
    grid = StudyGrid.saved(store)
    cells = set(grid.cell_ids())  # from the cache where `study run` enumerated this very text
    df = store.read_trials(report=ReadReport(), columns=["cell_id", "status", "wall_s", "same_network_as",
                                                         "fused_group", "group_size"],
                           live=True)  # a running driver compacts meanwhile
    counts = count_cells(df, cells, in_flight=store.in_flight(done=df["cell_id"]))
    df = df[pc.is_in(pa.array(df["cell_id"], pa.string()),
                     value_set=pa.array(list(cells), pa.string())).to_numpy(zero_copy_only=False)]
    lock = DriverLock(store)
    holder = lock.holder()
    driver_alive = bool(holder) and not lock.is_stale(holder)
    running = counts.in_flight if driver_alive else 0
    trained = trained_cells(df)  # a copy's row repeats its trained cell's time
    ok = trained[trained["status"] == "ok"]
    # a fused group's members share its time: counted once, a member's share is time / K
    mean_s = compute_seconds(ok) / len(ok) if len(ok) else None
    pending = counts.pending
    return {
        "study": grid.name, "results": str(store.root), "total": counts.total,
        "done": counts.done, **counts.by_status(), "pending": pending, "running": running,
        "interrupted": counts.in_flight - running,
        "compute_s": compute_seconds(trained),
        "training": training_modes(trained),
        "mean_cell_s": mean_s,
        "eta_compute_s": None if mean_s is None else mean_s * pending,
        "driver": holder if driver_alive else None,
    }


__all__ = ["RunOptions", "RunSummary", "run_study", "status"]
