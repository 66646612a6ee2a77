"""Executors by name: how the pending cells run (what runs is the runner's), register / get / list.

Every executor has one signature, `run(units, run_opts, land, progress, store)`: the
pending cells in units of training (lists of sweep.Cell: one cell, or a fused group that
sweep.fusion.pack made), the command's runner.RunOptions (the trial's options, as every
cell trains with them, in `run_opts.trial`), `land(row, epochs)` to call for each finished
cell, the progress line and the store. An executor runs each unit through
`fused.train.run_group` (which runs a unit of one cell through `train.run_cell`, the solo
path) with `run_opts.trial` and lands every row, failed or not.

An entry names its functions as "module:function" and imports them on first use: `study plan`,
the CLI's --executor choices and the local executor need the names, not Ray (whose import
costs seconds).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from sweep import SpecError

Land = Callable[[dict, list[dict]], None]  # an executor's `land(row, epochs)`


@dataclass(frozen=True)
class Executor:
    name: str
    help: str  # a few words for `study run --help`
    run: str  # "module:function" with the signature above
    # "module:function"(run_opts) that refuses, before anything is written, what this
    # executor cannot run (a trial size the cluster cannot hold); None: nothing to check.
    check: str | None = None
    # True: a trial gets a GPU only where it asks for one (--gpus-per-trial), as Ray
    # schedules them; False: it trains in this process, on its GPU when there is one.
    gpus_on_request: bool = False

    def runner(self) -> Callable[..., None]:
        return _load(self.run)

    def preflight(self, run_opts) -> None:
        if self.check is not None:
            _load(self.check)(run_opts)


def _load(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


_REGISTRY: dict[str, Executor] = {}


def register(executor: Executor) -> Executor:
    if executor.name in _REGISTRY:
        raise ValueError(f"executor {executor.name!r} is registered twice")
    _REGISTRY[executor.name] = executor
    return executor


def list_executors() -> list[str]:
    """In the order registered: the first is the default."""
    return list(_REGISTRY)


def get(name: str) -> Executor:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SpecError(f"unknown executor {name!r}; use "
                        + " or ".join(list_executors())) from None


register(Executor("ray", "Ray Tune trials", run="study.executors.ray_tune:run_ray",
                  check="study.executors.ray_connect:connect", gpus_on_request=True))
register(Executor("local", "in this process, one by one",
                  run="study.executors.local:run_local"))
