"""A study in the experiment trackers researchers already use (issue 19): MLflow and TensorBoard.

MLflow: one experiment per study (a study is its folder: it is found by the folder's study id,
not by its name), one parent run, one child run per cell nested under it. TensorBoard: one run
folder per cell with its per-epoch scalars and the HParams plugin's session summaries.

Both exports are idempotent and incremental: a cell already exported with the same row
(`finished_at`) is left alone, a re-run cell's run or folder is replaced whole, new cells are
added. The names follow the store's schema: tags are the trial row's text columns under their
own names, metric histories are the epoch columns (step = epoch), params are the grid
parameters. mlflow and tensorboard are optional: they are imported here, inside functions,
and only when an export runs (the CLI's start-up never imports them).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import queue
import re
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from . import schema
from .store import Store, StoreError

# -- what goes where, from the schema (a renamed column is exported under its new name) -----
_TEXT = (pa.types.is_string, pa.types.is_timestamp)
PARAMS = list(schema.PARAM_COLUMNS)
# Text columns of a trial row, as tags; `architecture` (a param) is a tag too, to filter by.
TAGS = ["architecture"] + [f.name for f in schema.TRIAL_FIELDS
                           if f.name not in PARAMS and any(t(f.type) for t in _TEXT)]
# Per-epoch scalars, step = epoch; an epoch's wall_s (training time so far) is each point's
# timestamp. TensorBoard's event files are cheap: it gets them all. MLflow gets the loss and
# accuracy curves only: each value costs its SQL store Python time, and train_s as a fifth
# curve made the paper store's export 13% slower (607 s against 536 s on 2 cores).
TB_SCALARS = [c for c in schema.EPOCH_COLUMNS if c not in ("cell_id", "epoch", "wall_s")]
HISTORY = [c for c in TB_SCALARS if c != "train_s"]
# Numbers of the trial row; those that share an epoch column's name get a "final_" prefix (a
# final full evaluation is not one more point of the epoch curve).
FINALS = {f.name: (f"final_{f.name}" if f.name in schema.EPOCH_COLUMNS else f.name)
          for f in schema.TRIAL_FIELDS
          if f.name not in PARAMS and (pa.types.is_floating(f.type) or pa.types.is_integer(f.type))}
STUDY_ID_TAG = "study_id"
ROLE_TAG = "study_role"  # "study" (the parent run) or "cell"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag
MAX_TAG = 5000  # MLflow refuses longer values on some servers: an error is cut, not refused
MLFLOW_PACKAGE, TENSORBOARD_PACKAGE = "mlflow", "tensorboard"


class TrackerError(RuntimeError):
    """The tracker cannot be reached or refuses the export (exit 3); one line."""


class MissingPackage(RuntimeError):
    """An optional package is not installed (exit 2); the message says what to install."""


def require(package: str) -> None:
    """Is `package` installed? (found, not imported: mlflow's import alone takes seconds)"""
    import importlib.util
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise MissingPackage(
            f"exporting to {package} needs the {package} package: pip install "
            f"'deep-shallow-study[{package}]' (or pip install {package})") from None


# -- the cells, from the store or as they land ----------------------------------------------
@dataclass
class Cell:
    row: dict  # the trial row, python values (timestamps as aware datetimes)
    epochs: dict[str, np.ndarray]  # epoch column -> values, sorted by epoch

    @property
    def cell_id(self) -> str:
        return self.row["cell_id"]

    @property
    def finished(self) -> str:
        """The row's identity for re-runs: a re-run cell lands with a new finished_at."""
        return _iso(self.row.get("finished_at"))


def cell_from_rows(row: dict, epochs: list[dict]) -> Cell:
    """A landed cell as the driver holds it (runner.land's row and epoch dicts)."""
    epochs = sorted(epochs, key=lambda e: e["epoch"])
    cols = {c: np.array([e.get(c) for e in epochs], dtype=float if c != "cell_id" else object)
            for c in schema.EPOCH_COLUMNS if c != "cell_id"}
    return Cell(dict(row), cols)


def store_cells(store: Store) -> Iterator[Cell]:
    """Every cell of the store with its epochs (one read of each table)."""
    trials = store.read_table("trials")
    epochs = store.read_table("epochs")
    epochs = epochs.sort_by([("cell_id", "ascending"), ("epoch", "ascending")])
    ids = epochs["cell_id"].to_numpy(zero_copy_only=False)
    cols = {c: epochs[c].to_numpy(zero_copy_only=False).astype(float)
            for c in schema.EPOCH_COLUMNS if c != "cell_id"}
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.array([], int)
    bounds = {ids[s]: (s, e) for s, e in zip(starts, np.r_[starts[1:], len(ids)])}
    for row in trials.sort_by("cell_id").to_pylist():
        s, e = bounds.get(row["cell_id"], (0, 0))
        yield Cell(row, {c: v[s:e] for c, v in cols.items()})


def _iso(v) -> str:
    if v is None:
        return ""
    if isinstance(v, dt.datetime):
        return v.astimezone(dt.timezone.utc).isoformat()
    return str(v)


def _ms(v) -> int | None:
    return int(v.timestamp() * 1000) if isinstance(v, dt.datetime) else None


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and not math.isfinite(v))


# -- names -----------------------------------------------------------------------------------
def study_axes(store: Store) -> list[str]:
    """The parameters the study varies (besides architecture), in spec order: a run's name."""
    from sweep import parse_spec
    try:
        spec = parse_spec(store.spec_path.read_text(), origin=str(store.spec_path))
    except Exception:  # an unreadable spec only costs the names their settings
        return []
    names = [k.split(".", 1)[-1] for k in spec.axes()]
    return [n for n in dict.fromkeys(names) if n != "architecture"]


def run_name(row: dict, axes: list[str]) -> str:
    """Architecture and the settings that vary, e.g. 'parallel layers=2 lr=0.001'."""
    bits = [str(row.get("architecture"))]
    bits += [f"{k}={row[k]}" for k in axes if row.get(k) is not None]
    return " ".join(bits)


def safe_folder(name: str, cell_id: str) -> str:
    """A run name as one folder name: only [A-Za-z0-9._=+-], its cell_id last (unique)."""
    safe = re.sub(r"[^A-Za-z0-9._=+-]+", "_", name).strip("._")[:150]
    return f"{safe}__{cell_id}" if safe else cell_id


# -- MLflow ------------------------------------------------------------------------------------
@dataclass
class ExportCounts:
    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    wall_s: float = 0.0
    where: str = ""
    notes: list[str] = field(default_factory=list)


def local_mlflow_uri(store: Store) -> str:
    """MLflow's own local backend (sqlite since MLflow 3), inside the results folder."""
    path = (store.root / "mlflow").resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


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

    def __init__(self, store: Store, uri: str | None):
        require(MLFLOW_PACKAGE)
        from mlflow.tracking import MlflowClient

        self.store = store
        self.local = not uri
        self.uri = uri or local_mlflow_uri(store)
        self.study_id = store.study_id()
        meta = store.meta()
        self.study_name = meta.get("name") or store.root.name
        self.axes = study_axes(store)
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
        if exp is not None:
            return exp.experiment_id
        art = ((self.store.root / "mlflow" / "artifacts").resolve().as_uri()
               if self.local else None)
        return self.client.create_experiment(
            name, artifact_location=art,
            tags={STUDY_ID_TAG: self.study_id, "results_folder": str(self.store.root.resolve())})

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
            return found[0].info.run_id
        meta = self.store.meta()
        desc = _spec_description(self.store)
        tags = {STUDY_ID_TAG: self.study_id, ROLE_TAG: "study", "study": self.study_name,
                "description": desc[:MAX_TAG], "mlflow.note.content": desc[:MAX_TAG],
                "created_at": str(meta.get("created_at", ""))}
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
        self.client.set_terminated(self.parent_id, "FINISHED")


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


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def export_mlflow(store: Store, uri: str | None, workers: int = 1) -> ExportCounts:
    """`study export DIR --mlflow [URI]`: every cell not yet exported as it is now."""
    t0 = time.time()
    target = MlflowTarget(store, uri)
    todo, stale, same = target.plan(store_cells(store))
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
                        wall_s=time.time() - t0, where=target.uri)


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


# -- TensorBoard ---------------------------------------------------------------------------------
MANIFEST = ".study-cell.json"  # in each run folder: which cell, which row


class TensorBoardTarget:
    """Run folders under `logdir`, one per cell; a re-run cell's folder is rewritten whole in
    a staging folder beside `logdir` and swapped in (event files only ever append)."""

    def __init__(self, store: Store, logdir: str | None):
        require(TENSORBOARD_PACKAGE)
        self.store = store
        self.logdir = Path(logdir) if logdir else store.root / "tensorboard"
        self.staging = self.logdir.parent / f".{self.logdir.name}.staging"
        try:
            self.logdir.mkdir(parents=True, exist_ok=True)
            self.staging.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot write {self.logdir}: {e.strerror or e}; choose another "
                             "--tensorboard folder") from None
        self.study_id = store.study_id()
        self.axes = study_axes(store)
        self.runs = self._runs()

    def _runs(self) -> dict[str, tuple[Path, str]]:
        runs = {}
        for m in self.logdir.glob(f"*/{MANIFEST}"):
            try:
                info = json.loads(m.read_text())
            except (OSError, ValueError):
                continue
            if info.get(STUDY_ID_TAG) == self.study_id:
                runs[info["cell_id"]] = (m.parent, info.get("finished_at", ""))
        return runs

    def plan(self, cells: Iterable[Cell]) -> tuple[list[Cell], int, int]:
        todo, replaced, same = [], 0, 0
        for c in cells:
            have = self.runs.get(c.cell_id)
            if have and have[1] == c.finished:
                same += 1
                continue
            replaced += bool(have)
            todo.append(c)
        return todo, replaced, same

    def write(self, cells: list[Cell]) -> None:
        for c in cells:
            self._write_one(c)

    def _write_one(self, c: Cell) -> None:
        name = safe_folder(run_name(c.row, self.axes), c.cell_id)
        tmp = self.staging / f"{c.cell_id}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        _write_events(tmp, c, self.axes)
        (tmp / MANIFEST).write_text(json.dumps(
            {"cell_id": c.cell_id, "finished_at": c.finished, STUDY_ID_TAG: self.study_id}) + "\n")
        final = self.logdir / name
        old = self.runs.get(c.cell_id, (None, ""))[0]
        trash = []
        for path in {p for p in (old, final) if p is not None and p.exists()}:
            dest = self.staging / f"old-{uuid.uuid4().hex[:8]}"
            os.replace(path, dest)  # a reader sees the old folder or none, never half of one
            trash.append(dest)
        os.replace(tmp, final)
        for t in trash:
            shutil.rmtree(t, ignore_errors=True)
        self.runs[c.cell_id] = (final, c.finished)


def _write_events(folder: Path, c: Cell, axes: list[str]) -> None:
    """The cell's scalars (per epoch, then the finals) and the HParams plugin's session
    start/end summaries, through tensorboard's own event writer and protos (no TensorFlow)."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    row, ep = c.row, c.epochs
    t0 = row["started_at"].timestamp() if isinstance(row.get("started_at"), dt.datetime) else time.time()
    t1 = row["finished_at"].timestamp() if isinstance(row.get("finished_at"), dt.datetime) else t0
    writer = EventFileWriter(str(folder))

    def scalars(step: int, wall: float, values: dict) -> None:
        vals = [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                for k, v in values.items() if _finite(v)]
        if vals:
            writer.add_event(event_pb2.Event(wall_time=wall, step=step,
                                             summary=summary_pb2.Summary(value=vals)))

    def plugin(tag: str, data) -> None:
        md = metadata.create_summary_metadata(data)
        writer.add_event(event_pb2.Event(wall_time=t0, summary=summary_pb2.Summary(
            value=[summary_pb2.Summary.Value(tag=tag, metadata=md)])))

    start = plugin_data_pb2.SessionStartInfo(start_time_secs=t0)
    for k in PARAMS:
        v = row.get(k)
        if isinstance(v, bool):
            start.hparams[k].bool_value = v
        elif isinstance(v, (int, float)):
            start.hparams[k].number_value = float(v)
        elif isinstance(v, str):
            start.hparams[k].string_value = v
    plugin(metadata.SESSION_START_INFO_TAG, plugin_data_pb2.HParamsPluginData(
        session_start_info=start, version=metadata.PLUGIN_DATA_VERSION))
    walls = np.nan_to_num(ep.get("wall_s", np.array([])), nan=0.0)
    for i, step in enumerate(ep.get("epoch", np.array([])).astype(int).tolist()):
        scalars(step, t0 + float(walls[i]), {k: ep[k][i] for k in TB_SCALARS})
    scalars(int(row.get("epochs_done") or 0), t1,
            {name: row.get(col) for col, name in FINALS.items()})
    status = api_pb2.STATUS_SUCCESS if row.get("status") == "ok" else api_pb2.STATUS_FAILURE
    plugin(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(
        session_end_info=plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=t1),
        version=metadata.PLUGIN_DATA_VERSION))
    writer.close()


def export_tensorboard(store: Store, logdir: str | None) -> ExportCounts:
    """`study export DIR --tensorboard [LOGDIR]`."""
    t0 = time.time()
    target = TensorBoardTarget(store, logdir)
    todo, replaced, same = target.plan(store_cells(store))
    target.write(todo)
    return ExportCounts(added=len(todo) - replaced, replaced=replaced, unchanged=same,
                        wall_s=time.time() - t0, where=str(target.logdir))


# -- live: `study run ... --export mlflow[=URI] --export tensorboard[=LOGDIR]` --------------------
def parse_targets(values: Iterable[str]) -> list[tuple[str, str | None]]:
    """'mlflow', 'mlflow=URI', 'tensorboard', 'tensorboard=LOGDIR' -> [(kind, where)]."""
    out = []
    for v in values:
        kind, _, where = v.partition("=")
        if kind not in (MLFLOW_PACKAGE, TENSORBOARD_PACKAGE):
            from sweep import SpecError
            raise SpecError(f"--export {v!r}: use mlflow[=URI] or tensorboard[=LOGDIR]")
        out.append((kind, where or None))
    return out


class LiveExport:
    """Exports cells as the driver lands them, from one background thread: `submit` only
    queues, so a tracker that is down or slow never stalls or fails the study. A target that
    fails is dropped with a one-line warning; `study export` catches up later."""

    # At the end of a run, wait for what is still queued while it moves: give up once nothing
    # has moved for this long (a slow tracker delays the end of a study by this much at most).
    CLOSE_WAIT_S = 30.0

    def __init__(self, store: Store, targets: list[tuple[str, str | None]], out=sys.stderr):
        self.store, self.targets, self.out = store, targets, out
        self.q: queue.Queue = queue.Queue()
        self.moved = time.monotonic()  # last sign of progress of the export thread
        self.thread = threading.Thread(target=self._loop, name="study-export", daemon=True)
        self.thread.start()

    def submit(self, row: dict, epochs: list[dict]) -> None:
        self.q.put((dict(row), [dict(e) for e in epochs]))

    def close(self, wait: bool = True) -> None:
        self.q.put(None)
        self.moved = time.monotonic()
        if wait:
            while self.thread.is_alive() and time.monotonic() - self.moved < self.CLOSE_WAIT_S:
                self.thread.join(0.2)
            if self.thread.is_alive():
                self._warn("", "still busy at the end of the run; left behind, run "
                           f"`study export {self.store.root}` to finish it")

    def _warn(self, kind: str, why: str) -> None:
        print(f"[study] warning: live export{' to ' + kind if kind else ''} {why}; the study "
              "goes on", file=self.out, flush=True)

    def _open(self) -> list:
        bound_http_retries(0, 5)  # a dead server costs one attempt, not minutes
        opened = []
        for kind, where in self.targets:
            self.moved = time.monotonic()
            try:
                opened.append((kind, where, MlflowTarget(self.store, where) if kind == MLFLOW_PACKAGE
                               else TensorBoardTarget(self.store, where)))
            except Exception as e:
                self._warn(kind, f"failed ({_one_line(e)}); `study export {self.store.root} "
                           f"--{kind}{' ' + where if where else ''}` exports it later")
        return opened

    def _loop(self) -> None:
        opened = self._open()  # at once: importing mlflow and opening its store take seconds
        self.moved = time.monotonic()
        while True:
            item = self.q.get()
            if item is None:
                break
            cell = cell_from_rows(*item)
            for t in list(opened):
                if not self._try(t, lambda target: self._one(target, cell)):
                    opened.remove(t)
                self.moved = time.monotonic()
        for t in opened:
            if t[0] == MLFLOW_PACKAGE:
                self._try(t, lambda target: target.finish_parent())

    @staticmethod
    def _one(target, cell: Cell) -> None:
        if isinstance(target, MlflowTarget):
            todo, stale, _ = target.plan([cell])
            target.write(todo, stale)
        else:
            target.write(target.plan([cell])[0])

    def _try(self, t, fn) -> bool:
        kind, where, target = t
        try:
            fn(target)
            return True
        except Exception as e:
            self._warn(kind, f"failed ({_one_line(e)}); `study export {self.store.root} "
                       f"--{kind}{' ' + where if where else ''}` exports it later")
            return False
