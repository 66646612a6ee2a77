"""Bundles: small units of training (a cell, or a fused group) run one after another in one
Ray trial, so that Tune's fixed cost per trial (scheduling, the trainable's set-up, a driver
round trip per result: tens of ms on a 2-core machine) is paid once per bundle, not once per
near-empty cell. No torch, no Ray: a plan over the cells' configs.

A unit is small when its cells' estimated work (sweep.cost: training FLOPs, and optimizer
steps, whose fixed cost dominates a tiny net) is under SMALL_FLOPS and SMALL_STEPS. A bundle
holds consecutive small units up to those totals and MAX_UNITS units, and no more than
keeps TRIALS_PER_SLOT trials for each slot of the cluster (bundling never leaves a slot idle
that one cell per trial would fill). Large units stay one per trial. Bundling changes no
value a cell trains to: each unit trains exactly as in a trial of its own, on the same
reused worker process.
"""
from __future__ import annotations

import math

from sweep.cost import cell_flops, examples
from sweep.values import parse_off_auto_or_count

SMALL_FLOPS = 1e9  # ~0.1 s of one CPU core's arithmetic at these widths
SMALL_STEPS = 2000  # ~1 ms of fixed cost each on a CPU (autograd, optimizer, launches)
MAX_UNITS = 32
TRIALS_PER_SLOT = 4


def parse_bundle(value: str) -> int | str:
    """--bundle's value: "off" (one unit per trial), "auto" or a whole N >= 1 (units per
    trial, small units only; 1 is off)."""
    return parse_off_auto_or_count(value, "--bundle", "N", 1024)


def cell_steps(config: dict) -> int:
    """Optimizer steps of a cell's training."""
    n_train = examples(config)[0]
    return config["epochs"] * math.ceil(n_train / config["batch_size"])


def unit_cost(unit: list[dict]) -> tuple[float, int]:
    """(FLOPs, steps) of a unit (its cells' configs): a fused group's members step together."""
    return (sum(cell_flops(c) for c in unit), max(cell_steps(c) for c in unit))


def plan_bundles(units: list[list[dict]], mode: int | str, slots: int) -> list[list[int]]:
    """The unit indices of each trial, in order: small units in bundles (see the module's
    docstring), every other unit alone. `units` holds each unit's cell configs; `mode` is
    --bundle's value (the most units in a bundle, or "auto" for MAX_UNITS); `slots` the trials
    the cluster runs at once."""
    n = len(units)
    cap = MAX_UNITS if mode == "auto" else (1 if mode == "off" else int(mode))
    cap = min(cap, max(1, n // (TRIALS_PER_SLOT * max(1, slots))))
    if cap <= 1:
        return [[i] for i in range(n)]
    out: list[list[int]] = []
    flops, steps = 0.0, 0
    for i, unit in enumerate(units):
        f, s = unit_cost(unit)
        small = f <= SMALL_FLOPS and s <= SMALL_STEPS
        last = out[-1] if out else None
        if (small and last is not None and len(last) < cap
                and flops + f <= SMALL_FLOPS and steps + s <= SMALL_STEPS):
            last.append(i)
            flops, steps = flops + f, steps + s
        else:
            out.append([i])
            flops, steps = (f, s) if small else (math.inf, math.inf)
    return out


__all__ = ["plan_bundles", "parse_bundle", "unit_cost", "cell_steps", "MAX_UNITS", "SMALL_FLOPS",
           "SMALL_STEPS"]
