"""Bundles (study.bundles): small cells one after another in one Ray trial. The plan is pure;
the runs are real Ray trials training real cells, compared with one cell per trial."""
import pandas as pd
import pytest

import study.executors.ray_tune as rt
from study.bundles import MAX_UNITS, SMALL_FLOPS, parse_bundle, plan_bundles, unit_cost
from study.options import TrialOptions
from study.runner import RunOptions, run_study
from study.store import Store
from sweep import load_spec, parse_spec

from conftest import TINY_SPEC, run_cli

SMALL = {"dataset": "digits", "architecture": "sequential", "layers": 2, "filters": 1,
         "kernel": 1, "epochs": 5, "batch_size": 16, "max_train_examples": 16,
         "val_fraction": 0.01}
LARGE = {**SMALL, "filters": 64, "kernel": 3, "epochs": 50, "max_train_examples": None}


def test_small_units_are_bundled_and_large_ones_stay_alone():
    assert unit_cost([SMALL])[0] < SMALL_FLOPS < unit_cost([LARGE])[0]
    units = [[SMALL]] * 10 + [[LARGE]] + [[SMALL]] * 3
    plan = plan_bundles(units, "auto", slots=1)
    # consecutive small units together (4 trials per slot: at most 14 // 4 = 3 a bundle),
    # the large one alone, every unit once and in order
    assert plan == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9], [10], [11, 12, 13]]
    assert plan_bundles(units, "off", slots=1) == [[i] for i in range(14)]
    assert plan_bundles(units, 2, slots=1)[:2] == [[0, 1], [2, 3]]
    # never fewer than 4 trials for each slot of the cluster
    assert plan_bundles(units, "auto", slots=8) == [[i] for i in range(14)]
    many = plan_bundles([[SMALL]] * 1000, "auto", slots=2)
    assert max(map(len, many)) == MAX_UNITS and sum(map(len, many)) == 1000
    # a fused group is one unit: its members' FLOPs add up, their steps do not
    f, s = unit_cost([SMALL, SMALL])
    assert (f, s) == (2 * unit_cost([SMALL])[0], unit_cost([SMALL])[1])


def test_bundle_values_are_refused_in_one_line(tmp_path, tiny_spec):
    assert parse_bundle("AUTO") == "auto" and parse_bundle("off") == "off" and parse_bundle("8") == 8
    for bad in ("0", "x", "2.5"):
        with pytest.raises(ValueError, match="--bundle"):
            parse_bundle(bad)
    out = tmp_path / "res"
    r = run_cli("run", tiny_spec, "--results", out, "--bundle", "many")
    assert r.returncode == 2 and "--bundle takes off, auto or a whole number" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


SUGGEST = rt.CellSearcher.suggest  # as Ray Tune calls it; each run counts its own trials
SEEDS = TINY_SPEC + "seed = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]\n"  # 36 trained cells
VALUES = ["cell_id", "status", "train_loss", "val_loss", "test_loss", "train_acc", "val_acc",
          "test_acc", "n_params", "epochs_done", "attempts", "resumed_from_epoch",
          "same_network_as", "group_size"]


def _run(tmp_path, name, bundle, monkeypatch, fault=None, max_failures=2):
    """A real run under the session's Ray; returns its rows, epoch rows and Tune's trials."""
    trials = []
    suggest = SUGGEST

    def counted(self, trial_id):
        got = suggest(self, trial_id)
        if isinstance(got, dict):
            trials.append(got["units"])
        return got
    monkeypatch.setattr(rt.CellSearcher, "suggest", counted)
    if fault:
        monkeypatch.setenv("STUDY_INJECT_FAULT", fault)
    spec_path = tmp_path / f"{name}.toml"
    spec_path.write_text(SEEDS)
    out = tmp_path / name
    summary = run_study(load_spec(spec_path), RunOptions(
        TrialOptions(str(out), max_failures=max_failures), quiet=True, bundle=bundle))
    store = Store(out)
    return summary, store.read_trials(), store.read_epochs(), trials


def test_bundled_cells_train_to_the_values_they_train_to_alone(ray_session, tmp_path, monkeypatch):
    n = len(parse_spec(SEEDS).cells())
    off = _run(tmp_path, "off", "off", monkeypatch)
    on = _run(tmp_path, "on", 4, monkeypatch)
    for summary, trials, epochs, _ in (off, on):
        assert summary.ok + summary.copied == n and len(trials) == n
        assert trials["cell_id"].is_unique and (trials["status"] == "ok").all()
    assert [len(t) for t in off[3]] == [1] * 36
    assert [len(t) for t in on[3]] == [4] * 9  # 36 units, 2 slots: bundles of 4
    key = ["cell_id"]
    pd.testing.assert_frame_equal(off[1][VALUES].sort_values(key).reset_index(drop=True),
                                  on[1][VALUES].sort_values(key).reset_index(drop=True))
    cols = ["cell_id", "epoch", "train_loss", "val_loss", "train_acc", "val_acc"]
    pd.testing.assert_frame_equal(
        off[2][cols].sort_values(["cell_id", "epoch"]).reset_index(drop=True),
        on[2][cols].sort_values(["cell_id", "epoch"]).reset_index(drop=True))


@pytest.mark.parametrize("max_failures", [2, 0])
def test_a_worker_lost_in_a_bundle_loses_no_cell(ray_session, tmp_path, monkeypatch, max_failures):
    """A bundle's worker exits in the middle of its third cell. With retries left, Tune
    restarts the bundle (the cells it had finished, unsent, train again; none lands twice);
    with none, its cells that had not landed go into another pass, one per trial. Either
    way every cell lands once, ok."""
    n = len(parse_spec(SEEDS).cells())
    summary, trials, epochs, tune_trials = _run(
        tmp_path, f"lost{max_failures}", 4, monkeypatch, max_failures=max_failures,
        fault="exit:layers=2,architecture=parallel,seed=5@2")
    assert summary.ok + summary.copied == n and summary.failed == 0
    assert len(trials) == n and trials["cell_id"].is_unique and (trials["status"] == "ok").all()
    assert not epochs.duplicated(["cell_id", "epoch"]).any()
    assert (tmp_path / f"lost{max_failures}" / ".injected-exit").exists()  # it did exit
    if max_failures == 0:
        # the lost bundle's units came back one per trial
        assert [len(t) for t in tune_trials[:9]] == [4] * 9 and len(tune_trials) > 9
        assert all(len(t) == 1 for t in tune_trials[9:])


STOP_SPEC = """
[study]
name = "stop"
[grid]
dataset = "digits"
architecture = ["sequential", "parallel"]
layers = [2, 3]
filters = 1
kernel = 1
epochs = 200
batch_size = 16
max_train_examples = 16
val_fraction = 0.01
seed = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
"""


@pytest.mark.slow
def test_a_stop_signal_ends_each_bundle_between_cells(tmp_path):
    """SIGTERM to the driver once a cell has landed: each bundle in flight checkpoints the
    cell it is training and starts none of its others (in a bundle: cells landed, then at
    most one checkpointed, then cells never begun). A resume trains every cell once."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import checkpointed_in_flight

    spec_path = tmp_path / "stop.toml"
    spec_path.write_text(STOP_SPEC)
    out = tmp_path / "res"
    cells = parse_spec(STOP_SPEC).cells()  # 72 cells of ~200 optimizer steps: 9 bundles of 8
    bundles = plan_bundles([[c.config] for c in cells], 8, slots=2)
    assert [len(b) for b in bundles] == [8] * 9
    proc = subprocess.Popen([sys.executable, "-m", "study.cli", "run", str(spec_path), "--results",
                             str(out), "--no-figures", "--bundle", "8", "--max-concurrent", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not (Store(out).trials_dir.is_dir() and Store(out).cell_ids()):
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() - t0 < 300, "no cell landed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    store = Store(out)
    landed, saved = store.cell_ids(), set(checkpointed_in_flight(store))
    assert saved and not saved & landed and len(landed) < len(cells)
    marks = ["".join("L" if cells[i].cell_id in landed else "C" if cells[i].cell_id in saved
                     else "-" for i in b) for b in bundles]
    print(marks)
    import re
    assert all(re.fullmatch(r"L*C?-*", m) for m in marks), marks
    # a bundle that stopped between cells: begun, with cells it never began
    assert any(re.fullmatch(r"L*C?-+", m) and m[0] != "-" for m in marks), marks

    r = run_cli("resume", out, "--no-figures")
    assert r.returncode == 0, r.stderr
    df = Store(out).read_trials()
    assert sorted(df["cell_id"]) == sorted(c.cell_id for c in cells)  # each cell once
    assert (df["status"] == "ok").all()
    assert set(df[df["resumed_from_epoch"] > 0]["cell_id"]) == saved
