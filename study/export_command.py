"""`study export DIR --mlflow [URI] --tensorboard [LOGDIR]`: a study's cells into trackers,
one line per tracker on what was exported and the command that opens it."""
from __future__ import annotations

import sys

from sweep import SpecError

from .cli import EXIT_ENV, EXIT_SPEC
from .store import Store


def export(args) -> int:
    """One line per tracker: what was exported, and the command that opens it."""
    from .export import (MissingPackage, TrackerError, bound_http_retries, export_mlflow,
                         export_tensorboard)

    if args.mlflow is None and args.tensorboard is None:
        raise SpecError("study export: name a tracker, --mlflow [URI] and/or --tensorboard [LOGDIR]")
    store = Store(args.results)
    store.study_id()  # a folder without a study is refused here, in one line
    try:
        if args.mlflow is not None:
            bound_http_retries(2, 15)  # fail within about a minute, not after MLflow's minutes
            n = export_mlflow(store, args.mlflow or None, workers=max(1, args.workers))
            print(f"mlflow: {n.added} runs added, {n.replaced} replaced, {n.unchanged} unchanged "
                  f"in {n.wall_s:.1f} s ({n.where})")
            print(f"mlflow artifacts (spec, report, figures): {n.artifacts}")
            if not args.mlflow:
                print(f"open it with: mlflow ui --backend-store-uri {n.where}")
        if args.tensorboard is not None:
            n = export_tensorboard(store, args.tensorboard or None)
            print(f"tensorboard: {n.added} runs added, {n.replaced} replaced, {n.unchanged} "
                  f"unchanged in {n.wall_s:.1f} s")
            print(f"open it with: tensorboard --logdir {n.where}")
    except MissingPackage as e:
        print(f"study: {e}", file=sys.stderr)
        return EXIT_SPEC
    except TrackerError as e:
        print(f"study: {e}", file=sys.stderr)
        return EXIT_ENV
    return 0
