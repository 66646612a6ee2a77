"""A study in MLflow: one experiment per study, one parent run, one child run per cell.
Named to_mlflow so that `import mlflow` inside this package finds the library, not this."""
from __future__ import annotations

import datetime as dt
import logging
import os
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from ..store import Store
from .cells import (FINALS, HISTORY, PARAMS, STUDY_ID_TAG, TAGS, Cell, ExportCounts, _finite,
                    _iso, _ms, run_name, store_cells, study_axes)
from .errors import MLFLOW_PACKAGE, MissingPackage, TrackerError, _one_line, require

ROLE_TAG = "study_role"  # "study" (the parent run) or "cell"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag
MAX_TAG = 5000  # MLflow refuses longer values on some servers: an error is cut, not refused
# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, prompts); its
# own kind selector writes this value for model training (the runs table and charts).
KIND_TAG, KIND_TRAINING = "mlflow.experimentKind", "custom_model_development"
SERVER_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")
DATABASE_ENGINES = ("sqlite", "postgresql", "mysql", "mssql")  # MLflow's SQL stores


def local_mlflow_uri(store: Store) -> str:
    """MLflow's own local backend (sqlite since MLflow 3), inside the results folder."""
    path = (store.root / "mlflow").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def artifact_location(store: Store, uri: str, local: bool) -> str | None:
    """Where a new experiment's artifacts go. MLflow's own default for a database URI is
    ./mlruns, in whatever folder the export was run from: the local store keeps them inside
    DIR, a SQLite file beside the file (per study), any other database inside DIR; a tracking
    server (its own artifact store) and a file store (its own folder) are left their own."""
    inside_dir = (store.root / "mlflow" / "artifacts").resolve().as_uri()
    if local:
        return inside_dir
    scheme = uri.partition(":")[0].lower() if "://" in uri else ""
    engine = scheme.partition("+")[0]
    if engine not in DATABASE_ENGINES:
        return None
    if engine == "sqlite":
        from sqlalchemy.engine import make_url

        db = make_url(uri).database
        if db and db != ":memory:":
            return (Path(db).resolve().parent / "mlflow-artifacts" / store.study_id()).as_uri()
    return inside_dir


def readable_location(location: str, uri: str) -> str:
    """An artifact location as a user reads it: a folder as its path; a tracking server's
    store said to be the server's (where it is is the server's setting, not the tool's)."""
    if uri.split("://")[0].lower() in SERVER_SCHEMES:
        return f"{location} (the tracking server's own artifact store)"
    if location.startswith("file://"):
        from urllib.parse import unquote, urlparse
        return unquote(urlparse(location).path)
    return location


def tune_local_sqlite(uri: str) -> None:
    """The local store only (a user's own database keeps its settings): write-ahead logging,
    so that the export's worker processes build their next batch while one writes (measured
    on 2 cores, 400 cells of 100 epochs: 102 ms per cell with two workers under SQLite's
    default rollback journal, 70 ms with WAL), and no fsync per commit (NORMAL: a crash loses
    at most the last runs, which the next export writes again; the file is never corrupted)."""
    global _TUNED_SQLITE
    path = uri.removeprefix("sqlite:///")
    if _TUNED_SQLITE is None:
        import sqlite3
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        @event.listens_for(Engine, "connect")
        def _pragmas(conn, _record) -> None:
            if isinstance(conn, sqlite3.Connection) and _TUNED_SQLITE and any(
                    row[2] in _TUNED_SQLITE for row in conn.execute("PRAGMA database_list")):
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
        _TUNED_SQLITE = set()
    _TUNED_SQLITE.add(path)


_TUNED_SQLITE: set[str] | None = None


def bound_http_retries(max_retries: int, timeout_s: int) -> None:
    """MLflow retries an unreachable server for minutes by default (7 retries, backoff 2,
    120 s timeout: mlflow.environment_variables); a user's own settings win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))


class MlflowTarget:
    """One study's experiment in one tracking store: finds or makes the experiment and the
    parent run, knows the cells' runs (cell_id -> (run_id, finished_at, done))."""

    def __init__(self, store: Store, uri: str | None, first_start_ms: int | None = None):
        """`first_start_ms`: the study's earliest cell start, the parent run's start when it
        is made here; None (a live export, before any cell has landed): the study's creation."""
        require(MLFLOW_PACKAGE)
        from mlflow.tracking import MlflowClient

        self.store = store
        self.local = not uri
        self.uri = uri or local_mlflow_uri(store)
        self.study_id = store.study_id()
        meta = store.meta()
        self.study_name = meta.get("name") or store.root.name
        self.axes = study_axes(store)
        self.first_start_ms = first_start_ms
        # The parent run ends when the study's last cell did (not when it was exported): the
        # latest finished_at of the cells planned, else the end the parent already has.
        self.last_finish_ms: int | None = None
        self.parent_end_ms: int | None = None
        if self.local:
            tune_local_sqlite(self.uri)
        # MLflow announces at INFO each time it creates or checks a database's tables: noise
        # in a command that prints its own one-line summary.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self.client = MlflowClient(tracking_uri=self.uri)
        try:
            self.experiment_id = self._experiment()
            self.parent_id = self._parent()
            self.runs = self._cell_runs()
        except MissingPackage:
            raise
        except Exception as e:  # MLflow raises many kinds (HTTP, SQL, REST): one line each
            raise TrackerError(f"cannot use MLflow tracking URI {self.uri}: {_one_line(e)}; "
                               "check that the server is up and the URI right") from None

    def _experiment(self) -> str:
        name = f"{self.study_name} [{self.study_id[:8]}]"
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            exp_id = self.client.create_experiment(
                name, artifact_location=artifact_location(self.store, self.uri, self.local),
                tags={STUDY_ID_TAG: self.study_id, KIND_TAG: KIND_TRAINING,
                      "results_folder": str(self.store.root.resolve())})
            exp = self.client.get_experiment(exp_id)
        elif KIND_TAG not in exp.tags:  # made before the tag was set; a user's own kind is kept
            self.client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND_TRAINING)
        self.artifacts = exp.artifact_location
        return exp.experiment_id

    def _search(self, filt: str) -> list:
        out, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], filter_string=filt,
                                           max_results=5000, page_token=token)
            out += list(page)
            token = page.token
            if not token:
                return out

    def _parent(self) -> str:
        found = self._search(f"tags.{STUDY_ID_TAG} = '{self.study_id}' and tags.{ROLE_TAG} = 'study'")
        if found:
            self.parent_end_ms = found[0].info.end_time
            return found[0].info.run_id
        meta = self.store.meta()
        desc = _spec_description(self.store)
        tags = {STUDY_ID_TAG: self.study_id, ROLE_TAG: "study", "study": self.study_name,
                "description": desc[:MAX_TAG], "mlflow.note.content": desc[:MAX_TAG],
                "created_at": str(meta.get("created_at", ""))}
        start = self.first_start_ms
        if start is None:
            start = _parse_iso_ms(meta.get("created_at"))
        run = self.client.create_run(self.experiment_id, start_time=start, tags=tags,
                                     run_name=self.study_name)
        return run.info.run_id

    def _cell_runs(self) -> dict[str, tuple[str, str, bool]]:
        runs = {}
        for r in self._search(f"tags.{STUDY_ID_TAG} = '{self.study_id}' and tags.{ROLE_TAG} = 'cell'"):
            t = r.data.tags
            runs[t.get("cell_id")] = (r.info.run_id, t.get("finished_at", ""),
                                      r.info.status in ("FINISHED", "FAILED"))
        return runs

    def plan(self, cells: Iterable[Cell]) -> tuple[list[Cell], list[str], int]:
        """(cells to write, run ids to delete first, cells unchanged)."""
        todo, stale, same = [], [], 0
        for c in cells:
            end = _ms(c.row.get("finished_at"))
            if end is not None and (self.last_finish_ms is None or end > self.last_finish_ms):
                self.last_finish_ms = end
            have = self.runs.get(c.cell_id)
            if have and have[1] == c.finished and have[2]:
                same += 1
                continue
            if have:  # a re-run cell, or a run an interrupted export left unfinished
                stale.append(have[0])
            todo.append(c)
        return todo, stale, same

    def write(self, cells: list[Cell], stale: list[str]) -> None:
        ids = write_cells(self.client, self.experiment_id, self.parent_id, self.study_id,
                          self.axes, cells, stale)
        self.remember(cells, ids)

    def remember(self, cells: list[Cell], run_ids: dict[str, str]) -> None:
        for c in cells:
            self.runs[c.cell_id] = (run_ids[c.cell_id], c.finished, True)

    def finish_parent(self) -> None:
        """The parent's artifacts (spec, report, figures) and the headline, when they exist."""
        root = self.store.root
        self.client.log_artifact(self.parent_id, str(root / "spec.toml"))
        if (root / "report.html").is_file():
            self.client.log_artifact(self.parent_id, str(root / "report.html"))
        figures = root / "figures"
        if figures.is_dir() and any(figures.iterdir()):
            self.client.log_artifacts(self.parent_id, str(figures), "figures")
        metrics, tags = headline(figures / "stats.csv")
        _log_batch(self.client, self.parent_id, metrics=metrics, tags=tags)
        end = self.last_finish_ms if self.last_finish_ms is not None else self.parent_end_ms
        self.client.set_terminated(self.parent_id, "FINISHED", end_time=end)


def write_cells(client, experiment_id: str, parent_id: str, study_id: str, axes: list[str],
                cells: list[Cell], stale: Iterable[str] = ()) -> dict[str, str]:
    """One child run per cell: params, tags, histories and finals in as few calls as MLflow
    allows (create, one log_batch of up to 1000 values, terminate). Returns their run ids."""
    from mlflow.entities import Metric, Param

    ids = {}
    for run_id in stale:
        client.delete_run(run_id)  # replaced, never appended to
    for c in cells:
        row = c.row
        tags = {STUDY_ID_TAG: study_id, ROLE_TAG: "cell", PARENT_TAG: parent_id}
        tags.update({k: _iso(row.get(k))[:MAX_TAG] for k in TAGS if row.get(k) is not None})
        start = _ms(row.get("started_at"))
        run = client.create_run(experiment_id, start_time=start, tags=tags,
                                run_name=run_name(row, axes))
        run_id = ids[c.cell_id] = run.info.run_id
        params = [Param(k, str(row[k])) for k in PARAMS if row.get(k) is not None]
        t0 = start if start is not None else int(time.time() * 1000)
        ep = c.epochs
        metrics = []
        if len(ep.get("epoch", ())):
            steps = ep["epoch"].astype(int).tolist()
            walls = np.nan_to_num(ep["wall_s"], nan=0.0)
            stamps = (t0 + walls * 1000).astype(np.int64).tolist()
            for k in HISTORY:
                metrics += [Metric(k, float(v), ts, s)
                            for v, ts, s in zip(ep[k].tolist(), stamps, steps) if _finite(v)]
        end = _ms(row.get("finished_at")) or t0
        step = int(row.get("epochs_done") or 0)
        metrics += [Metric(name, float(row[col]), end, step)
                    for col, name in FINALS.items() if _finite(row.get(col))]
        _log_batch(client, run_id, metrics=metrics, params=params)
        status = "FINISHED" if row.get("status") == "ok" else "FAILED"
        client.set_terminated(run_id, status, end_time=end)
    return ids


def _log_batch(client, run_id: str, metrics=(), params=(), tags=()) -> None:
    """MLflow takes at most 1000 values per batch (100 params, 100 tags)."""
    from mlflow.entities import RunTag

    metrics, params = list(metrics), list(params)
    tags = [t if not isinstance(t, tuple) else RunTag(*t) for t in tags]
    while metrics or params or tags:
        p, params = params[:100], params[100:]
        t, tags = tags[:100], tags[100:]
        m, metrics = metrics[:1000 - len(p) - len(t)], metrics[1000 - len(p) - len(t):]
        client.log_batch(run_id, metrics=m, params=p, tags=t)


HEADLINE_METRICS = ("n", "n_runs", "ratio", "ratio_ci90_low", "ratio_ci90_high", "margin",
                    "p_tost_holm", "p_ttest_holm", "median_ratio", "ratio_ci_low", "ratio_ci_high")


def headline(stats_csv: Path) -> tuple[list, list]:
    """The report's headline (analysis' stats.csv, over all Q bins of each dataset) as parent
    metrics, and its equivalence verdicts (the `verdict` column: equivalent, equivalent but
    different, different, inconclusive, too few settings) as tags."""
    from mlflow.entities import Metric
    import pandas as pd

    if not stats_csv.is_file():
        return [], []
    try:
        s = pd.read_csv(stats_csv, keep_default_na=False, na_values=[""])
        s = s[s["q_bin"].astype(str) == "all"]
    except (OSError, ValueError, KeyError):
        return [], []
    now = int(time.time() * 1000)
    metrics, tags = [], []
    for r in s.to_dict("records"):
        key = f"{r['dataset']}.{r['metric']}"
        for col in HEADLINE_METRICS:
            if col in r and _finite(r[col]):
                metrics.append(Metric(f"headline.{key}.{col}", float(r[col]), now, 0))
        verdict = r.get("verdict")
        if isinstance(verdict, str) and verdict:  # training-time rows carry no verdict
            tags.append((f"verdict.{key}", verdict))
    return metrics, tags


def _spec_description(store: Store) -> str:
    import tomllib
    try:
        return str(tomllib.loads(store.spec_path.read_text()).get("study", {}).get("description", ""))
    except (OSError, ValueError):
        return ""


def _parse_iso_ms(s) -> int | None:
    try:
        return _ms(dt.datetime.fromisoformat(s))
    except (TypeError, ValueError):
        return None



def export_mlflow(store: Store, uri: str | None, workers: int = 1) -> ExportCounts:
    """`study export DIR --mlflow [URI]`: every cell not yet exported as it is now."""
    t0 = time.time()
    cells = list(store_cells(store))
    starts = [ms for c in cells if (ms := _ms(c.row.get("started_at"))) is not None]
    target = MlflowTarget(store, uri, first_start_ms=min(starts, default=None))
    todo, stale, same = target.plan(cells)
    n_replaced = len(stale)
    try:
        if workers > 1 and len(todo) >= 100:
            _write_in_processes(target, todo, stale, workers)
        else:
            target.write(todo, stale)
        target.finish_parent()
    except MissingPackage:
        raise
    except Exception as e:
        raise TrackerError(f"export to MLflow {target.uri} stopped: {_one_line(e)}; run the "
                           "same command again to continue (what was written is kept)") from None
    return ExportCounts(added=len(todo) - n_replaced, replaced=n_replaced, unchanged=same,
                        wall_s=time.time() - t0, where=target.uri,
                        artifacts=readable_location(target.artifacts, target.uri))


def _write_in_processes(target: MlflowTarget, todo: list[Cell], stale: list[str],
                        workers: int) -> None:
    """MLflow's SQL store spends its time in Python (SQLAlchemy), ~0.1 s per 400-value cell:
    worker processes, each with its own client, share the cells."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    for run_id in stale:
        target.client.delete_run(run_id)
    chunks = [todo[i::workers] for i in range(workers)]
    args = (target.uri, target.local, target.experiment_id, target.parent_id, target.study_id,
            target.axes)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for chunk, f in [(ch, pool.submit(_write_worker, *args, ch)) for ch in chunks if ch]:
            target.remember(chunk, f.result())


def _write_worker(uri, local, experiment_id, parent_id, study_id, axes, cells) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    if local:
        tune_local_sqlite(uri)
    return write_cells(MlflowClient(tracking_uri=uri), experiment_id, parent_id, study_id, axes, cells)
