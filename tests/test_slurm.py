"""`study slurm` (issue 31): the sbatch script as text, the refusals, and real jobs on a real
one-node SLURM (tests/slurm_cluster.py): a study to its report, a requeue mid-study, and a
time limit reached mid-study.

The jobs run with --shared-nodes: this machine is shared, and the exclusive script's `ray
symmetric-run` ends with `ray stop`, which stops every Ray on a node (right on nodes a job
holds alone, not here). The exclusive script is checked as text and by `bash -n`.
"""
from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from study.cluster.slurm import parse_time, signal_lead
from study.store import Store
from sweep import SpecError, load_spec

from conftest import TINY_SPEC, run_cli

RAY = str(Path(sys.executable).with_name("ray"))


def _slurm_cli(spec: Path, results: Path, *args, env=None):
    """The real `study slurm` command in a subprocess."""
    return run_cli("slurm", spec, "--results", results, *args, env=env)


@pytest.fixture
def study_slurm(capsys, monkeypatch):
    """`study slurm SPEC --results DIR ...` through the CLI's own main in this process (a
    subprocess takes seconds to start on a busy machine), away from any SLURM of this
    machine: no sinfo on its PATH, so no partition is checked."""
    from study.cli import main

    def run(spec: Path, results: Path, *args, env=None) -> subprocess.CompletedProcess:
        with monkeypatch.context() as m:
            m.setenv("PATH", os.path.dirname(sys.executable))
            for key, value in (env or {}).items():
                m.setenv(key, value)
            code = main(["slurm", str(spec), "--results", str(results), *map(str, args)])
        out = capsys.readouterr()
        return subprocess.CompletedProcess([], code, out.out, out.err)
    return run


def _script(results: Path, name: str = "tiny") -> str:
    return (results / "slurm" / f"{name}.sbatch").read_text()


# -- the script as text ----------------------------------------------------------------------
def test_exclusive_script_runs_symmetric_run_and_never_holds_the_token(study_slurm, tiny_spec,
                                                                       tmp_path):
    out = tmp_path / "res"
    r = study_slurm(tiny_spec, out, "--nodes", "2", "--gpus-per-node", "2", "--time", "1-00:00",
                   "--partition", "gpu", "--account", "lab", "--max-failures", "3",
                   "--fuse", "4", "--bundle", "8", env={"PYTHONPATH": "/opt/x"})
    assert r.returncode == 0, r.stderr
    path = out / "slurm" / "tiny.sbatch"
    assert r.stdout.splitlines() == [f"written: {path}", f"submit with: sbatch {path}"]
    text = _script(out)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0  # bash parses it
    directives = [ln.split(" ", 1)[1] for ln in text.splitlines() if ln.startswith("#SBATCH ")]
    for d in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=2", "--exclusive", "--no-kill",
              "--time=1-00:00", "--partition=gpu", "--account=lab", "--requeue",
              "--open-mode=append", "--signal=B:USR1@300", "--export=NONE",
              "--dependency=singleton", f"--output={out}/slurm/%j.out", f"--chdir={out}"):
        assert d in directives, d
    # the venv of the python that wrote it, by absolute path; PYTHONPATH as it was set
    assert f"source {sys.prefix}/bin/activate\n" in text
    assert "export PYTHONPATH=/opt/x\n" in text
    assert "export SLURM_EXPORT_ENV=ALL" in text
    # Ray on every node through symmetric-run, the driver on the head with its options
    assert re.search(r"srun --nodes=2 --ntasks=2 .*--gpus-per-node=2 \\\n\s+ray symmetric-run "
                     r"--address \"\$HEAD_IP:6379\" --min-nodes 2", text)
    assert '-- "${DRIVER[@]}" --address "$HEAD_IP:6379" &' in text
    assert ("STUDY+=(--cpus-per-trial 1 --gpus-per-trial 1 --fuse 4 --bundle 8 --max-failures 3)"
            in text)
    assert 'STUDY=(run "$SLURM_FILES/spec.toml" --results "$RESULTS")' in text
    assert 'STUDY=(resume "$RESULTS")' in text
    # signals: USR1 forwarded to the driver's PID; a self-requeue after it; no ray stop here
    assert "trap on_usr1 USR1" in text and 'kill -USR1 "$(cat "$PIDFILE")"' in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert 'scancel --state=PENDING --name="$SLURM_JOB_NAME"' in text
    assert "ray stop" not in text.replace("`ray stop`", "")
    # the token: a file of this study, mode 0600, given to Ray by path only
    token_file = out / "slurm" / "ray_token"
    token = token_file.read_text()
    assert len(token) == 64 and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token not in text and "RAY_AUTH_TOKEN=" not in text
    assert 'sbcast --force --preserve "$SLURM_FILES/ray_token" "$TOKEN"' in text
    assert 'RAY_AUTH_TOKEN_PATH="$TOKEN"' in text and 'rm -rf "$TOKEN" "$RAY_TMP"' in text
    # the spec the job runs, beside the script
    assert (out / "slurm" / "spec.toml").read_text() == tiny_spec.read_text()
    # written again: the same token
    assert study_slurm(tiny_spec, out, "--time", "10").returncode == 0
    assert token_file.read_text() == token


def _port_options() -> set[str]:
    """Every port option of `ray start`, from its own help."""
    r = subprocess.run([RAY, "start", "--help"], capture_output=True, text=True, check=True)
    return set(re.findall(r"^\s+(--[a-z-]*port[a-z-]*)", r.stdout, re.M))


def test_shared_nodes_script_gives_ray_ports_of_the_jobs_own(study_slurm, tiny_spec,
                                                             tmp_path):
    out = tmp_path / "res"
    r = study_slurm(tiny_spec, out, "--nodes", "3", "--cpus-per-node", "8", "--time", "30:00",
                   "--shared-nodes", "--signal-lead", "120")
    assert r.returncode == 0, r.stderr
    text = _script(out)
    assert subprocess.run(["bash", "-n", str(out / "slurm" / "tiny.sbatch")]).returncode == 0
    assert "--exclusive" not in text and "symmetric-run" not in text
    assert "#SBATCH --cpus-per-task=8" in text and "#SBATCH --signal=B:USR1@120" in text
    # every port Ray opens is set from the job's block; the dashboard is off (its port
    # unused), and --worker-port-list is the other spelling of the worker range
    unset = {o for o in _port_options() if o not in text}
    assert unset == {"--dashboard-port", "--worker-port-list"}, unset
    assert "--include-dashboard false" in text and '--temp-dir "$RAY_TMP"' in text
    assert "RAY_TMP=/tmp/ray-study-$SLURM_JOB_ID" in text
    # blocks of distinct job ids below the ephemeral ports; the workers' range inside its block
    span = int(re.search(r"SLURM_JOB_ID % (\d+) \* (\d+)", text).group(2))
    slots = int(re.search(r"SLURM_JOB_ID % (\d+)", text).group(1))
    assert 10000 + slots * span <= 32768
    assert f"--max-worker-port $((BASE + {span - 1}))" in text
    # the head here, the two other nodes elsewhere; Ray stopped by PID
    assert 'srun --nodes=1 --ntasks=1 --cpus-per-task="$CPUS" --nodelist="$HEAD"' in text
    assert re.search(r'srun --nodes=2 --ntasks=2 .*\\\n.*--exclude="\$HEAD" \\\n'
                     r'\s+ray start --block --address "\$HEAD_IP:\$BASE"', text)
    assert 'kill -TERM "${RAY_NODES[@]}"' in text


def test_the_studys_own_settings_travel_with_the_script(study_slurm, tiny_spec, tmp_path):
    """--export=NONE leaves the submitter's environment behind: the script sets the study's
    STUDY_* knobs as they were where it was written; a bad value is refused there."""
    out = tmp_path / "res"
    r = study_slurm(tiny_spec, out, "--time", "10",
                    env={"STUDY_CHECKPOINT_EVERY_S": "120", "STUDY_STOP_GRACE_S": "45"})
    assert r.returncode == 0, r.stderr
    text = _script(out)
    assert "\nexport STUDY_CHECKPOINT_EVERY_S=120 " in text
    assert "\nexport STUDY_STOP_GRACE_S=45 " in text
    bad = tmp_path / "bad"
    r = study_slurm(tiny_spec, bad, "--time", "10", env={"STUDY_CHECKPOINT_EVERY_S": "soon"})
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "STUDY_CHECKPOINT_EVERY_S='soon': give a number of seconds" in r.stderr
    assert not bad.exists()


def test_time_limits_as_slurm_reads_them():
    for text, secs in (("10", 600), ("1:30", 120), ("00:10:00", 600), ("12:00:00", 43200),
                       ("2-0", 172800), ("1-2:30", 95400), ("1-00:00:01", 86460), ("2-", 172800)):
        assert parse_time(text) == secs, text
    for bad in ("1h", "1:2:3:4", "1-2:3:4:5", "", "-5", "1.5", "0", "00:00:00", "UNLIMITED",
                "infinite", ":30"):
        with pytest.raises(SpecError):
            parse_time(bad)
    assert signal_lead(None, 43200) == 300 and signal_lead(None, 120) == 30
    assert signal_lead(40, 120) == 40
    with pytest.raises(SpecError):
        signal_lead(61, 120)


def _other_study(folder: Path, source: str, name: str) -> None:
    folder.mkdir()
    Store(folder).save_spec(source, name, "other.toml")  # what `study run` saves first


@pytest.mark.parametrize("args, code, says", [
    (["--time", "1h"], 2, "is not a time SLURM takes"),
    (["--time", "unlimited"], 2, "needs a time limit"),
    (["--time", "2", "--signal-lead", "90"], 2, "--signal-lead 90"),
    (["--time", "10", "--gpus-per-node", "1", "--gpus-per-trial", "2"], 2,
     "--gpus-per-trial 2 is more than the --gpus-per-node 1"),
    (["--time", "10", "--gpus-per-trial", "0.5"], 2, "--gpus-per-trial 0.5 is more than"),
    (["--time", "10", "--shared-nodes"], 2, "--shared-nodes needs --cpus-per-node"),
    (["--time", "10", "--cpus-per-node", "2", "--cpus-per-trial", "4"], 2,
     "--cpus-per-trial 4 is more than"),
    (["--time", "10", "--partition", "a b"], 2, "--partition 'a b'"),
    (["--time", "10", "--fuse", "x"], 2, "--fuse takes off, auto"),
    (["--time", "10", "--bundle", "0"], 2, "--bundle N must be between 1"),
    (["--time", "10", "--chain", "0"], 2, "--chain 0"),
    (["--time", "10", "--submit"], 3, "sbatch is not on PATH"),
])
def test_bad_input_is_one_line_and_nothing_written(study_slurm, tiny_spec, tmp_path, args, code,
                                                    says):
    out = tmp_path / "res"
    r = study_slurm(tiny_spec, out, *args)  # --submit: no sbatch on the PATH
    assert r.returncode == code, r.stderr
    assert r.stderr.startswith("study: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert says in r.stderr, r.stderr
    assert not out.exists() and r.stdout == ""


def test_a_folder_of_another_study_or_missing_data_is_refused(study_slurm, tiny_spec,
                                                              tmp_path):
    other = tmp_path / "other"
    _other_study(other, TINY_SPEC.replace('name = "tiny"', 'name = "other"'), "other")
    r = study_slurm(tiny_spec, other, "--time", "10")
    assert r.returncode == 2 and "holds the study 'other', not 'tiny'" in r.stderr, r.stderr
    changed = tmp_path / "changed"  # the same name, a value the study ran with dropped
    _other_study(changed, TINY_SPEC.replace("lr = 3e-3", "lr = 1e-2"), "tiny")
    r = study_slurm(tiny_spec, changed, "--time", "10")
    assert r.returncode == 2 and "spec changes 'lr'" in r.stderr, r.stderr
    for folder in (other, changed):
        assert not (folder / "slurm").exists()
    grown = tmp_path / "grown"  # the same study, an axis extended: fine
    _other_study(grown, TINY_SPEC.replace("layers = [1, 2]", "layers = [1]"), "tiny")
    assert study_slurm(tiny_spec, grown, "--time", "10").returncode == 0
    spaced = tmp_path / "a b"
    r = study_slurm(tiny_spec, spaced, "--time", "10")
    assert r.returncode == 2 and "may not hold blanks" in r.stderr and not spaced.exists()
    mnist = tmp_path / "mnist.toml"
    mnist.write_text(TINY_SPEC.replace('"digits"', '"mnist"'))
    r = study_slurm(mnist, tmp_path / "m", "--time", "10", "--data-dir", tmp_path / "nodata")
    assert r.returncode == 3 and "dataset mnist not found" in r.stderr, r.stderr
    assert not (tmp_path / "m").exists()
    r = study_slurm(mnist, tmp_path / "m", "--time", "10", "--data-dir", tmp_path / "d",
                   "--download")
    assert r.returncode == 0 and "--download" in _script(tmp_path / "m"), r.stderr


# -- real jobs on a real one-node SLURM -------------------------------------------------------
from slurm_cluster import SlurmCluster, why_no_slurm  # noqa: E402

ENDED = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "PREEMPTED",
         "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="session")
def slurm():
    """The one-node SLURM, started once. Skipped where SLURM is not installed, except on CI
    (CI=true), which installs it (.ci/run): there it must run."""
    why = why_no_slurm()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI has no SLURM: {why}")
        pytest.skip(why)
    cluster = SlurmCluster(cpus=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _spec(tmp_path: Path, **grid) -> Path:
    text = TINY_SPEC
    for key, value in grid.items():
        text = re.sub(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
    p = tmp_path / "tiny.toml"
    p.write_text(text)
    return p


# Periodic checkpoints off in the jobs that test a warning: a cell that resumes from a
# checkpoint had it written at the signal.
NO_PERIODIC_CHECKPOINTS = {"STUDY_CHECKPOINT_EVERY_S": "3600"}


def _submit(slurm, spec: Path, out: Path, *args, env: dict | None = None) -> list[str]:
    """`study slurm --submit` on 2 shared CPUs; the ids it submitted."""
    r = _slurm_cli(spec, out, "--nodes", "1", "--cpus-per-node", "2", "--shared-nodes",
                   "--submit", *args, env={**slurm.env, **(env or {})})
    assert r.returncode == 0, r.stderr
    ids = re.search(r"submitted: jobs? ([\d, ]+) ", r.stdout).group(1).split(", ")
    assert (out / "slurm" / "jobs.txt").read_text().split() == ids
    return ids


def _snapshot(slurm, job_id: str) -> str:
    """What squeue and scontrol say of the job now (printed into the test's output)."""
    q = slurm.run("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%i %T %r start=%S")
    j = slurm.job(job_id)
    fields = " ".join(f"{k}={j.get(k)}" for k in ("JobState", "Reason", "Restarts",
                                                  "BatchFlag", "EligibleTime", "StartTime"))
    text = f"squeue: {q.stdout.strip() or q.stderr.strip()}\nscontrol show job: {fields}"
    print(f"[{time.strftime('%T')}] job {job_id}\n{text}")
    return text


RELEASE_AFTER_S = 5.0


def _wait_job(slurm, job_id: str, timeout: float, release: bool = True,
              *update: str) -> tuple[str, int]:
    """Until the job ends; one that waits on a begin time after a requeue is let go at once
    (SLURM holds a requeued job ~2 minutes), with `update` (scontrol update's KEY=VALUE) made
    to it first. Returns its state and how often it was let go."""
    deadline, released, waiting_since = time.monotonic() + timeout, 0, None
    while time.monotonic() < deadline:
        j = slurm.job(job_id)
        state = j.get("JobState", "")
        if state in ENDED:
            return state, released
        # Once the node has been idle a few seconds: the last run's processes gone, and its
        # job credential revoked in an earlier second than the new one is made (a new run
        # within the same second is refused: "Job credential revoked", the job FAILED).
        waiting = (release and state == "PENDING" and j.get("Reason") == "BeginTime"
                   and slurm.idle())
        waiting_since = (waiting_since or time.monotonic()) if waiting else None
        if waiting and time.monotonic() - waiting_since >= RELEASE_AFTER_S:
            waiting_since = None
            _snapshot(slurm, job_id)
            slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", *update,
                      check=True)
            released += 1
        time.sleep(1)
    raise AssertionError(f"job {job_id} still {state} after {timeout:.0f} s: "
                         + _output(Path(j.get("StdOut", "/nonexistent"))))


def _output(path: Path, tail: int = 4000) -> str:
    """The job's output file (its end)."""
    try:
        return path.read_text(errors="replace")[-tail:]
    except OSError:
        return f"(no {path})"


def _assert_study_done(spec: Path, out: Path, job_id: str) -> str:
    """Every cell landed exactly once, the report drawn, nothing of the job left behind."""
    log = _output(out / "slurm" / f"{job_id}.out", tail=10 ** 6)
    df = Store(out).read_trials()
    assert sorted(df["cell_id"]) == sorted(c.cell_id for c in load_spec(spec).cells()), log
    assert (df["status"] == "ok").all(), log
    assert (out / "report.html").is_file(), log
    assert not Path(f"/tmp/study-{job_id}.token").exists()
    assert not Path(f"/tmp/ray-study-{job_id}").exists()
    assert not list((out / "slurm").glob("driver.*.pid"))
    from procs import _procs

    left = [cmd for cmd in (c for _, c in _procs().values()) if f"/ray-study-{job_id}/" in cmd]
    assert not left, left
    return log


@pytest.mark.slow
def test_a_study_runs_to_its_report_as_a_slurm_job(slurm, tmp_path):
    spec, out = _spec(tmp_path), tmp_path / "res"
    r = _slurm_cli(spec, out, "--time", "10", "--partition", "nope", "--submit", env=slurm.env)
    assert r.returncode == 2 and "no such partition here; partitions: debug, urgent" in r.stderr
    assert not out.exists()
    t0 = time.monotonic()
    first, second = _submit(slurm, spec, out, "--time", "00:10:00", "--chain", "2")
    r = run_cli("status", out, env=slurm.env)  # before the driver saved the study, or after
    assert r.returncode == 0 and f"slurm: job {second} PENDING (Dependency)" in r.stdout, \
        r.stdout + r.stderr
    state, _ = _wait_job(slurm, first, 240, release=False)
    print(f"scenario (a): job {first} {state} in {time.monotonic() - t0:.0f} s")
    assert state == "COMPLETED", slurm.daemon_lines(first)
    log = _assert_study_done(spec, out, first)
    assert f"[slurm] study run {out}/slurm/spec.toml --results {out}" in log
    assert "[slurm] driver exited with 0" in log
    # the chain's second job waited (singleton) and was cancelled once the study was done
    state2, _ = _wait_job(slurm, second, 60, release=False)
    assert state2 == "CANCELLED", _snapshot(slurm, second)
    r = run_cli("status", out, env=slurm.env)
    assert r.returncode == 0, r.stderr
    assert f"slurm: job {first} COMPLETED" in r.stdout and f"slurm: job {second} CANCELLED" \
        in r.stdout, r.stdout


@pytest.mark.slow
def test_a_requeue_mid_study_resumes_it(slurm, tmp_path):
    """`scontrol requeue` while cells train: SLURM ends the job (TERM to all of it), holds it
    on a begin time, and runs it again with SLURM_RESTART_COUNT=1: `study resume`."""
    spec, out = _spec(tmp_path, epochs=200, max_train_examples=1000), tmp_path / "res"
    t0 = time.monotonic()
    (job,) = _submit(slurm, spec, out, "--time", "00:10:00")
    store, n_cells = Store(out), len(load_spec(spec).cells())
    deadline = time.monotonic() + 180
    while not (0 < len(store.part_ids(store.trials_dir)) < n_cells):  # a row in, cells to go
        assert time.monotonic() < deadline, _output(out / "slurm" / f"{job}.out")
        time.sleep(0.5)
    slurm.run("scontrol", "requeue", job, check=True)
    seen = [_snapshot(slurm, job)]
    state, released = _wait_job(slurm, job, 300)
    print(f"scenario (b): job {job} {state} in {time.monotonic() - t0:.0f} s, let go "
          f"{released} time(s) after its requeue")
    assert state == "COMPLETED" and released == 1, slurm.daemon_lines(job)
    log = _assert_study_done(spec, out, job)
    assert "DUE TO JOB REQUEUE" in log and "run 2" in log, log
    assert f"[slurm] study resume {out}" in log, log
    assert slurm.job(job)["Restarts"] == "1"
    assert "COMPLETING" in seen[0] or "PENDING" in seen[0], seen


@pytest.mark.slow
def test_a_time_limit_mid_study_requeues_and_resumes(slurm, tmp_path):
    """SLURM's time-limit warning mid-study: the driver stops, the script requeues its job,
    and the next run resumes the study.

    The job starts with 10 minutes and a 150 s lead. Once its cells train, the test cuts its
    limit to the next whole minute at least 90 s away (SLURM keeps limits in minutes): the
    warning is then due at once, and SLURM sends it at its next limit check (every 30 s or
    so), at least 60 s before the limit. A fixed short limit would warn 50-80 s after the
    start, which a fast machine can finish the study in. Until the driver has stopped, the
    epoch_hold hook makes every epoch wait 0.25 s, so a cell trains for over 150 s on any
    machine and the warning (15-50 s in) finds both in flight; then the test lets the cells
    go at full speed. On the requeue the test gives the next run 10 minutes, so one run
    finishes the study."""
    spec = _spec(tmp_path, epochs=600, max_train_examples=1000, layers="[2]")
    out, hold = tmp_path / "res", _hold(tmp_path)
    t0 = time.monotonic()
    (job,) = _submit(slurm, spec, out, "--time", "00:10:00", "--signal-lead", "150",
                     env={**NO_PERIODIC_CHECKPOINTS, **hold})
    assert "#SBATCH --time=00:10:00" in _script(out) and "USR1@150" in _script(out)
    _wait_cells_in_flight(out, job, n=2)  # both train: both checkpoint at the warning
    h, m, sec = (int(x) for x in slurm.job(job)["RunTime"].split("-")[-1].split(":"))
    limit_min = -(-(3600 * h + 60 * m + sec + 90) // 60)
    slurm.run("scontrol", "update", f"JobId={job}", f"TimeLimit={limit_min}", check=True)
    print(f"job {job}: cells in flight after {h:02d}:{m:02d}:{sec:02d}; limit now "
          f"{limit_min} min")
    _wait_logged(out, job, "requeued to resume the study", 300)  # the driver stopped
    _release(hold)
    state, released = _wait_job(slurm, job, 600, True, "TimeLimit=10")
    print(f"scenario (c): job {job} {state} in {time.monotonic() - t0:.0f} s, requeued by "
          f"itself {released} time(s)")
    assert state == "COMPLETED" and released == 1, slurm.daemon_lines(job)
    log = _assert_study_done(spec, out, job)
    assert "requeued to resume the study" in log and "run 2" in log, log
    assert log.index("[slurm] study run ") < log.index("[slurm] study resume "), log
    _assert_resumed_from_the_warning(out, log)


def _hold(tmp_path: Path) -> dict[str, str]:
    """The epoch_hold test hook's file, made; the environment that points the job at it.
    While it exists every epoch waits 0.25 s, so cells stay in flight whatever the machine's
    speed until `_release`, and the rest of the study runs at full speed."""
    path = tmp_path / "epoch-hold"
    path.touch()
    return {"STUDY_EPOCH_HOLD": str(path)}


def _release(hold: dict[str, str]) -> None:
    Path(hold["STUDY_EPOCH_HOLD"]).unlink()


def _wait_logged(out: Path, job: str, text: str, timeout: float) -> None:
    """Until the job's output holds `text`."""
    log_path, deadline = out / "slurm" / f"{job}.out", time.monotonic() + timeout
    while text not in _output(log_path, tail=10**8):
        assert time.monotonic() < deadline, _output(log_path)
        time.sleep(0.5)


def _wait_cells_in_flight(out: Path, job: str, n: int, timeout: float = 240) -> None:
    """Until a progress line says `n` cells run. Such a line after the first (printed as the
    first trial starts, before any epoch) comes a heartbeat later: the cells train by then.
    (A warning that finds a cell still starting leaves it nothing to checkpoint.)"""
    log_path, deadline = out / "slurm" / f"{job}.out", time.monotonic() + timeout
    pattern = rf"\b{n} running, .* elapsed (\d+m\d+s|[1-9]\d+s)"  # elapsed 10 s or more
    while not re.search(pattern, _output(log_path)):
        assert time.monotonic() < deadline, _output(log_path)
        time.sleep(0.5)


def _assert_resumed_from_the_warning(out: Path, log: str) -> None:
    """The driver stopped on USR1, and both cells (in flight at the warning, periodic
    checkpoints off) resumed from the checkpoint each wrote then."""
    assert "driver exited with 138" in log, log
    df = Store(out).read_trials()
    assert (df["resumed_from_epoch"] > 0).all(), df[["cell_id", "resumed_from_epoch"]]


@pytest.mark.slow
def test_preemption_warns_and_the_job_resumes(slurm, tmp_path):
    """A job of a higher partition preempts the study. SLURM (22.05, GraceTime 120 s) ends
    the job's steps at once, Ray's among them, and would end the script at the grace time's
    end; the driver loses Ray and exits first, which would leave the job FAILED and not
    requeued. The script sees the preemption (PreemptTime) and requeues the job itself; once
    the urgent job is done the study resumes, every cell once. Until then the epoch_hold
    hook keeps the cells in flight (0.25 s an epoch); the resumed run goes at full speed."""
    spec = _spec(tmp_path, epochs=600, max_train_examples=1000, layers="[2]")
    out, hold = tmp_path / "res", _hold(tmp_path)
    t0 = time.monotonic()
    (job,) = _submit(slurm, spec, out, "--time", "00:10:00", env=hold)
    _wait_cells_in_flight(out, job, n=2)
    r = slurm.run("sbatch", "--parsable", "--partition=urgent", "--cpus-per-task=2",
                  f"--output={tmp_path}/urgent.out", "--wrap", "sleep 5", check=True)
    urgent = r.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 180
    while slurm.job(urgent).get("JobState") not in ENDED:  # it runs once the study is off
        assert time.monotonic() < deadline, _snapshot(slurm, urgent) + slurm.daemon_lines(job)
        time.sleep(1)
    assert slurm.job(urgent)["JobState"] == "COMPLETED", _snapshot(slurm, urgent)
    _release(hold)
    state, released = _wait_job(slurm, job, 600)
    print(f"preemption: job {job} {state} in {time.monotonic() - t0:.0f} s, let go "
          f"{released} time(s) after its requeue")
    assert state == "COMPLETED" and released == 1, slurm.daemon_lines(job)
    log = _assert_study_done(spec, out, job)
    assert "requeued to resume the study" in log and "run 2" in log, log
    assert "[slurm] stopped (preempted); requeued to resume the study" in log, log
    assert f"[slurm] study resume {out}" in log, log
    assert slurm.job(job)["Restarts"] == "1"
