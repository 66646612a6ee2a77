"""Live export: `study run ... --export mlflow[=URI] --export tensorboard[=LOGDIR]`."""
from __future__ import annotations

import queue
import sys
import threading
import time
from typing import Iterable

from ..store import Store
from .cells import Cell, cell_from_rows
from .errors import MLFLOW_PACKAGE, TENSORBOARD_PACKAGE, _one_line
from .to_mlflow import MlflowTarget, bound_http_retries
from .to_tensorboard import TensorBoardTarget


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
