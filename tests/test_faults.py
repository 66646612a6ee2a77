"""Faults with nothing lost: real processes, real Ray, real files (issue: resume and faults).

Each scenario kills, breaks or overloads something for real and then checks the store: one
row per cell, no row lost or rewritten, interrupted cells resumed from their checkpoints.
"""
import json
import os
import secrets
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from study.options import TrialOptions
from study.runner import RunOptions, run_study
from study.schema import STATUSES
from study.store import Store
from sweep import load_spec

from conftest import TINY_SPEC, checkpointed_in_flight, run_cli
from procs import freeze_when, kill_tree

SLOW_SPEC = """
[study]
name = "slow"

[grid]
dataset = "digits"
architecture = ["sequential", "parallel"]
layers = [1, 2, 3]
filters = [4, 8]
kernel = 3
epochs = 40
batch_size = 32
max_train_examples = 600
"""


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "study.cli", *map(str, args)]


def _rows(out: Path) -> dict[str, str]:
    """cell_id -> its trial row, spelled out (compaction moves rows between files: compare
    rows, not files)."""
    df = Store(out).read_trials()
    return {r["cell_id"]: repr(sorted(r.items())) for r in df.to_dict("records")}


def _wait_for(predicate, timeout: float, what: str, proc=None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = predicate()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) before {what}: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _assert_one_row_per_cell(out: Path, spec) -> "pd.DataFrame":
    ids = sorted(c.cell_id for c in spec.cells())
    raw = pq.ParquetDataset(out / "trials").read(columns=["cell_id"])  # as any reader sees it
    assert sorted(raw["cell_id"].to_pylist()) == ids
    df = Store(out).read_trials()
    assert sorted(df["cell_id"]) == ids  # none missing, none duplicated
    return df


@pytest.mark.slow
def test_driver_sigkilled_mid_study_resumes_with_nothing_lost(tmp_path):
    spec_path = tmp_path / "slow.toml"
    spec_path.write_text(SLOW_SPEC)
    spec = load_spec(spec_path)
    out = tmp_path / "res"
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths are capped
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "STUDY_CHECKPOINT_EVERY_S": "0"}
    driver = subprocess.Popen(_cli("run", spec_path, "--results", out, "--no-figures"), env=env,
                              start_new_session=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    store = Store(out)
    try:
        def landed_and_in_flight():
            rows = store.part_ids(store.trials_dir)
            flying = checkpointed_in_flight(store)
            return (rows, flying) if rows and flying else None
        freeze_when(driver, landed_and_in_flight, 240, "a landed row and a cell in flight")
        killed = kill_tree(driver.pid, marker=ray_tmp)  # the driver, Ray, its workers
        assert killed >= 2
        driver.wait(timeout=30)
        before = _rows(out)  # every row written before the kill
    finally:
        kill_tree(driver.pid, marker=ray_tmp)
    interrupted = set(store.in_flight())
    # a cell marks itself in flight when it starts; those with a checkpoint resume from it
    checkpointed = set(checkpointed_in_flight(store))
    assert checkpointed
    assert interrupted and len(before) < len(spec.cells())

    st = json.loads(run_cli("status", out, "--json").stdout)
    assert st["running"] == 0 and st["interrupted"] == len(interrupted)
    assert st["done"] == len(before)
    assert store.lock_path.exists()  # the dead driver's lock, to be taken over

    r = run_cli("resume", out, "--no-figures", env={"RAY_TMPDIR": ray_tmp})
    kill_tree(marker=ray_tmp)
    assert r.returncode == 0, r.stderr
    assert "took over a stale lock" in r.stderr
    df = _assert_one_row_per_cell(out, spec)
    after = _rows(out)
    assert all(after[c] == row for c, row in before.items())  # untouched
    resumed = df.set_index("cell_id").loc[sorted(checkpointed - set(before))]
    assert (resumed["resumed_from_epoch"] > 0).all()  # not from epoch 0
    assert (df["status"] == "ok").all() and (df["epochs_done"] == 40).all()
    assert not list(store.checkpoints_dir.glob("*.pt")) and not store.lock_path.exists()
    ep = store.read_epochs()
    assert len(ep) == 40 * len(spec.cells()) and not ep.duplicated(["cell_id", "epoch"]).any()


def test_failures_divergence_and_retry_failed(tmp_path):
    spec_path = tmp_path / "f.toml"
    spec_path.write_text(TINY_SPEC.replace("lr = 3e-3", "lr = [3e-3, 1e6]"))
    spec = load_spec(spec_path)
    out = tmp_path / "res"
    r = run_cli("run", spec_path, "--results", out, "--executor", "local", "--no-figures",
                env={"STUDY_INJECT_FAULT": "layers=2,lr=0.003@1"})
    assert r.returncode == 1, r.stderr  # the study finished, with failed cells
    df = _assert_one_row_per_cell(out, spec)
    failed = df[df["status"] == "failed"]
    assert len(failed) == 2 and (failed["layers"] == 2).all() and (failed["attempts"] == 3).all()
    assert failed["error"].str.contains("InjectedFault: injected fault at epoch 1").all()
    diverged = df[df["status"] == "diverged"]
    assert len(diverged) == 4 and (diverged["attempts"] == 1).all()
    assert diverged["error"].str.contains("non-finite").all()
    assert set(df["status"]) == set(STATUSES)  # every status the schema names, and no other

    r = run_cli("run", spec_path, "--results", out, "--executor", "local", "--no-figures")
    assert "nothing to run" in r.stderr  # failed cells wait for --retry-failed
    r = run_cli("run", spec_path, "--results", out, "--executor", "local", "--no-figures",
                "--retry-failed")
    assert r.returncode == 0 and "ran 2 cells (2 ok" in r.stdout
    df = _assert_one_row_per_cell(out, spec)
    assert (df["status"] == "ok").sum() == 4 and (df["status"] == "diverged").sum() == 4


def test_a_cell_raising_under_ray_is_retried_from_its_checkpoint(ray_session, tmp_path, monkeypatch):
    spec_path = tmp_path / "t.toml"
    spec_path.write_text(TINY_SPEC.replace("epochs = 2", "epochs = 3"))
    monkeypatch.setenv("STUDY_INJECT_FAULT", "layers=2,architecture=parallel@3x1")
    monkeypatch.setenv("STUDY_CHECKPOINT_EVERY_S", "0")
    out = tmp_path / "res"
    summary = run_study(load_spec(spec_path), RunOptions(TrialOptions(str(out)), quiet=True))
    assert summary.ok + summary.copied == 4  # parallel@1 is recorded from sequential@1
    df = Store(out).read_trials().set_index("architecture")
    hit = df[df["layers"] == 2].loc["parallel"]
    assert hit["attempts"] == 2 and hit["resumed_from_epoch"] == 2


def test_units_run_in_fits_of_a_capped_size(ray_session, tmp_path, monkeypatch):
    """More units than TRIALS_PER_FIT go through Tune in several fits of about equal size
    (Tune's per-step scans stay bounded); every cell lands once, a raising cell is still
    retried within its fit, and the progress counts end at zero."""
    from ray import tune

    import study.executors.ray_tune as rt

    assert rt._chunks(list(range(10)), slots=1) == [list(range(10))]
    monkeypatch.setattr(rt, "TRIALS_PER_FIT", 4)
    monkeypatch.setattr(rt, "TRIALS_PER_SLOT", 1)
    assert rt._chunks(list(range(9)), slots=2) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert [len(c) for c in rt._chunks(list(range(9)), slots=8)] == [5, 4]  # 8 a fit
    fits = []
    fit = tune.Tuner.fit
    monkeypatch.setattr(tune.Tuner, "fit", lambda self: fits.append(1) or fit(self))
    spec_path = tmp_path / "t.toml"
    spec_path.write_text(TINY_SPEC + "seed = [0, 1, 2]\n")
    monkeypatch.setenv("STUDY_INJECT_FAULT", "layers=2,architecture=parallel,seed=1@2x1")
    out = tmp_path / "res"
    summary = run_study(load_spec(spec_path), RunOptions(TrialOptions(str(out)), quiet=True))
    assert summary.ok + summary.copied == 12 and summary.ok == 9  # 3 same-network copies
    assert len(fits) == 3  # 9 units in fits of at most 4
    df = Store(out).read_trials()
    assert len(df) == 12 and df["cell_id"].is_unique and (df["status"] == "ok").all()
    hit = df[(df["layers"] == 2) & (df["architecture"] == "parallel") & (df["seed"] == 1)]
    assert hit["attempts"].tolist() == [2]


def test_second_driver_refused_and_stale_lock_taken_over(tmp_path):
    spec_path = tmp_path / "slow.toml"
    spec_path.write_text(SLOW_SPEC.replace("layers = [1, 2, 3]", "layers = 1")
                         .replace("filters = [4, 8]", "filters = 4").replace("epochs = 40", "epochs = 600")
                         .replace("max_train_examples = 600", "max_train_examples = 200"))
    out = tmp_path / "res"
    first = subprocess.Popen(_cli("run", spec_path, "--results", out, "--executor", "local",
                                  "--no-figures"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True,
                             env={**os.environ, "STUDY_CHECKPOINT_EVERY_S": "0"})
    try:
        _wait_for(lambda: (out / "driver.lock").exists(), 60, "the first driver's lock", first)
        r = run_cli("run", spec_path, "--results", out, "--executor", "local", "--no-figures")
        assert r.returncode == 3
        assert f"pid {first.pid}" in r.stderr and socket.gethostname() in r.stderr
        assert "started 20" in r.stderr and "Traceback" not in r.stderr
        r = run_cli("resume", out, "--executor", "local", "--no-figures")
        assert r.returncode == 3 and "in use by another driver" in r.stderr
        # status sees the live driver and its cell in flight (from the lock and checkpoints)
        _wait_for(lambda: Store(out).in_flight(), 60, "a checkpoint", first)
        st = json.loads(run_cli("status", out, "--json").stdout)
        assert st["running"] == 1 and st["driver"]["pid"] == first.pid, st
        assert st["done"] < 2 and st["pending"] == 2 - st["done"], st
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    r = run_cli("resume", out, "--executor", "local", "--no-figures")
    assert r.returncode == 0 and "took over a stale lock" in r.stderr
    assert len(Store(out).read_trials()) == 2


def test_damaged_part_is_quarantined_and_its_cell_rerun(tmp_path, tiny_spec):
    out = tmp_path / "res"
    assert run_cli("run", tiny_spec, "--results", out, "--executor", "local", "--no-figures").returncode == 0
    before = _rows(out)
    # the run ended with a compaction: its 4 rows are in one merged file; break it
    victim = sorted((out / "trials").glob("merged-*.parquet"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    r = run_cli("run", tiny_spec, "--results", out, "--executor", "local", "--no-figures")
    assert r.returncode == 0, r.stderr
    assert victim.name in r.stderr and "quarantine" in r.stderr
    # the merged file held all 4 rows: 3 networks train again, the layers-1 copy is recorded
    assert "ran 3 cells (3 ok" in r.stdout and "4 of 4 cells done" in r.stdout
    assert set(_rows(out)) == set(before)
    moved = sorted(p.name for p in (out / "quarantine").glob("*.parquet"))
    assert [m.split("-2")[0] for m in moved] == [f"epochs-{victim.stem}", f"trials-{victim.stem}"]
    _assert_one_row_per_cell(out, load_spec(tiny_spec))


def test_extending_a_study_runs_only_new_cells(tmp_path, tiny_spec):
    out = tmp_path / "res"
    assert run_cli("run", tiny_spec, "--results", out, "--executor", "local", "--no-figures").returncode == 0
    before = _rows(out)
    bigger = tmp_path / "bigger.toml"
    bigger.write_text(tiny_spec.read_text().replace("layers = [1, 2]", "layers = [1, 2, 3]"))
    r = run_cli("run", bigger, "--results", out, "--executor", "local", "--no-figures")
    assert r.returncode == 0 and "ran 2 cells" in r.stdout
    after = _rows(out)
    assert len(after) == 6 and all(after[c] == b for c, b in before.items())
    import analysis
    assert len(analysis.load(out)) == 6
    # `resume` now continues the extended study
    assert "spec.toml" in os.listdir(out) and "layers = [1, 2, 3]" in (out / "spec.toml").read_text()
    # a changed fixed parameter is refused and nothing changes
    changed = tmp_path / "changed.toml"
    changed.write_text(bigger.read_text().replace("epochs = 2", "epochs = 5"))
    r = run_cli("run", changed, "--results", out, "--executor", "local", "--no-figures")
    assert r.returncode == 2 and "spec changes 'epochs'" in r.stderr and "new study" in r.stderr
    assert _rows(out) == after


def _limit_file_size():
    # A real kernel limit: writes past 12 KB fail with EFBIG, like a full disk would.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, 12_000))


def test_disk_full_while_writing_a_part(tmp_path, tiny_spec):
    out = tmp_path / "res"
    r = subprocess.run(_cli("run", tiny_spec, "--results", out, "--executor", "local", "--no-figures"),
                       capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=300)
    assert r.returncode == 3, r.stderr
    assert "cannot write" in r.stderr and "File too large" in r.stderr and "free some space" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list((out / "trials").glob("*")) and not list((out / "epochs").glob("*"))
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    # with room again the same command finishes the study
    r = run_cli("run", tiny_spec, "--results", out, "--executor", "local", "--no-figures")
    assert r.returncode == 0
    _assert_one_row_per_cell(out, load_spec(tiny_spec))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_worker_node_lost_mid_study(tmp_path):
    base = tempfile.mkdtemp(prefix="rn", dir="/tmp")
    # a loopback-only test cluster; its address file in a private RAY_TMPDIR, so that no
    # plain `ray.init()` elsewhere on this machine attaches to it
    token = Path(base) / "auth_token"  # token authentication on, with a token of its own
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_TMPDIR": base}
    env.pop("RAY_AUTH_TOKEN", None)
    port = _free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    spec_path = tmp_path / "slow.toml"
    spec_path.write_text(SLOW_SPEC.replace("epochs = 40", "epochs = 25"))
    spec = load_spec(spec_path)
    out = tmp_path / "res"
    driver = None
    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=1",
                        f"--temp-dir={base}/h", "--include-dashboard=false",
                        "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1",
                        f"--temp-dir={base}/w"], env=env, check=True, capture_output=True, timeout=120)
        driver = subprocess.Popen(_cli("run", spec_path, "--results", out, "--no-figures",
                                       "--address", f"127.0.0.1:{port}", "--max-failures", "3"),
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        store = Store(out)

        def two_nodes_ran_cells():
            df = store.read_trials()
            return df["node_id"].nunique() >= 2 and len(df) < len(spec.cells()) - 2
        _wait_for(two_nodes_ran_cells, 240, "cells from both nodes", driver)
        assert kill_tree(marker=f"{base}/w") >= 1  # the worker node's raylet and workers
        killed_at = pd.Timestamp.now(tz="UTC")
        stdout, stderr = driver.communicate(timeout=400)
        assert driver.returncode == 0, stderr
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        kill_tree(marker=base)
    df = _assert_one_row_per_cell(out, spec)
    assert (df["status"] == "ok").all()
    assert df["node_id"].nunique() == 2 and (df["host"] == socket.gethostname()).all()
    # after the loss only the head node ran cells
    later = df[df["finished_at"] > killed_at + pd.Timedelta(seconds=1)]
    assert len(later) >= 1 and later["node_id"].nunique() == 1


@pytest.mark.slow
def test_chaos_small_driver_killed_twice_two_worker_nodes_lost():
    """benchmarks/chaos.py at a few hundred cells: nothing lost, nothing twice."""
    chaos = Path(__file__).resolve().parents[1] / "benchmarks" / "chaos.py"
    import importlib.util

    spec = importlib.util.spec_from_file_location("chaos", chaos)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if mod.why_not():
        pytest.skip(mod.why_not())
    # one cell per trial: 200 bundled near-empty cells finish before the first kill is due
    r = subprocess.run([sys.executable, str(chaos), "--cells", "200", "--kills", "2",
                        "--epochs", "3", "--seed", "1", "--bundle", "off"], capture_output=True,
                       text=True, timeout=900)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rows: 200 (pyarrow), 200 (DuckDB) for 200 cells" in r.stdout
    assert "distinct (cell, epoch): 600; N x epochs = 600" in r.stdout
    assert r.stdout.count("  driver SIGKILLed at") == 2 and "Ray processes left running: 0" in r.stdout
