"""A batch system's warning (SIGUSR1 before a time limit, SIGTERM on preemption) stops a
study with nothing lost: the cells in flight checkpoint at the signal, the finished rows land,
the lock is released, the driver exits 128 + the signal, and a resume continues each cell
from the epoch it reached. Real drivers in subprocesses, real signals."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import checkpointed_in_flight, run_cli
from study.store import Store, StoreError
from study.store.lock import DriverLock
from sweep import parse_spec

LONG_SPEC = """
[study]
name = "long"

[grid]
dataset = "digits"
architecture = ["sequential", "parallel"]
layers = [2, 3]
filters = 4
kernel = 3
epochs = 400
batch_size = 32
max_train_examples = 200
"""


def _start(spec: Path, out: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "study.cli", "run", str(spec), "--results",
                             str(out), "--no-figures", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_mid_study(out: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until one cell has landed and another is in flight (it has begun its epochs)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) early: {proc.stderr.read()}")
        store = Store(out)
        if store.trials_dir.is_dir() and store.cell_ids() and store.in_flight():
            time.sleep(1.0)  # past the in-flight cell's start: it is in its epochs now
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting for a landed cell and one in flight")


def _stop_and_resume(tmp_path: Path, sig: int, *executor) -> None:
    spec_path = tmp_path / "long.toml"
    spec_path.write_text(LONG_SPEC)
    out = tmp_path / "res"
    proc = _start(spec_path, out, *executor)
    try:
        _wait_mid_study(out, proc)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig, stderr
    assert f"stopped by {name}" in stdout and f"[study] {name}:" in stderr, (stdout, stderr)
    assert "Traceback" not in stderr
    store = Store(out)
    assert not store.lock_path.exists()  # released: the next driver starts at once
    landed = store.cell_ids()
    saved = checkpointed_in_flight(store)
    assert saved and not set(saved) & landed  # every interrupted cell wrote its checkpoint
    import torch

    at = {c: torch.load(store.checkpoint_path(c), weights_only=False)["epoch"] for c in saved}
    assert all(0 < e < 400 for e in at.values()), at

    r = run_cli("resume", out, "--no-figures", *executor)
    assert r.returncode == 0, r.stderr
    spec = parse_spec(LONG_SPEC)
    df = Store(out).read_trials().set_index("cell_id")
    assert sorted(df.index) == sorted(c.cell_id for c in spec.cells())  # each cell once
    assert (df["status"] == "ok").all()
    for c, e in at.items():
        assert df.loc[c, "resumed_from_epoch"] == e  # from the checkpoint written at the signal
    epochs = Store(out).read_epochs()
    for c in at:
        assert sorted(epochs[epochs["cell_id"] == c]["epoch"]) == list(range(1, 401))


@pytest.mark.slow
def test_sigusr1_checkpoints_cells_in_flight_and_resume_continues_them(tmp_path):
    _stop_and_resume(tmp_path, signal.SIGUSR1, "--executor", "local")


@pytest.mark.slow
def test_sigterm_under_ray_checkpoints_every_trial_in_flight(tmp_path):
    _stop_and_resume(tmp_path, signal.SIGTERM, "--executor", "ray", "--cpus-per-trial", "1")


def _fresh_foreign_lock(out: Path, job: str, restart: int) -> Store:
    """A lock as a driver on another host would leave it: its heartbeat is fresh."""
    store = Store(out)
    store.root.mkdir(parents=True)
    store.lock_path.write_text(json.dumps({
        "host": socket.gethostname() + "-elsewhere", "pid": 4242, "proc_start": "1",
        "started_at": "2026-12-05T00:00:00", "slurm_job_id": job, "slurm_restart": restart}))
    return store


def test_lock_of_an_earlier_run_of_the_same_slurm_job_is_taken_over_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    store = _fresh_foreign_lock(tmp_path / "a", "77", 0)
    lock = DriverLock(store)
    took = lock.acquire()
    assert took["slurm_job_id"] == "77" and took["slurm_restart"] == 0
    assert json.loads(store.lock_path.read_text())["slurm_restart"] == 1
    lock.release()
    # another job's fresh lock, or this run's own (a second driver in one allocation): refused
    for job, restart in (("78", 0), ("77", 1)):
        store = _fresh_foreign_lock(tmp_path / f"b{job}{restart}", job, restart)
        with pytest.raises(StoreError, match="in use by another driver"):
            DriverLock(store).acquire()


def test_lock_without_slurm_keeps_the_heartbeat_rule(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    store = _fresh_foreign_lock(tmp_path / "a", "77", 0)
    with pytest.raises(StoreError, match="in use by another driver"):
        DriverLock(store).acquire()
    os.utime(store.lock_path, (time.time() - 600, time.time() - 600))
    assert DriverLock(store).acquire()["host"].endswith("-elsewhere")


STUCK = """
import os, signal, sys, time
from study import interrupt
with interrupt.handling_signals():
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    if sys.argv[2] == "again":
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    time.sleep(60)  # cells that never stop (their Ray went down with the job)
"""


@pytest.mark.parametrize("sig, again, code, line", [
    ("SIGTERM", "", 143, "did not stop within 0.5 s"),  # the grace after TERM expires
    ("SIGUSR1", "again", 138, "SIGUSR1 again: exiting now"),  # a second signal exits now
])
def test_driver_never_waits_past_its_grace_or_a_second_signal(sig, again, code, line):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", STUCK, sig, again], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "STUDY_STOP_GRACE_S": "0.5"})
    assert r.returncode == code and line in r.stderr, r.stderr
    assert time.monotonic() - t0 < 30  # not the 60 s sleep
