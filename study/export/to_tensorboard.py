"""A study in TensorBoard: one run folder per cell, its scalars and the HParams summaries."""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterable

import numpy as np

from ..store import Store, StoreError
from .cells import (FINALS, PARAMS, STUDY_ID_TAG, TB_SCALARS, Cell, ExportCounts, _finite,
                    run_name, safe_folder, store_cells, study_axes)
from .errors import TENSORBOARD_PACKAGE, require

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

