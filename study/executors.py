"""How to run the pending cells: in-process one after another, or as Ray Tune trials.

Both run `train.run_cell` and hand each finished (row, epochs) to the driver's `land`.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
from typing import Callable


def _quiet_ray_env() -> None:
    # Tune's per-trial CSV/JSON/TensorBoard loggers cost I/O per trial and duplicate what
    # the Parquet store holds; our own progress line replaces Tune's table.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1000")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_RESULT_BUFFER_LENGTH", "1")


# Before Ray is imported: some of these are read at import time.
_quiet_ray_env()

import ray  # noqa: E402
from ray import tune  # noqa: E402

from sweep import Cell  # noqa: E402

from .store import StoreError  # noqa: E402
from .train import TrialOptions, run_cell  # noqa: E402

Land = Callable[[dict, list[dict]], None]


def _cell_dict(c: Cell) -> dict:
    return {"config": c.config, "cell_id": c.cell_id, "pair_key": c.pair_key}


def run_local(pending: list[Cell], opts: TrialOptions, land: Land, progress) -> None:
    """Debugging/test executor: the same trial function, in this process, in order."""
    for c in pending:
        progress.running = 1
        progress.tick()
        row, epochs = run_cell(_cell_dict(c), opts, report=lambda m: progress.tick())
        progress.running = 0
        land(row, epochs)


# -- Ray Tune -------------------------------------------------------------------------------
_TS_FIELDS = ("started_at", "finished_at")


def _encode(row: dict, epochs: list[dict]) -> dict:
    row = {k: (v.isoformat() if k in _TS_FIELDS and v is not None else v) for k, v in row.items()}
    return {"row_json": json.dumps(row), "epochs_json": json.dumps(epochs)}


def _decode(result: dict) -> tuple[dict, list[dict]]:
    row = json.loads(result["row_json"])
    for k in _TS_FIELDS:
        if row.get(k):
            row[k] = dt.datetime.fromisoformat(row[k])
    return row, json.loads(result["epochs_json"])


def tune_trial(config: dict) -> None:
    """The Ray Tune function trainable: one cell, per-epoch reports, then the row."""
    opts = TrialOptions(**config["opts"])
    node_id = ray.get_runtime_context().get_node_id()
    row, epochs = run_cell(config["cell"], opts, report=tune.report, node_id=node_id)
    tune.report({"final": 1, **_encode(row, epochs)})


def ensure_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to `address`, or start a local Ray in this process; True if we started it."""
    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                  configure_logging=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), **kwargs)
    return True


class StoreCallback(tune.Callback):
    """Lands each finished cell in the store from the driver, as it finishes."""

    def __init__(self, land: Land, progress, opts: TrialOptions, max_failures: int):
        self.land, self.progress, self.opts, self.max_failures = land, progress, opts, max_failures

    def __getstate__(self):
        # Tune pickles its callbacks with the experiment; ours hold the live driver
        # (streams, the store) and are never restored from Tune's state: our store is.
        return {}

    def on_trial_start(self, iteration, trials, trial, **info):
        self.progress.running += 1
        self.progress.tick()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "row_json" in result:
            self.land(*_decode(result))
        self.progress.tick()

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.progress.running = max(0, self.progress.running - 1)

    def on_trial_error(self, iteration, trials, trial, **info):
        # Ray gave up on the trial (its worker died more than max_failures times):
        # record it as failed so the study goes on; --retry-failed runs it again.
        self.progress.running = max(0, self.progress.running - 1)
        cell = trial.config["cell"]
        err = getattr(trial, "error_message", None) or "Ray trial failed (worker lost)"
        lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        row = {**cell["config"], "cell_id": cell["cell_id"], "pair_key": cell["pair_key"],
               "study": self.opts.study, "status": "failed",
               "error": lines[-1] if lines else "Ray trial failed",
               "attempts": self.max_failures + 1, "epochs_done": 0}
        self.land(row, [])


def run_ray(pending: list[Cell], opts: TrialOptions, land: Land, progress, run_opts, store) -> None:
    started = ensure_ray(run_opts.address)
    # Tune's end-of-run summary looks for the per-trial files we switched off above.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    store_errors: list[StoreError] = []

    def land_or_stop(row: dict, epochs: list[dict]) -> None:
        # A row that cannot be written (disk full, folder gone) must stop the study: going
        # on would train cells whose results are thrown away.
        try:
            land(row, epochs)
        except StoreError as e:
            store_errors.append(e)
            raise

    callback = StoreCallback(land_or_stop, progress, opts, run_opts.max_failures)

    resources = {"cpu": run_opts.cpus_per_trial, "gpu": run_opts.gpus_per_trial}
    trainable = tune.with_resources(tune_trial, resources)
    tuner = tune.Tuner(
        trainable,
        param_space={"cell": tune.grid_search([_cell_dict(c) for c in pending]),
                     "opts": opts.to_dict()},
        tune_config=tune.TuneConfig(
            reuse_actors=True,  # ~40 ms per trial instead of ~1 s of actor start-up
            max_concurrent_trials=run_opts.max_concurrent,
            trial_name_creator=lambda t: t.config["cell"]["cell_id"],
            trial_dirname_creator=lambda t: t.config["cell"]["cell_id"],
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=str((store.root / ".tune").resolve()),
            failure_config=tune.FailureConfig(max_failures=run_opts.max_failures),
            callbacks=[callback], verbose=0, log_to_file=False,
        ),
    )
    try:
        tuner.fit()
    except Exception:
        if store_errors:
            raise store_errors[0] from None
        raise
    finally:
        if started:
            ray.shutdown()
        # Tune's own bookkeeping: our store is the record of the study.
        shutil.rmtree(store.root / ".tune", ignore_errors=True)
