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
import shutil
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
    return run_cli("slurm", spec, "--results", results, *args, env=env)


def _script(results: Path, name: str = "tiny") -> str:
    return (results / "slurm" / f"{name}.sbatch").read_text()


# -- the script as text ----------------------------------------------------------------------
def test_exclusive_script_runs_symmetric_run_and_never_holds_the_token(tiny_spec, tmp_path):
    out = tmp_path / "res"
    r = _slurm_cli(tiny_spec, out, "--nodes", "2", "--gpus-per-node", "2", "--time", "1-00:00",
                   "--partition", "gpu", "--account", "lab", "--max-failures", "3",
                   "--fuse", "4", env={"PYTHONPATH": "/opt/x"})
    assert r.returncode == 0, r.stderr
    path = out / "slurm" / "tiny.sbatch"
    assert r.stdout.splitlines() == [f"written: {path}", f"submit with: sbatch {path}"]
    text = _script(out)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0  # bash parses it
    directives = [ln.split(" ", 1)[1] for ln in text.splitlines() if ln.startswith("#SBATCH ")]
    for d in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=2", "--exclusive",
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
    assert ("STUDY+=(--cpus-per-trial 1 --gpus-per-trial 1 --fuse 4 --max-failures 3)"
            in text)
    assert f'STUDY=(run "$SLURM_FILES/spec.toml" --results "$RESULTS")' in text
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
    assert _slurm_cli(tiny_spec, out, "--time", "10").returncode == 0
    assert token_file.read_text() == token


def _port_options() -> set[str]:
    """Every port option of `ray start`, from its own help."""
    r = subprocess.run([RAY, "start", "--help"], capture_output=True, text=True, check=True)
    return set(re.findall(r"^\s+(--[a-z-]*port[a-z-]*)", r.stdout, re.M))


def test_shared_nodes_script_gives_ray_ports_of_the_jobs_own(tiny_spec, tmp_path):
    out = tmp_path / "res"
    r = _slurm_cli(tiny_spec, out, "--nodes", "3", "--cpus-per-node", "8", "--time", "30:00",
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
    assert re.search(r'srun --nodes=2 --ntasks=2 .*\\\n\s+--exclude="\$HEAD" ray start --block',
                     text)
    assert 'kill -TERM "${RAY_NODES[@]}"' in text


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
    (["--time", "10", "--chain", "0"], 2, "--chain 0"),
    (["--time", "10", "--submit"], 3, "sbatch is not on PATH"),
])
def test_bad_input_is_one_line_and_nothing_written(tiny_spec, tmp_path, args, code, says):
    out = tmp_path / "res"
    env = {"PATH": os.path.dirname(sys.executable)} if "--submit" in args else None
    r = _slurm_cli(tiny_spec, out, *args, env=env)
    assert r.returncode == code, r.stderr
    assert r.stderr.startswith("study: ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert says in r.stderr, r.stderr
    assert not out.exists() and r.stdout == ""


def test_a_folder_of_another_study_or_missing_data_is_refused(tiny_spec, tmp_path):
    other = tmp_path / "other"
    _other_study(other, TINY_SPEC.replace('name = "tiny"', 'name = "other"'), "other")
    r = _slurm_cli(tiny_spec, other, "--time", "10")
    assert r.returncode == 2 and "holds the study 'other', not 'tiny'" in r.stderr, r.stderr
    changed = tmp_path / "changed"  # the same name, a value the study ran with dropped
    _other_study(changed, TINY_SPEC.replace("lr = 3e-3", "lr = 1e-2"), "tiny")
    r = _slurm_cli(tiny_spec, changed, "--time", "10")
    assert r.returncode == 2 and "spec changes 'lr'" in r.stderr, r.stderr
    for folder in (other, changed):
        assert not (folder / "slurm").exists()
    grown = tmp_path / "grown"  # the same study, an axis extended: fine
    _other_study(grown, TINY_SPEC.replace("layers = [1, 2]", "layers = [1]"), "tiny")
    assert _slurm_cli(tiny_spec, grown, "--time", "10").returncode == 0
    spaced = tmp_path / "a b"
    r = _slurm_cli(tiny_spec, spaced, "--time", "10")
    assert r.returncode == 2 and "may not hold blanks" in r.stderr and not spaced.exists()
    mnist = tmp_path / "mnist.toml"
    mnist.write_text(TINY_SPEC.replace('"digits"', '"mnist"'))
    r = _slurm_cli(mnist, tmp_path / "m", "--time", "10", "--data-dir", tmp_path / "nodata")
    assert r.returncode == 3 and "dataset mnist not found" in r.stderr, r.stderr
    assert not (tmp_path / "m").exists()
    r = _slurm_cli(mnist, tmp_path / "m", "--time", "10", "--data-dir", tmp_path / "d",
                   "--download")
    assert r.returncode == 0 and "--download" in _script(tmp_path / "m"), r.stderr
