"""Stopping a study on a signal with nothing lost: no torch or ray here.

A batch system warns before it ends a job: SLURM sends SIGUSR1 ahead of a time limit (with
`--signal`) and SIGTERM on preemption or `scancel`. On the first of these the driver starts
no more cells and asks the cells in flight to stop; each finishes the epoch it is in, writes
its checkpoint then (whatever the time since its last one), and ends without a row. The
driver lands the rows that finished, releases the results folder and exits with 128 + the
signal's number, so `study resume` continues every cell from the epoch it reached. A second
signal exits at once (the rows already landed stay).

The driver's flag is set by its signal handler. A trial in another process (a Ray worker)
asks the driver through `checking`'s function, which the executor installs per trial.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class CellInterrupted(Exception):
    """A cell stopped at a stop request, after writing its checkpoint: no error of the
    cell's own, and no row (it is still pending, resumable from that checkpoint)."""


_requested: int | None = None  # the signal the driver got first
_handler = None  # the driver's handler while handling_signals runs
_check: Callable[[], bool] | None = None  # in a trial process: does the driver ask to stop?


def requested() -> int | None:
    """The signal that asked this driver to stop, or None."""
    return _requested


def request(signum: int) -> None:
    global _requested
    if _requested is None:
        _requested = signum


def reset() -> None:
    """Forget a request (a new run in the same process, e.g. the next look of a sequence)."""
    global _requested
    _requested = None


def should_stop() -> bool:
    """Asked by a cell's training loop at the end of each epoch."""
    return _requested is not None or (_check is not None and _check())


@contextmanager
def checking(check: Callable[[], bool] | None) -> Iterator[None]:
    """For one trial in a worker process: `check` says whether the driver asks to stop."""
    global _check
    before, _check = _check, check
    try:
        yield
    finally:
        _check = before


# SIGTERM usually reaches every process of a job at once (SLURM ends a job so; Kubernetes
# stops a pod so), Ray's workers included: cells that cannot checkpoint any more must not
# keep the driver until SIGKILL (SLURM's default KillWait and Kubernetes' grace period are
# 30 s). SIGUSR1 is a warning sent to the driver alone, ahead of the end: no deadline here.
TERM_GRACE_S = 20.0


def grace_s(signum: int) -> float | None:
    """How long the driver waits for the cells in flight after `signum` (None: no limit)."""
    if signum != signal.SIGTERM:
        return None
    return float(os.environ.get("STUDY_STOP_GRACE_S", TERM_GRACE_S))


def exit_code() -> int:
    return 128 + int(_requested) if _requested is not None else 0


@contextmanager
def handling_signals(out=sys.stderr) -> Iterator[None]:
    """SIGTERM and SIGUSR1 stop the driver as the module says, while the block runs (in the
    main thread only: Python runs signal handlers there)."""
    late = []  # set by the grace timer before it signals again

    def handle(signum, frame):
        if _requested is not None:
            why = (f"the cells in flight did not stop within {grace_s(_requested):g} s"
                   if late else f"{signal.Signals(signum).name} again")
            print(f"[study] {why}: exiting now; the cells in flight resume from their last "
                  "checkpoint", file=out, flush=True)
            raise SystemExit(128 + _requested)
        request(signum)
        print(f"[study] {signal.Signals(signum).name}: starting no more cells; the cells in "
              "flight checkpoint at the end of their epoch, then the driver exits",
              file=out, flush=True)
        if grace_s(signum) is not None:
            def expire():
                late.append(True)
                os.kill(os.getpid(), signum)
            timer = threading.Timer(grace_s(signum), expire)
            timer.daemon = True
            timer.start()

    global _handler
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    _handler = handle
    try:
        yield
    finally:
        _handler = None
        for s, h in before.items():
            signal.signal(s, h)


def reclaim_signals() -> None:
    """Put the driver's handler back after a library replaced it: ray.init installs its own
    for SIGTERM in the driver (it logs the signal and exits 1, losing the cells in flight),
    and each Tune run one for SIGUSR1 (it stops the run, the cells without a checkpoint)."""
    if _handler is not None and threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, _handler)
