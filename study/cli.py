"""The `study` command-line tool.

User errors (a bad spec, a missing dataset, an unwritable or locked results folder) print one
line saying what is wrong and what to do, and exit non-zero: 2 for a bad spec or command line,
3 for the environment (files, folders, data). No traceback for those.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

from sweep import SpecError, load_spec
from sweep.spec import as_spec_error
from sweep.spec import parse_margin

from . import executor_registry as executors
from . import interrupt
from .cluster import k8s
from .cluster.slurm import add_slurm_parser, cmd_slurm
from .counts import StudyGrid
from .store import Store, StoreError

EXIT_SPEC, EXIT_ENV = 2, 3


# Above this many cells (the axes' bound, before [[exclude]]) plan/run/resume ask for
# --max-cells first. Measured: enumerating and planning a cell costs about 80 us and 1 KB, so
# 100,000 cells are ~8 s and ~0.1 GB before a line is printed; 10^8 were minutes and > 3 GB.
DEFAULT_MAX_CELLS = 100_000
MAX_CELLS_FILE = "max_cells.txt"  # a study's --max-cells, for `resume` and later runs


def _results_dir(args, spec) -> Path:
    return Path(args.results) if args.results else Path("results") / spec.name


def _check_size(spec, results: Path, args) -> None:
    """Refuse, before one cell is enumerated, a grid whose axes multiply past the limit:
    --max-cells, else the one remembered in the results folder, else DEFAULT_MAX_CELLS."""
    limit = getattr(args, "max_cells", None)
    if limit is None:
        try:
            limit = int((results / MAX_CELLS_FILE).read_text())
        except (OSError, ValueError):
            limit = DEFAULT_MAX_CELLS
    bound = spec.max_cells()
    if bound > limit:
        raise SpecError(f"spec error: the grid of {spec.origin} has up to {bound:,} cells (the "
                        f"product of its axes), more than the limit of {limit:,}; shrink an "
                        f"axis (a typo in a list?), or pass --max-cells {bound} to go on")


def _remember_max_cells(results: Path, args) -> None:
    if getattr(args, "max_cells", None) is not None:
        from .atomic import atomic_write_text

        results.mkdir(parents=True, exist_ok=True)
        atomic_write_text(results / MAX_CELLS_FILE, f"{args.max_cells}\n")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="folder holding datasets in torchvision's layout")
    p.add_argument("--download", action="store_true", help="download missing datasets into --data-dir")
    names = executors.list_executors()
    p.add_argument("--executor", choices=names, default=names[0],
                   help="; ".join(f"{n}{' (default)' if n == names[0] else ''}: {executors.get(n).help}"
                                  for n in names))
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs (and torch threads) per cell")
    p.add_argument("--gpus-per-trial", type=float, default=0, help="GPUs per cell (fractions share a GPU)")
    p.add_argument("--max-concurrent", type=int, help="cap on cells running at once")
    p.add_argument("--max-failures", type=int, default=2,
                   help="retries of a cell that raises before it is recorded as failed")
    p.add_argument("--retry-failed", action="store_true", help="run cells recorded as failed again")
    p.add_argument("--no-figures", action="store_true",
                   help="skip the figures, tables and report drawn at the end")
    p.add_argument("--redraw", action="store_true",
                   help="draw the figures and report even when no cell ran")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--fuse", metavar="K|auto|off",
                   help="train up to K same-shape cells as one grouped model per trial "
                        "(sequential/parallel/plain cells sharing every setting but seed, lr, "
                        "weight decay, architecture and activation); auto: on CUDA GPUs, with K "
                        "from the activation memory, solo on CPUs; off: one cell per trial. "
                        "Default: the mode recorded in the results folder, else auto")
    p.add_argument("--bundle", metavar="N|auto|off", default="auto",
                   help="under Ray, train small cells (under ~0.1 s of work) up to N to a trial, "
                        "one after another: Tune's cost per trial is paid once (default auto: 32)")
    p.add_argument("--export", action="append", default=[], metavar="TRACKER[=WHERE]",
                   help="export cells to a tracker as they land: mlflow[=URI] or "
                        "tensorboard[=LOGDIR] (repeatable; a tracker down never stops the study)")
    p.add_argument("--until-decided", action="store_true",
                   help="run the spec's [design] looks: after each, add the next seed to every "
                        "setting until every primary verdict is decided (see README, Analysis)")
    p.add_argument("--max-looks", type=int, metavar="N",
                   help="with --until-decided: stop after look N with the verdicts as they stand")
    p.add_argument("--max-extra-cells", type=int, metavar="N",
                   help="with --until-decided: add no look whose cells would take the cells "
                        "beyond the spec's grid past N")
    _add_max_cells(p)


def _add_max_cells(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-cells", type=int, metavar="N",
                   help=f"allow a grid of up to N cells (default {DEFAULT_MAX_CELLS:,}; "
                        "run/resume remember it in the results folder)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="study", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="show the grid of a spec, its cost and how much of it is done")
    p.add_argument("spec", help="spec file or preset name")
    p.add_argument("--results", help="results folder (default results/<study name>)")
    p.add_argument("--json", action="store_true",
                   help="machine-readable output: counts and cost (FLOPs, GPU-hours)")
    p.add_argument("--pilot", metavar="DIR",
                   help="an earlier study (other seeds or settings) whose variance gives the "
                        "power of this study's equivalence test")
    _add_max_cells(p)

    p = sub.add_parser("run", help="run the cells of a spec that are not yet in the store")
    p.add_argument("spec", help="spec file or preset name")
    p.add_argument("--results", help="results folder (default results/<study name>)")
    _add_run_options(p)

    p = sub.add_parser("resume", help="continue the study recorded in a results folder")
    p.add_argument("results", help="results folder of an earlier `study run`")
    _add_run_options(p)

    p = sub.add_parser("status", help="cells done, failed, pending, running, compute time, ETA")
    p.add_argument("results")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    for name, helptext in (("figures", "draw the figures and tables into DIR/figures"),
                           ("report", "write DIR/report.html (self-contained)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("results")
        p.add_argument("--compare", nargs=2, metavar=("A", "B"), default=["sequential", "parallel"],
                       help="the two architectures to compare (default sequential parallel)")
        p.add_argument("--margin", help="equivalence margin: a relative loss margin such as 0.1 "
                       "(the ratio within 1/1.1 and 1.1), or 'seed' (from the seed noise); "
                       "default the spec's [analysis] margin, else 0.1")
        if name == "figures":
            p.add_argument("--pairs", help="comma-separated pair_keys for the learning curves")

    p = sub.add_parser("export", help="export a study to MLflow and/or TensorBoard (idempotent)")
    p.add_argument("results")
    p.add_argument("--mlflow", nargs="?", const="", metavar="URI",
                   help="MLflow tracking URI (default: a local store in DIR/mlflow)")
    p.add_argument("--tensorboard", nargs="?", const="", metavar="LOGDIR",
                   help="TensorBoard log folder (default DIR/tensorboard)")
    # One more worker than cores: each waits on SQLite's one writer part of the time (the
    # 6,912-cell paper store on 2 cores: 536 s with 2 workers, 427-486 s with 3, two quiet runs).
    p.add_argument("--workers", type=int, default=min(3, (os.cpu_count() or 1) + 1),
                   help="processes writing MLflow runs (default: one more than the cores, up to 3)")

    p = sub.add_parser("lesion", help="remove/swap blocks of saved cells and measure the loss")
    p.add_argument("results")
    p.add_argument("--data-dir")
    k8s.add_parser(sub)
    add_slurm_parser(sub)
    return ap


def _power_lines(spec, cells, pilot: str) -> list[str]:
    """`plan --pilot`: the planned settings (study) through the pilot's variance (analysis);
    here because only the CLI module imports analysis."""
    from .power_plan import check_pilot_disjoint, planned_settings

    check_pilot_disjoint(Path(pilot), {c.cell_id for c in cells})
    from analysis.plan_pilot import power_lines

    return power_lines(planned_settings(cells), pilot, spec.analysis)


def _run_or_grow(spec, results: Path, args) -> int:
    """One run of the spec's grid, or with --until-decided its [design] looks
    (study.sequential_run), each look a run of its grown grid, drawn once at the end."""
    from . import sequential_run

    sequential_run.check_flags(spec, args)
    if not args.until_decided:
        return _run(spec, results, args)
    from analysis.looks import primary_look

    return sequential_run.run_until_decided(
        spec, results, args, run_once=lambda s: _run(s, results, args, draw=False),
        primary_look=primary_look, draw=lambda: None if args.no_figures else _outputs(
            results, ("sequential", "parallel"), None, report=True))


def _run(spec, results: Path, args, draw: bool = True) -> int:
    from .options import TrialOptions
    from .runner import RunOptions, run_study

    bundle = _bundle_mode(args)  # a bad value is refused before anything is written
    _check_size(spec, results, args)
    _remember_max_cells(results, args)
    trial = TrialOptions(results_dir=str(results), data_dir=args.data_dir,
                         download=args.download, max_failures=args.max_failures)
    fuse = _fuse_mode(results, args)
    opts = RunOptions(trial, executor=args.executor, address=args.address,
                      cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                      max_concurrent=args.max_concurrent, retry_failed=args.retry_failed,
                      quiet=args.quiet, export=tuple(_export_targets(args.export)), fuse=fuse,
                      bundle=bundle)
    store = Store(results)
    from .analysis_plan import check_pilot

    check_pilot(spec)  # a pilot that cannot fix the margin is refused before anything runs
    if spec.analysis.get("margin") == "seed" and spec.analysis.get("pilot"):
        from analysis.plan_pilot import pilot_seed_margins

        spec.analysis["pilot_margins"] = pilot_seed_margins(spec.analysis["pilot"])
    judged_before = _saved_analysis(store, spec)
    summary = run_study(spec, opts)
    print(f"ran {summary.ran} cells ({summary.ok} ok, {summary.failed} failed, "
          f"{summary.diverged} diverged) in {summary.wall_s:.1f} s"
          + (f", recorded {summary.copied} same-network copies without training"
             if summary.copied else "")
          + f"; {summary.already_done + summary.ran + summary.copied} of {summary.total} cells done"
          + (f"; at most {summary.peak_running} cells in {summary.peak_trials} trials ran at once"
             if summary.ran else ""))
    print(f"trials: {store.trials_dir}")
    print(f"epochs: {store.epochs_dir}")
    if interrupt.requested():  # a batch system's warning: exit within it, draw nothing
        print(f"stopped by {signal.Signals(interrupt.requested()).name}: the cells in flight "
              f"wrote their checkpoints; `study resume {results}` continues them")
        return interrupt.exit_code()
    report = Path(results) / "report.html"
    if args.no_figures or not draw:
        pass
    elif (summary.ran == summary.copied == 0 and report.is_file() and not args.redraw
          and judged_before == spec.analysis):
        # Nothing new in the store: the figures and report on disk are up to date.
        print(f"report: {report} (unchanged: nothing ran; --redraw draws it again)")
    else:
        _outputs(results, ("sequential", "parallel"), None, report=True)
    return 1 if summary.failed else 0


def _fuse_mode(results: Path, args) -> int | str:
    """--fuse as given, else the mode the study's folder recorded (a resume keeps it), else auto."""
    from sweep.fusion import parse_fuse

    from .runner import FUSE_FILE

    given = getattr(args, "fuse", None)
    if given is None:
        try:
            given = (results / FUSE_FILE).read_text().strip() or "auto"
        except OSError:
            given = "auto"
    with as_spec_error(ValueError):
        return parse_fuse(given)


def _bundle_mode(args) -> int | str:
    from .bundles import parse_bundle

    with as_spec_error(ValueError):
        return parse_bundle(getattr(args, "bundle", "auto"))


def _saved_analysis(store: Store, spec) -> dict | None:
    """The [analysis] table of the study's saved spec (None without one): when a run changes
    only it, no cell runs but the figures and report are drawn again."""
    try:
        saved = StudyGrid.saved(store)
        return spec.analysis if saved.source == spec.source else saved.spec.analysis
    except (OSError, UnicodeDecodeError, SpecError):
        return None


def cmd_run(args) -> int:
    from .sequential_run import with_recorded

    spec = load_spec(args.spec)
    results = _results_dir(args, spec)
    # a study grown by --until-decided: its recorded seeds join the user's spec
    return _run_or_grow(with_recorded(spec, results), results, args)


def cmd_resume(args) -> int:
    store = Store(args.results)
    if not store.exists():
        raise StoreError(f"{store.root} holds no study (no spec.toml); start one with "
                         f"`study run SPEC --results {store.root}`")
    from .sequential_run import with_recorded

    return _run_or_grow(with_recorded(StudyGrid.saved(store).spec, store.root), store.root, args)


def cmd_status(args) -> int:
    from .cluster.slurm import status_lines
    from .durations import short_duration
    from .runner import status

    slurm = status_lines(Path(args.results))  # the study's SLURM jobs, if it has any
    if slurm and not args.json and not Store(args.results).exists():
        print("\n".join([f"study in {args.results}: not started yet", *slurm]))
        return 0
    st = status(Store(args.results))
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"study {st['study']} in {st['results']}")
    print(f"  cells {st['total']}: {st['done']} done ({st['ok']} ok, {st['failed']} failed, "
          f"{st['diverged']} diverged), {st['pending']} pending, {st['running']} running"
          + (f", {st['interrupted']} interrupted (will resume from checkpoints)" if st["interrupted"] else ""))
    print(f"  compute spent: {short_duration(st['compute_s'])}"
          + (f", mean {st['mean_cell_s']:.1f} s per cell, "
             f"ETA {short_duration(st['eta_compute_s'])} of compute for the pending cells"
             if st["mean_cell_s"] else ""))
    if st["training"]["fused"]:
        print(f"  trained: {st['training']['solo']} cells one per trial, "
              f"{st['training']['fused']} in fused groups (a group's time counted once)")
    d = st["driver"]
    print(f"  driver: host {d['host']}, pid {d['pid']}, started {d['started_at']}" if d
          else "  driver: none running")
    for line in slurm:
        print(line)
    return 0


def _outputs(results, compare, pairs, report: bool, margin=None) -> None:
    """Draw the figures and tables (and the report, which embeds them) and print the paths."""
    if margin is not None:
        # a bad margin is refused before anything is drawn; a good one that differs from the
        # saved analysis plan is recorded there (its verdicts are exploratory)
        from .analysis_plan import record_override

        record_override(results, parse_margin(margin, "--margin"))
    import analysis

    if report:
        html = analysis.write_report(results, compare=tuple(compare), pairs=pairs, margin=margin)
        paths = sorted(p for p in Store(results).figures_dir.iterdir() if p.is_file())
    else:
        paths = analysis.write_figures(results, compare=tuple(compare), pairs=pairs,
                                       margin=margin)
    for p in paths:
        print(f"{'figure' if p.suffix in ('.png', '.pdf') else 'written'}: {p}")
    if report:
        print(f"report: {html}")


def cmd_figures(args) -> int:
    pairs = [p for p in args.pairs.split(",") if p] if args.pairs else None
    _outputs(Path(args.results), args.compare, pairs, report=False, margin=args.margin)
    return 0


def cmd_report(args) -> int:
    _outputs(Path(args.results), args.compare, None, report=True, margin=args.margin)
    return 0


def _export_targets(values: list[str]) -> list:
    if not values:
        return []
    from .export import MissingPackage, parse_targets, require

    targets = parse_targets(values)
    for kind, _ in targets:
        with as_spec_error(MissingPackage):
            require(kind)
    return targets


def cmd_export(args) -> int:
    from .export_command import export

    return export(args)


def cmd_lesion(args) -> int:
    from .lesion import run_lesion

    import analysis

    df, paths = run_lesion(args.results, data_dir=args.data_dir)
    paths += analysis.write_lesion_figure(args.results)  # analysis draws, study computes
    print(f"lesions: {len(df)} evaluations")
    for note in df.attrs.get("notes", []):
        print(f"note: {note}")
    for p in paths:
        print(f"written: {p}")
    return 0


def cmd_plan(args) -> int:
    from .plan_command import plan

    return plan(args)


COMMANDS = {"plan": cmd_plan, "run": cmd_run, "resume": cmd_resume, "status": cmd_status,
            "figures": cmd_figures, "report": cmd_report, "lesion": cmd_lesion,
            "export": cmd_export, "k8s": k8s.cmd_k8s, "slurm": cmd_slurm}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import ClusterError, DatasetError

    stoppable = (interrupt.handling_signals() if args.command in ("run", "resume")
                 else contextlib.nullcontext())
    try:
        with stoppable:
            code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at exit
        return code
    except SpecError as e:
        print(f"study: {e}", file=sys.stderr)
        return EXIT_SPEC
    except (StoreError, DatasetError, ClusterError) as e:
        print(f"study: {e}", file=sys.stderr)
        return EXIT_ENV
    except KeyboardInterrupt:
        print("study: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`study plan ... | head`): nothing is wrong. Point stdout at
        # nothing so the interpreter's final flush does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a command ended by SIGPIPE
    except Exception as e:
        # Only the commands that draw import analysis (matplotlib and scipy: ~1.7 s of a
        # `study run`'s start-up otherwise); an AnalysisError implies it was imported.
        analysis = sys.modules.get("analysis")
        if analysis is not None and isinstance(e, analysis.AnalysisError):
            print(f"study: {e}", file=sys.stderr)
            return EXIT_ENV
        raise


if __name__ == "__main__":
    sys.exit(main())
