"""The progress line of a running study (what `study run` prints every few seconds)."""
from __future__ import annotations

import sys
import time
from typing import Callable

from .durations import short_duration


class Progress:
    """One progress line: cells done/total, running, failed, ETA (every few seconds).

    The ETA is measured from the first landed cell on (start-up, data loading and the first
    cell's compile/warm-up are not a rate), shown only once a few cells have landed since,
    and as a range that narrows as more land (~ 1/sqrt(cells) relative spread).
    """
    MIN_CELLS_FOR_ETA = 3

    def __init__(self, total: int, done: int, out=sys.stderr, quiet: bool = False,
                 every_s: float = 5.0, heartbeat: Callable[[], None] | None = None):
        self.total, self.done0, self.done = total, done, done
        self.running = self.failed = self.diverged = 0
        self.trials = 0  # trials (a cell, or a fused group) running, as the executor scheduled
        # the most cells and trials that ran at once: the executor's own record of its packing
        self.peak_running = self.peak_trials = 0
        self.t0 = time.time()
        self.out, self.quiet, self.every_s = out, quiet, every_s
        self.last = 0.0
        self.heartbeat = heartbeat
        self.t_first: float | None = None  # when the first cell of this run landed
        self.done_first = done

    def eta(self) -> str:
        left = self.total - self.done
        if left <= 0:
            return "0s"
        k = self.done - self.done_first
        if self.t_first is None or k < self.MIN_CELLS_FOR_ETA:
            return "after a few cells"
        est = (time.time() - self.t_first) / k * left
        spread = 1 / k ** 0.5
        return f"{short_duration(est * (1 - spread))}-{short_duration(est * (1 + spread))}"

    def line(self) -> str:
        elapsed = time.time() - self.t0
        return (f"[study] {self.done}/{self.total} cells done, {self.running} running, "
                f"{self.failed} failed, {self.diverged} diverged, "
                f"elapsed {short_duration(elapsed)}, ETA {self.eta()}")

    def tick(self, force: bool = False) -> None:
        self.peak_running = max(self.peak_running, self.running)
        self.peak_trials = max(self.peak_trials, self.trials)
        now = time.time()
        if self.t_first is None and self.done > self.done0:
            self.t_first, self.done_first = now, self.done
        if force or now - self.last >= self.every_s:
            self.last = now
            if self.heartbeat:
                self.heartbeat()
            if not self.quiet:
                print(self.line(), file=self.out, flush=True)
