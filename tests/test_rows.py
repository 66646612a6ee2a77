"""One way through: a cell's row built once (worker and driver), the executors by name, the
grid counted once, a Cell to and from its plain form."""
from __future__ import annotations

import pandas as pd
import pytest
from ray.tune.experiment import Trial

from study import executor_registry, schema
from study.cli import build_parser
from study.counts import count_cells
from study.options import TrialOptions
from study.progress import Progress
from study.train import run_cell
from sweep import Cell, SpecError

CONFIG = {"architecture": "sequential", "dataset": "digits", "layers": 1, "filters": 4,
          "kernel": 3, "activation": "relu", "batch_norm": False, "lr": 3e-3,
          "weight_decay": 1e-4, "batch_size": 64, "epochs": 1, "seed": 0,
          "val_fraction": 0.1, "max_train_examples": 100}


def test_cell_round_trips_through_its_plain_form():
    c = Cell.from_config(CONFIG)
    assert Cell.from_dict(c.to_dict()) == c
    assert c.to_dict() == {"config": c.config, "cell_id": c.cell_id, "pair_key": c.pair_key}


def test_a_failed_row_is_the_same_row_on_the_worker_and_on_the_driver(tmp_path):
    """run_cell (a cell that keeps raising) and the Ray driver's row for a trial whose worker
    died (StoreCallback.on_trial_error) come from one builder: the same fields, schema-clean."""
    from study.executors.ray_tune import StoreCallback

    cell = Cell.from_config(CONFIG).to_dict()
    opts = TrialOptions(results_dir=str(tmp_path), study="s", device="cpu", max_failures=0,
                        inject_fault="layers=1@1")
    worker_row, _ = run_cell(cell, opts)

    landed = []
    callback = StoreCallback(lambda row, epochs: landed.append(row), Progress(1, 0, quiet=True),
                             opts, max_failures=2, units=[[cell]])
    trial = Trial("tune_trial", config={"units": [0]}, stub=True)  # a real (unscheduled) Tune trial
    callback.on_trial_start(0, [trial], trial)
    callback.on_trial_error(0, [trial], trial)
    (driver_row,) = landed

    for row in (worker_row, driver_row):
        assert row["status"] == "failed" and row["cell_id"] == cell["cell_id"]
        assert row["study"] == "s" and row["epochs_done"] == 0
        schema.conform([row], schema.TRIALS)  # no column outside the schema
    assert set(driver_row) == set(worker_row)
    for k in ("started_at", "finished_at", "torch_version", "project_version"):
        assert driver_row[k] is not None and worker_row[k] is not None, k
    assert driver_row["started_at"] <= driver_row["finished_at"]
    assert driver_row["torch_version"] == worker_row["torch_version"]
    assert driver_row["attempts"] == 3 and driver_row["error"] == "Ray trial failed (worker lost)"
    assert worker_row["error"].endswith("injected fault at epoch 1 (attempt 1)")


def test_a_lost_group_trial_lands_a_failed_row_for_every_member(tmp_path):
    """A fused group's trial whose worker died: each member gets its failed row, with the
    group's id and size, the same fields as a worker's row."""
    from study.executors.ray_tune import StoreCallback

    unit = [Cell.from_config({**CONFIG, "seed": s}).to_dict() for s in (0, 1)]
    opts = TrialOptions(results_dir=str(tmp_path), study="s", device="cpu")
    landed = []
    progress = Progress(2, 0, quiet=True)
    callback = StoreCallback(lambda row, epochs: landed.append(row), progress, opts,
                             max_failures=2, units=[unit])
    trial = Trial("tune_trial", config={"units": [0]}, stub=True)
    callback.on_trial_start(0, [trial], trial)
    assert progress.running == 2 and progress.trials == 1
    callback.on_trial_error(0, [trial], trial)
    assert progress.running == 0 and progress.trials == 0
    assert [r["cell_id"] for r in landed] == [c["cell_id"] for c in unit]
    assert all(r["status"] == "failed" and r["group_size"] == 2 for r in landed)
    assert len({r["fused_group"] for r in landed}) == 1 and landed[0]["fused_group"]
    schema.conform(landed, schema.TRIALS)


def test_a_lost_bundle_sends_its_cells_not_landed_into_another_pass(tmp_path):
    """A bundle's trial Tune gave up on, with retries of its own spent: the cells it had
    landed stay as they are, and the units it had not go into the next pass one per trial
    (no failed row: the loss was charged to no one cell). A trial of one unit lands its
    failed row, as before."""
    from study.executors import codec
    from study.executors.ray_tune import StoreCallback

    units = [[Cell.from_config({**CONFIG, "seed": s}).to_dict()] for s in range(4)]
    opts = TrialOptions(results_dir=str(tmp_path), study="s", device="cpu")
    landed = []
    progress = Progress(4, 0, quiet=True)
    callback = StoreCallback(lambda row, epochs: landed.append(row), progress, opts,
                             max_failures=2, units=units)
    trial = Trial("tune_trial", config={"units": [0, 1, 2, 3]}, stub=True)
    callback.on_trial_start(0, [trial], trial)
    assert progress.running == 1 and progress.trials == 1  # a bundle trains a unit at a time
    row = run_cell(units[0][0], opts)
    for _ in range(2):  # sent again by a restarted bundle: landed once
        callback.on_trial_result(0, [trial], trial, codec.encode_all([row]))
    assert [r["cell_id"] for r in landed] == [units[0][0]["cell_id"]]
    callback.on_trial_error(0, [trial], trial)
    assert callback.requeue == [[1], [2], [3]] and len(landed) == 1
    assert progress.running == 0 and progress.trials == 0
    single = Trial("tune_trial", config={"units": [1]}, stub=True)
    callback.requeue = []
    callback.on_trial_start(0, [single], single)
    callback.on_trial_error(0, [single], single)  # may_requeue is off: the last pass
    assert callback.requeue == [] and landed[-1]["cell_id"] == units[1][0]["cell_id"]
    assert landed[-1]["status"] == "failed"


def test_executors_by_name():
    assert executor_registry.list_executors() == ["ray", "local"]  # the first is the default
    with pytest.raises(SpecError, match="unknown executor 'dask'; use ray or local"):
        executor_registry.get("dask")
    for name in executor_registry.list_executors():
        assert callable(executor_registry.get(name).runner())
    # the CLI's choices are the registry's
    run = build_parser()._subparsers._group_actions[0].choices["run"]
    action = next(a for a in run._actions if a.dest == "executor")
    assert list(action.choices) == executor_registry.list_executors() and action.default == "ray"


def test_cells_counted_once():
    trials = pd.DataFrame({"cell_id": ["a", "b", "c", "x"],
                           "status": ["ok", "failed", "diverged", "ok"]})
    n = count_cells(trials, ["a", "b", "c", "d", "e"], in_flight=["d", "a", "y"])
    assert (n.total, n.ok, n.failed, n.diverged, n.done, n.pending) == (5, 1, 1, 1, 3, 2)
    assert (n.in_flight, n.outside, n.to_run) == (1, 1, ["d", "e"])
    assert count_cells(trials, ["a", "b", "c", "d", "e"], retry_failed=True).to_run == ["b", "d", "e"]
    # grid unknown (no readable spec): every row counts, nothing is pending or to run
    n = count_cells(trials, None, in_flight=["d", "a"])
    assert (n.total, n.ok, n.done, n.pending, n.in_flight, n.outside) == (None, 2, 4, None, 1, 0)
