"""The analysis plan: how a study's results will be judged, saved before its data.

A margin chosen after seeing the data can be chosen to make a verdict come out; so the spec's
[analysis] table (margin, alpha, pilot) is saved in the results folder (`analysis_plan.json`)
by the `study run` that lands the first cell, with that time and, for `margin = "seed"` with a
pilot, the margins resolved from the pilot's seed noise: one number per dataset x Q bin x loss.
A later change (a changed [analysis] table, a `--margin` given to `study report` or `study
figures`) is allowed and appended to the plan's `changes`; the report then labels the verdicts
it judged under a changed plan *exploratory*. A store written before plans existed gets its
plan at its next `study run`, marked as recorded after data.

No torch, no ray: the analysis reads it too. Resolving a pilot's margins needs `analysis`
(only study/cli.py imports it, which hands them over as the [analysis] table's
`pilot_margins`).
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from sweep.spec import DEFAULT_MARGIN, SEED_MARGIN

from .atomic import atomic_write_text

PLAN_FILE = "analysis_plan.json"
DEFAULT_ALPHA = 0.05


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def plan_path(root: str | Path) -> Path:
    return Path(root) / PLAN_FILE


def read_plan(root: str | Path) -> dict | None:
    """The saved plan, or None (no plan, or an unreadable one: the report says so)."""
    try:
        return json.loads(plan_path(root).read_text())
    except (OSError, ValueError):
        return None


def judged(analysis: dict) -> dict:
    """What a plan fixes, from a spec's [analysis] table: margin, alpha, pilot."""
    return {"margin": analysis.get("margin", DEFAULT_MARGIN),
            "alpha": analysis.get("alpha", DEFAULT_ALPHA), "pilot": analysis.get("pilot")}


def _entry(analysis: dict) -> dict:
    entry = judged(analysis)
    if entry["margin"] == SEED_MARGIN and entry["pilot"]:
        # resolved by the caller from the pilot's seed noise (study/cli.py, through analysis)
        entry["margins"] = analysis.get("pilot_margins", [])
    return entry


def record_plan(root: str | Path, analysis: dict, has_data: bool) -> str | None:
    """Save the plan if the folder has none; append a change if the spec's [analysis] differs
    from the plan in force. Returns a line to print (None when nothing changed)."""
    root = Path(root)
    plan = read_plan(root)
    now = judged(analysis)
    if plan is None:
        plan = {**_entry(analysis), "recorded_at": _now(), "before_data": not has_data,
                "changes": []}
        atomic_write_text(plan_path(root), json.dumps(plan, indent=2) + "\n")
        return (None if not has_data else
                f"analysis plan: {plan_path(root)} recorded now, after data (this store predates "
                "saved plans): its verdicts are exploratory")
    current = in_force(plan)
    if {k: current.get(k) for k in now} == now:
        return None
    change = {**_entry(analysis), "source": "spec [analysis]", "recorded_at": _now(),
              "after_data": has_data}
    plan.setdefault("changes", []).append(change)
    atomic_write_text(plan_path(root), json.dumps(plan, indent=2) + "\n")
    return (f"analysis plan changed ({_describe(current)} -> {_describe(change)}), recorded in "
            f"{plan_path(root)}" + ("; verdicts judged under it are exploratory" if has_data
                                     else ""))


def record_override(root: str | Path, margin) -> None:
    """A `--margin` given to `study report` / `study figures` that differs from the plan: kept
    in the plan's changes (the report labels its verdicts exploratory)."""
    plan = read_plan(root)
    if plan is None or margin is None or margin == in_force(plan).get("margin"):
        return
    plan.setdefault("changes", []).append({"margin": margin, "source": "--margin",
                                           "recorded_at": _now(), "after_data": True})
    atomic_write_text(plan_path(root), json.dumps(plan, indent=2) + "\n")


def in_force(plan: dict) -> dict:
    """The plan as its last change from the spec left it (--margin changes are one-off)."""
    out = {k: plan.get(k) for k in ("margin", "alpha", "pilot", "margins")}
    for c in plan.get("changes", []):
        if c.get("source") == "spec [analysis]":
            out = {k: c.get(k) for k in ("margin", "alpha", "pilot", "margins")}
    return out


def _describe(entry: dict) -> str:
    m = entry.get("margin")
    text = f"margin {m}" + (f" from pilot {entry['pilot']}" if m == SEED_MARGIN and
                            entry.get("pilot") else "")
    return text + f", alpha {entry.get('alpha')}"


def margin_table(entry: dict) -> dict | None:
    """The resolved pilot margins of a plan entry as {(dataset, q_bin, metric): delta}."""
    rows = entry.get("margins")
    if not rows:
        return None
    return {(r["dataset"], r["q_bin"], r["metric"]): float(r["delta"]) for r in rows}


def record_for_run(root: str | Path, spec, has_data: bool, out) -> None:
    """`study run`'s hook, under the driver lock before any cell: save or update the plan."""
    line = record_plan(root, spec.analysis, has_data)
    if line:
        print(f"[study] {line}", file=out)


def check_pilot(spec) -> None:
    """Before a run: a spec that names a pilot must name one that shares no cell with it
    (refused in one line, nothing written)."""
    pilot = spec.analysis.get("pilot")
    if pilot:
        from .power_plan import check_pilot_disjoint

        check_pilot_disjoint(Path(pilot), {c.cell_id for c in spec.cells()})
