"""`study run SPEC --until-decided`: a study that grows by the spec's [design] looks until every
primary verdict is decided (the statistics: analysis.looks and analysis.sequential).

Look 1 is the spec's grid. After each look, if a primary row is undecided and looks (and the
budget) remain, every setting gets the next seed (max + 1) and the study runs again. The added
seeds go into the saved spec as a [design.extension] table (sweep.design) and every look into
DIR/design.json, so the saved spec holds every cell that ran, and the user's original spec,
re-run, is given the recorded extension before the store checks it (`with_recorded`): it
continues the study instead of being refused as a changed spec.
"""
from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from sweep import SpecError, parse_spec
from sweep.design import with_extension

from . import interrupt
from .atomic import atomic_write_text

DESIGN_FILE = "design.json"
# a primary row's decision before the last look: stopping for difference is not allowed, so a
# row is either equivalent (it stops) or undecided
EQUIVALENT, UNDECIDED = "equivalent", "undecided"
SPENDING = "Lan-DeMets O'Brien-Fleming, alpha / m per primary row (Bonferroni)"


def design_path(results: str | Path) -> Path:
    return Path(results) / DESIGN_FILE


def read_design(results: str | Path) -> dict | None:
    try:
        return json.loads(design_path(results).read_text())
    except (OSError, ValueError):
        return None


def _extended(spec, seeds: list[int]):
    """The spec with these added seeds (a new text: see sweep.design.with_extension)."""
    return parse_spec(with_extension(spec.source, seeds), origin=spec.origin)


def with_recorded(spec, results: str | Path):
    """The spec with the seeds the study's design added (design.json), where it has a
    [design] and lacks some of them: the user's original spec continues the grown study."""
    rec = read_design(results)
    if not spec.design or not rec:
        return spec
    added = [int(s) for s in rec.get("added_seeds", [])]
    if added and added != spec.design.get("added_seeds"):
        return _extended(spec, added)
    return spec


def check_flags(spec, args) -> None:
    """One line for a flag that cannot apply, before anything runs."""
    until = getattr(args, "until_decided", False)
    for flag, v in (("--max-looks", args.max_looks), ("--max-extra-cells", args.max_extra_cells)):
        if v is not None and not until:
            raise SpecError(f"{flag} is a budget of --until-decided; add --until-decided or drop it")
        if v is not None and v < (1 if flag == "--max-looks" else 0):
            raise SpecError(f"{flag} must be at least {1 if flag == '--max-looks' else 0}, got {v}")
    if until and not spec.design:
        raise SpecError(f"spec error: --until-decided needs a [design] table in {spec.origin} "
                        "(looks = 2 to 5, extend = \"seeds\")")


def row_key(dataset: str, metric: str) -> str:
    return f"{dataset}|{metric}"


def run_until_decided(spec, results: Path, args, run_once: Callable, primary_look: Callable,
                      draw: Callable, out=sys.stdout) -> int:
    """Run look after look (run_once(spec) -> exit code) until decided, the last look, or the
    budget; record each look in design.json; then draw once (draw()). `primary_look`:
    analysis.looks.primary_look (passed in: only the CLI imports analysis)."""
    design = spec.design
    base_seeds = list(design["base_seeds"])
    looks_planned = int(design["looks"])
    seeds_last = len(base_seeds) + looks_planned - 1
    rec = read_design(results) or {}
    base_cells = len(parse_spec(with_extension(spec.source, []), spec.origin).cells())
    code, stopped = 0, ""
    while True:
        added = list(spec.design.get("added_seeds", []))
        k = len(added) + 1
        code = max(code, run_once(spec))
        if interrupt.requested():  # this look is unfinished: `study resume` continues it
            return code
        seeds = len(base_seeds) + len(added)
        history, decided = {}, {}
        for look in rec.get("looks", [])[:k - 1]:
            for r in look["rows"]:
                key = row_key(r["dataset"], r["metric"])
                if r.get("information_fraction") is not None and not r.get("stopped_earlier"):
                    history.setdefault(key, []).append(r["information_fraction"])
                if r["decision"] == EQUIVALENT:
                    decided.setdefault(key, {**r, "decided_at_look": look["look"]})
        rows = primary_look(results, seeds, seeds_last, k == looks_planned, history, decided)
        cells = len(spec.cells())
        extra = cells - base_cells
        undecided = [r for r in rows if r["decision"] == UNDECIDED]
        new_seed = max(base_seeds + added) + 1
        if not any(r.get("information_fraction") is not None for r in rows):
            stopped = "no primary row can be tested (fewer than 3 settings, or no pairs)"
        elif not undecided:
            stopped = ("every primary row decided" if k < looks_planned
                       else f"the last planned look ({looks_planned})")
        elif args.max_looks is not None and k >= args.max_looks:
            stopped = f"budget: --max-looks {args.max_looks}"
        elif (args.max_extra_cells is not None
              and len(_extended(spec, added + [new_seed]).cells()) - base_cells > args.max_extra_cells):
            stopped = f"budget: --max-extra-cells {args.max_extra_cells}"
        look = {"look": k, "seeds": base_seeds + added, "seeds_per_setting": seeds,
                "cells": cells, "extra_cells": extra,
                "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": rows}
        rec = {"looks_planned": looks_planned, "extend": design["extend"], "spending": SPENDING,
               "stopping_for_difference": False, "base_seeds": base_seeds,
               "added_seeds": added, "looks": rec.get("looks", [])[:k - 1] + [look],
               "stopped": stopped or None}
        atomic_write_text(design_path(results), json.dumps(rec, indent=2) + "\n")
        _print_look(look, looks_planned, out)
        if stopped:
            print(f"[design] stopped after look {k}: {stopped}", file=out, flush=True)
            break
        spec = _extended(spec, added + [new_seed])
        rec["added_seeds"] = added + [new_seed]  # recorded before its cells run: a crash resumes
        atomic_write_text(design_path(results), json.dumps(rec, indent=2) + "\n")
        print(f"[design] look {k + 1}: every setting gets seed {new_seed}", file=out, flush=True)
    draw()
    return code


def _print_look(look: dict, planned: int, out) -> None:
    print(f"[design] look {look['look']} of {planned}: seeds {look['seeds']}, "
          f"{look['cells']} cells", file=out)
    for r in look["rows"]:
        t = r.get("information_fraction")
        frac = f"t = {t:.2f}, boundary z = {r['boundary_z']:.3f} (p < {r['nominal_p']:.4g})" \
            if t is not None else "not tested"
        print(f"[design]   {r['dataset']} {r['metric']}: n = {r['n']}, {frac}, "
              f"p_tost = {_p(r['p_tost'])}: {r['decision']}"
              + (f" (at look {r['decided_at_look']})" if r.get("stopped_earlier") else ""),
              file=out, flush=True)


def _p(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"
