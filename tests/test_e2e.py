"""Spec -> Ray Tune (real local cluster) / local executor -> Parquet -> figure, and the CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from study import schema
from study.options import TrialOptions
from study.runner import RunOptions, run_study
from study.store import Store
from sweep import load_spec

from conftest import run_cli


def test_ray_run_lands_every_cell_and_a_rerun_runs_nothing(ray_session, tiny_spec, tmp_path):
    spec = load_spec(tiny_spec)
    out = tmp_path / "res"
    summary = run_study(spec, RunOptions(TrialOptions(str(out)), executor="ray", quiet=True))
    # the layers-1 parallel cell is the sequential network: trained once, recorded twice
    assert (summary.total, summary.ran, summary.copied, summary.ok) == (4, 3, 1, 3)
    store = Store(out)
    df = store.read_trials()
    assert sorted(df["cell_id"]) == sorted(c.cell_id for c in spec.cells())
    assert (df["status"] == "ok").all() and (df["node_id"].str.len() > 0).all()
    assert (df["epochs_done"] == 2).all() and (df["n_train"] == 200).all()
    for part in (out / "trials").glob("*.parquet"):
        assert pq.read_schema(part).equals(schema.TRIALS)
    ep = store.read_epochs()
    assert len(ep) == 8 and set(ep["epoch"]) == {1, 2}
    assert not list((out / "checkpoints").glob("*.pt"))  # removed once rows landed
    assert (out / "spec.toml").read_text() == tiny_spec.read_text()
    # layers = 1 twins are the same function trained on the same batches: identical
    one = df[df["layers"] == 1].set_index("architecture")
    assert one.loc["sequential", "val_loss"] == one.loc["parallel", "val_loss"]

    again = run_study(spec, RunOptions(TrialOptions(str(out)), executor="ray", quiet=True))
    assert again.ran == 0 and again.already_done == 4
    assert len(store.read_trials()) == 4

    # the local executor runs the same trial function: the same numbers
    local = tmp_path / "local"
    run_study(spec, RunOptions(TrialOptions(str(local)), executor="local", quiet=True))
    a = df.set_index("cell_id").sort_index()
    b = Store(local).read_trials().set_index("cell_id").sort_index()
    assert (a["val_loss"] == b["val_loss"]).all()


def test_cli_run_plan_status_and_rerun(tiny_spec, tmp_path):
    out = tmp_path / "res"
    r = run_cli("run", tiny_spec, "--results", out, "--executor", "local")
    assert r.returncode == 0, r.stderr
    assert f"trials: {out / 'trials'}" in r.stdout
    assert "cells done" in r.stderr  # the progress line
    figures = [line.split(": ", 1)[1] for line in r.stdout.splitlines() if line.startswith("figure: ")]
    assert any(f.endswith(".png") for f in figures)
    assert f"report: {out / 'report.html'}" in r.stdout and (out / "report.html").stat().st_size > 0
    assert all((tmp_path / f).exists() or __import__("pathlib").Path(f).exists() for f in figures)

    r = run_cli("plan", tiny_spec, "--results", out)
    assert r.returncode == 0 and "cells: 4 in the grid, 3 distinct networks" in r.stdout
    assert "deep/shallow pairs: 2" in r.stdout
    assert "4 done (4 ok, 0 failed, 0 diverged), 0 pending" in r.stdout
    # `python -m study` is the same command line
    m = subprocess.run([sys.executable, "-m", "study", "plan", tiny_spec, "--results", out],
                       capture_output=True, text=True, timeout=120)
    assert m.returncode == 0 and m.stdout == r.stdout

    r = run_cli("status", out, "--json")
    st = json.loads(r.stdout)
    assert (st["total"], st["done"], st["pending"], st["running"]) == (4, 4, 0, 0)
    assert st["compute_s"] > 0

    before = {p.name: p.stat().st_mtime_ns for p in (out / "trials").iterdir()}
    r = run_cli("run", tiny_spec, "--results", out, "--executor", "local", "--no-figures")
    assert r.returncode == 0 and "nothing to run" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (out / "trials").iterdir()} == before


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(tiny_spec):
    """`study plan ... | head -1`: the reader leaves early; no traceback, SIGPIPE's exit code."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write now fails with EPIPE (Python ignores SIGPIPE)
    try:
        r = subprocess.run([sys.executable, "-m", "study", "plan", tiny_spec], stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert r.returncode == 141 and r.stderr == ""


def test_the_local_executor_never_imports_ray(tiny_spec, tmp_path):
    # `--executor local` trains in this process: it pays for no Ray import (seconds)
    code = ("import sys; from study import cli; "
            "rc = cli.main(['run', sys.argv[1], '--results', sys.argv[2], '--executor', 'local', "
            "'--no-figures', '--quiet']); "
            "print(rc, sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code, str(tiny_spec), str(tmp_path / "res")],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "0 []", r.stdout
    df = Store(tmp_path / "res").read_trials()  # the study did run, in that process
    assert len(df) == 4 and (df["status"] == "ok").all()


@pytest.mark.parametrize("args, code, needle", [
    (["run", "nope"], 2, "no spec file or preset named 'nope'"),
    (["plan", "BAD"], 2, "unknown key 'grid.colour'"),
    (["run", "MNIST", "--executor", "local"], 3, "dataset mnist needs --data-dir"),
    (["run", "MNIST", "--executor", "local", "--data-dir", "NODATA"], 3, "dataset mnist not found"),
    (["resume", "NOSTUDY"], 3, "holds no study"),
    (["report", "NOSTUDY"], 3, "is not a folder; give the results folder"),  # AnalysisError
])
def test_cli_user_errors_are_one_line(tmp_path, args, code, needle):
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid]\ncolour = 1\n")
    mnist = tmp_path / "mnist.toml"
    mnist.write_text("[grid]\ndataset='mnist'\narchitecture='sequential'\nlayers=1\nfilters=2\nkernel=3\n")
    subst = {"BAD": bad, "MNIST": mnist, "NODATA": tmp_path / "nodata", "NOSTUDY": tmp_path / "x"}
    extra = ["--results", tmp_path / "res"] if args[0] in ("run", "plan") else []
    r = run_cli(*[subst.get(a, a) for a in args], *extra, cwd=tmp_path)
    assert r.returncode == code, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "res").exists()  # refused before anything was written


def test_unwritable_results_folder(tiny_spec, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the results folder should go")
    r = run_cli("run", tiny_spec, "--results", blocker / "res", "--executor", "local")
    assert r.returncode == 3 and "cannot write" in r.stderr and "--results" in r.stderr
    assert "Traceback" not in r.stderr
    assert blocker.read_text().startswith("a file")
