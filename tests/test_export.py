"""Issue 19: a study in MLflow and TensorBoard, read back through their own APIs.

Every store here is made by a tiny real study (`study run` in a subprocess, local executor,
digits); one cell fails on purpose (STUDY_INJECT_FAULT) and the spec's description is hostile.
"""
from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_SPEC, run_cli

pytestmark = pytest.mark.slow

HOSTILE = "<script>alert('x')</script> \"quoted\" & 'single'"
SPEC = TINY_SPEC.replace('name = "tiny"', f'name = "tiny"\ndescription = {json.dumps(HOSTILE)}')
FAULT = {"STUDY_INJECT_FAULT": "architecture=parallel,layers=2@1"}  # fails at once, no retry
N_CELLS = 4
KIND_TAG, KIND_TRAINING = "mlflow.experimentKind", "custom_model_development"  # MLflow 3's UI


def _run(spec: Path, results: Path, *extra, env=None):
    p = run_cli("run", spec, "--results", results, "--executor", "local", "--no-figures",
                "--quiet", *extra, env=env)
    assert p.returncode in (0, 1), p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    """A finished tiny study: 4 cells (one same-network copy), one of them failed."""
    base = tmp_path_factory.mktemp("export-study")
    spec = base / "tiny.toml"
    spec.write_text(SPEC)
    _run(spec, base / "r", "--max-failures", "0", env=FAULT)
    return base / "r"


def _copy(study_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "r"
    shutil.copytree(study_dir, dest, ignore=shutil.ignore_patterns("mlflow", "tensorboard"))
    return dest


def _store(results: Path):
    from study.store import Store
    s = Store(results)
    return s, s.read_trials(), s.read_epochs()


def _mlflow(results: Path):
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=f"sqlite:///{results.resolve() / 'mlflow' / 'mlflow.db'}")


def _runs(client, study_id: str):
    """(parent runs, child runs) of the study, active ones only, as MLflow lists them."""
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.study_id = '{study_id}'", max_results=1000)
    parents = [r for r in runs if r.data.tags.get("study_role") == "study"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return parents, children


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _epochs_of(epochs, cell_id: str, key: str) -> list[tuple[int, float]]:
    e = epochs[epochs["cell_id"] == cell_id].sort_values("epoch")
    return [(int(s), float(v)) for s, v in zip(e["epoch"], e[key])]


def test_mlflow_export_parent_children_histories_and_idempotence(study_dir, tmp_path):
    from study import schema

    results = _copy(study_dir, tmp_path)
    t0 = time.time()
    p = run_cli("export", results, "--mlflow")
    took = time.time() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{N_CELLS} runs added" in p.stdout and "mlflow ui --backend-store-uri sqlite:///" in p.stdout
    store, trials, epochs = _store(results)
    sid = store.study_id()
    client = _mlflow(results)
    parents, children = _runs(client, sid)
    assert len(parents) == 1 and len(children) == N_CELLS
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert parent.data.tags["description"] == HOSTILE  # verbatim, inert text
    assert "spec.toml" in [a.path for a in client.list_artifacts(parent.info.run_id)]
    # the default local store keeps the artifacts inside DIR, as the output says
    arts = results.resolve() / "mlflow" / "artifacts"
    assert f"mlflow artifacts (spec, report, figures): {arts}" in p.stdout
    assert (arts / parent.info.run_id / "artifacts" / "spec.toml").is_file()
    assert client.get_experiment(parent.info.experiment_id).tags[KIND_TAG] == KIND_TRAINING
    by_cell = {c.data.tags["cell_id"]: c for c in children}
    assert set(by_cell) == set(trials["cell_id"])
    for row in trials.to_dict("records"):
        run = by_cell[row["cell_id"]]
        # tags under the store's own column names; the grid's parameters as params
        for col in ("cell_id", "pair_key", "architecture", "status", "host", "device"):
            assert col in schema.TRIAL_COLUMNS and run.data.tags[col] == str(row[col])
        assert run.data.params["layers"] == str(row["layers"])
        assert run.info.run_name.startswith(f"{row['architecture']} layers={row['layers']}")
        assert run.info.start_time == int(row["started_at"].timestamp() * 1000)
        assert run.info.end_time == int(row["finished_at"].timestamp() * 1000)
        if row["status"] == "ok":
            assert run.info.status == "FINISHED"
            for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
                assert _history(client, run.info.run_id, key) == _epochs_of(epochs, row["cell_id"], key)
            # the epoch timings are each point's timestamp, not curves of their own
            assert not {"train_s", "wall_s"} & set(run.data.metrics)
            assert run.data.metrics["test_acc"] == pytest.approx(row["test_acc"])
        else:
            assert run.info.status == "FAILED"
            assert run.data.tags["error"] == row["error"] and "InjectedFault" in row["error"]
    copy = trials[trials["same_network_as"].notna()].iloc[0]
    assert by_cell[copy["cell_id"]].data.tags["same_network_as"] == copy["same_network_as"]
    # the local store writes ahead (the export's workers overlap): the mode is the file's own
    with sqlite3.connect(results / "mlflow" / "mlflow.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchall() == [("wal",)]

    p = run_cli("export", results, "--mlflow")  # again: nothing new, no duplicates
    assert p.returncode == 0 and f"0 runs added, 0 replaced, {N_CELLS} unchanged" in p.stdout, p.stdout
    assert len(_runs(client, sid)[1]) == N_CELLS
    print(f"first export {took:.1f} s")


def _ms(t) -> int:
    return int(t.timestamp() * 1000)


def test_a_sqlite_uri_elsewhere_writes_nothing_in_the_working_directory(study_dir, tmp_path):
    """A new user's `study export DIR --mlflow sqlite:///<elsewhere>/mlflow.db` from an empty
    folder: MLflow's default artifact root (./mlruns) is not used; the artifacts lie beside
    the database, the experiment opens as model training, and the parent run spans the study
    (its earliest cell start to its latest cell end), not the export."""
    from mlflow.tracking import MlflowClient

    results = _copy(study_dir, tmp_path)
    cwd, db = tmp_path / "cwd", tmp_path / "db"
    cwd.mkdir()
    db.mkdir()
    uri = f"sqlite:///{db / 'mlflow.db'}"
    p = run_cli("export", results, "--mlflow", uri, cwd=cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    assert list(cwd.iterdir()) == []
    assert not (results / "mlflow").exists()  # the user named another store
    store, trials, _ = _store(results)
    sid = store.study_id()
    arts = db / "mlflow-artifacts" / sid
    assert f"mlflow artifacts (spec, report, figures): {arts}" in p.stdout
    assert sorted(f.name for f in db.iterdir()) == ["mlflow-artifacts", "mlflow.db"]
    client = MlflowClient(tracking_uri=uri)
    parents, children = _runs(client, sid)
    assert len(parents) == 1 and len(children) == N_CELLS
    parent = parents[0]
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.artifact_location == arts.as_uri()
    assert exp.tags[KIND_TAG] == KIND_TRAINING
    assert (arts / parent.info.run_id / "artifacts" / "spec.toml").is_file()
    assert parent.info.start_time == _ms(trials["started_at"].min())
    assert parent.info.end_time == _ms(trials["finished_at"].max())

    p = run_cli("export", results, "--mlflow", uri, cwd=cwd)  # again: the same experiment
    assert p.returncode == 0 and f"{N_CELLS} unchanged" in p.stdout, p.stdout
    assert list(cwd.iterdir()) == []
    assert len(client.search_experiments(filter_string=f"tags.study_id = '{sid}'")) == 1
    parent = client.get_run(parent.info.run_id)
    assert parent.info.end_time == _ms(trials["finished_at"].max())


def test_artifacts_of_a_tracking_server_are_left_to_the_server(tmp_path):
    from study.export.to_mlflow import artifact_location, readable_location
    from study.store import Store

    store = Store(tmp_path / "r")
    for uri in ("http://mlflow.lab:5000", "https://mlflow.lab", "databricks"):
        assert artifact_location(store, uri, local=False) is None
    where = readable_location("mlflow-artifacts:/3", "http://mlflow.lab:5000")
    assert where.startswith("mlflow-artifacts:/3") and "server" in where


def test_rerun_cell_replaces_its_run_and_an_extension_adds_only_new_cells(study_dir, tmp_path):
    results = _copy(study_dir, tmp_path)
    assert run_cli("export", results, "--mlflow").returncode == 0
    store, trials, _ = _store(results)
    failed = trials.loc[trials["status"] == "failed", "cell_id"].item()
    client = _mlflow(results)
    sid = store.study_id()
    old_run = {c.data.tags["cell_id"]: c.info.run_id for c in _runs(client, sid)[1]}[failed]

    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC)
    _run(spec, results, "--retry-failed")  # no fault now: the cell lands again, ok
    p = run_cli("export", results, "--mlflow")
    assert p.returncode == 0 and "0 runs added, 1 replaced" in p.stdout, p.stdout
    _, trials, epochs = _store(results)
    children = {c.data.tags["cell_id"]: c for c in _runs(client, sid)[1]}
    assert len(children) == N_CELLS
    run = children[failed]
    assert run.info.run_id != old_run and run.info.status == "FINISHED"
    assert client.get_run(old_run).info.lifecycle_stage == "deleted"
    for key in ("train_loss", "val_loss"):
        assert _history(client, run.info.run_id, key) == _epochs_of(epochs, failed, key)
    row = trials[trials["cell_id"] == failed].iloc[0]
    assert run.data.tags["finished_at"] == row["finished_at"].isoformat()

    spec.write_text(SPEC.replace("layers = [1, 2]", "layers = [1, 2, 3]"))  # extend the study
    _run(spec, results)
    p = run_cli("export", results, "--mlflow")
    assert p.returncode == 0 and f"2 runs added, 0 replaced, {N_CELLS} unchanged" in p.stdout, p.stdout
    assert len(_runs(client, sid)[1]) == N_CELLS + 2


def test_tensorboard_export_scalars_hparams_and_idempotence(study_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    results = _copy(study_dir, tmp_path)
    p = run_cli("export", results, "--tensorboard")
    assert p.returncode == 0, p.stderr[-3000:]
    logdir = results / "tensorboard"
    assert f"tensorboard --logdir {logdir}" in p.stdout
    _, trials, epochs = _store(results)
    folders = sorted(d for d in logdir.iterdir() if d.is_dir())
    assert len(folders) == N_CELLS
    for row in trials.to_dict("records"):
        folder = next(d for d in folders if d.name.endswith(row["cell_id"]))
        assert folder.name.startswith(f"{row['architecture']}_layers={row['layers']}")
        acc = EventAccumulator(str(folder))
        acc.Reload()
        if row["status"] == "ok":
            for key in ("train_loss", "val_loss", "val_acc", "train_s"):
                got = [(e.step, e.value) for e in acc.Scalars(key)]
                want = _epochs_of(epochs, row["cell_id"], key)
                assert [s for s, _ in got] == [s for s, _ in want]
                assert np.allclose([v for _, v in got], [v for _, v in want], rtol=1e-6)
            assert acc.Scalars("test_acc")[-1].value == pytest.approx(row["test_acc"], rel=1e-6)
        content = acc.PluginTagToContent(metadata.PLUGIN_NAME)
        start = metadata.parse_session_start_info_plugin_data(
            content[metadata.SESSION_START_INFO_TAG])
        assert start.hparams["layers"].number_value == row["layers"]
        assert start.hparams["architecture"].string_value == row["architecture"]
        end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
        assert (end.status == 1) == (row["status"] == "ok")  # STATUS_SUCCESS

    before = {d.name: [f.stat().st_mtime_ns for f in d.iterdir()] for d in folders}
    p = run_cli("export", results, "--tensorboard")
    assert p.returncode == 0 and f"0 runs added, 0 replaced, {N_CELLS} unchanged" in p.stdout
    after = {d.name: [f.stat().st_mtime_ns for f in d.iterdir()] for d in logdir.iterdir() if d.is_dir()}
    assert after == before


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


def test_export_to_an_unreachable_tracker_fails_in_one_line(study_dir, tmp_path):
    results = _copy(study_dir, tmp_path)
    t0 = time.time()
    p = run_cli("export", results, "--mlflow", f"http://127.0.0.1:{_closed_port()}", timeout=120)
    took = time.time() - t0
    assert p.returncode == 3, (p.stdout, p.stderr[-3000:])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and " INFO " not in ln]
    assert len(lines) == 1 and lines[0].startswith("study: cannot use MLflow"), p.stderr
    assert "Traceback" not in p.stderr
    assert took < 60, took


def test_export_without_mlflow_installed_says_what_to_install(study_dir, tmp_path):
    results = _copy(study_dir, tmp_path)
    # A finder that refuses mlflow, as an interpreter without it would.
    code = ("import sys\n"
            "class NoMlflow:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'mlflow': raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, NoMlflow())\n"
            "from study.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    import subprocess
    p = subprocess.run([sys.executable, "-c", code, "export", str(results), "--mlflow"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().count("\n") == 0 and "pip install" in p.stderr and "mlflow" in p.stderr
    assert not (results / "mlflow").exists()


def test_live_export_lands_cells_and_a_dead_tracker_never_stalls_the_study(tmp_path):
    from study.store import Store

    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC)
    t0 = time.time()
    p = _run(spec, tmp_path / "live", "--export", "mlflow", "--export", "tensorboard")
    t_live = time.time() - t0
    sid = Store(tmp_path / "live").study_id()
    parents, children = _runs(_mlflow(tmp_path / "live"), sid)
    assert len(children) == N_CELLS, p.stderr[-3000:]
    # the parent ends with the study's last cell, not when the export thread closed
    last = Store(tmp_path / "live").read_trials()["finished_at"].max()
    assert len(parents) == 1 and parents[0].info.end_time == _ms(last)
    assert len([d for d in (tmp_path / "live" / "tensorboard").iterdir() if d.is_dir()]) == N_CELLS
    assert "warning" not in p.stderr

    t0 = time.time()
    plain = _run(spec, tmp_path / "plain")
    t_plain = time.time() - t0
    t0 = time.time()
    dead = _run(spec, tmp_path / "dead", "--export", f"mlflow=http://127.0.0.1:{_closed_port()}")
    t_dead = time.time() - t0
    assert len(Store(tmp_path / "dead").read_trials()) == N_CELLS
    warnings = [ln for ln in dead.stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 1 and "live export to mlflow" in warnings[0], dead.stderr[-3000:]
    assert "Traceback" not in dead.stderr
    print(f"study run: {t_plain:.1f} s plain, {t_dead:.1f} s with a dead tracker, "
          f"{t_live:.1f} s with live export to local MLflow + TensorBoard")
    assert t_dead < t_plain + 15, (t_plain, t_dead)
    assert plain.returncode == dead.returncode


def test_names_made_safe_for_the_filesystem_and_bad_commands_refused(tmp_path):
    from study.export import run_name, safe_folder

    name = run_name({"architecture": "parallel", "dataset": HOSTILE, "layers": 2}, ["dataset", "layers"])
    folder = safe_folder(name, "0123456789abcdef")
    assert folder.endswith("__0123456789abcdef") and "/" not in folder and "<" not in folder
    assert set(folder) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._=+-")
    p = run_cli("export", tmp_path / "nothing", "--mlflow")
    assert p.returncode == 3 and "holds no study" in p.stderr and p.stderr.count("\n") == 1
    assert not (tmp_path / "nothing").exists()
    p = run_cli("export", tmp_path / "nothing")
    assert p.returncode == 2 and "--mlflow" in p.stderr and p.stderr.count("\n") == 1
    p = run_cli("run", "demo", "--results", tmp_path / "x", "--export", "wandb")
    assert p.returncode == 2 and "mlflow[=URI]" in p.stderr and p.stderr.count("\n") == 1


def test_the_parent_carries_the_headline_verdicts_of_stats_csv(tmp_path):
    """The parent run's headline metrics and verdict tags are those of the report's stats.csv
    (the equivalence verdict of each dataset and loss over all Q bins)."""
    import pandas as pd

    import analysis
    from study.export import headline
    from test_equivalence import build, spec_text  # a store with a known truth

    results = tmp_path / "truth"
    build(results, spec_text((2, 3, 4, 5), (4, 8), (0, 1)), 0.0, 0.02)
    analysis.write_figures(results)
    stats_csv = results / "figures" / "stats.csv"
    s = pd.read_csv(stats_csv, keep_default_na=False, na_values=[""])
    top = s[(s["q_bin"] == "all") & (s["verdict"].astype(str) != "")]
    metrics, tags = headline(stats_csv)
    assert dict(tags) == {f"verdict.{r.dataset}.{r.metric}": r.verdict
                          for r in top.itertuples(index=False)}
    from analysis.stats import NO_VERDICT, VERDICTS
    assert tags and set(dict(tags).values()) <= {*VERDICTS, NO_VERDICT}
    names = {m.key for m in metrics}
    assert {"headline.digits.val_loss.ratio", "headline.digits.val_loss.p_tost_holm",
            "headline.digits.val_loss.margin"} <= names
