"""`study plan SPEC`: the grid of a spec, what it costs, how much of it is done, its seeds
and its power (with --pilot), before a cell runs."""
from __future__ import annotations

import json

from sweep import load_spec

from .cli import _check_size, _power_lines, _results_dir
from .counts import STATUS_COLUMNS, StudyGrid, count_cells
from .store import Store


def _trained_cells(cells) -> list:
    """One cell per distinct network: the cells that actually train."""
    from sweep import same_network

    return [same_network.trained_cell(g) for g in same_network.groups(cells).values()]


def plan(args) -> int:
    from sweep.cost import format_cost, grid_cost

    from .sequential_run import with_recorded

    spec = load_spec(args.spec)
    spec = with_recorded(spec, _results_dir(args, spec))  # a grown study's seeds count as planned
    _check_size(spec, _results_dir(args, spec), args)
    store = Store(_results_dir(args, spec))
    grid = StudyGrid(spec, store)
    cells = grid.cells()
    trained = _trained_cells(cells)
    from .power_plan import missing_pilot_line

    # computed first: a pilot that cannot plan is refused before a line is printed
    power = _power_lines(spec, cells, args.pilot) if args.pilot else [missing_pilot_line(spec)]
    cost = grid_cost(trained)
    n = count_cells(store.read_trials(columns=STATUS_COLUMNS, live=True), grid.cell_ids())
    if args.json:
        print(json.dumps({"study": spec.name, "origin": spec.origin, "cells": len(cells),
                          "networks": len(trained), "cost": cost.to_dict(),
                          "seeds_per_setting": len(spec.grid.get("seed", [0])),
                          "margin": spec.analysis.get("margin"),
                          "results": {"folder": str(store.root), "done": n.done, "ok": n.ok,
                                      "failed": n.failed, "diverged": n.diverged,
                                      "pending": n.pending}}, indent=2))
        return 0
    print(f"study {spec.name} ({spec.origin})")
    if spec.description:
        print(f"  {spec.description}")
    print("axes:")
    for k, v in spec.axes().items():
        print(f"  {k:<20} {len(v):>3} x  {', '.join(map(str, v))}")
    fixed = {k: v[0] for k, v in spec.grid.items() if len(v) == 1}
    print("fixed: " + ", ".join(f"{k}={v}" for k, v in fixed.items()))
    _print_counts(cells)
    print("\n".join(format_cost(cost)))
    print(f"results: {store.root}: {n.done} done ({n.ok} ok, {n.failed} failed, "
          f"{n.diverged} diverged), {n.pending} pending")
    from .coverage import format_coverage, q_coverage

    print("\n".join(format_coverage(q_coverage(cells))))
    print(_seed_line(spec))
    print("\n".join(power))
    return 0


def _seed_line(spec) -> str:
    """Whether the study can measure seed noise (the yardstick of its equivalence margin)."""
    seeds = spec.grid.get("seed", [0])
    margin = spec.analysis.get("margin", "default 0.1")
    if len(seeds) < 2:
        return ("seeds: one per setting, so seed-to-seed noise cannot be measured and an "
                "equivalence margin cannot be set against it; add `seed = [0, 1]` to [grid] "
                f"(equivalence margin: {margin})")
    return (f"seeds: {len(seeds)} per setting ({', '.join(map(str, seeds))}): seed noise is "
            f"measured; each setting's seeds are averaged into one comparison (equivalence "
            f"margin: {margin})")


def _print_counts(cells) -> None:
    """The grid's counts, each with what it means (pairs, groups, same-network copies)."""
    from sweep import same_network

    groups: dict[str, dict] = {}
    for c in cells:
        groups.setdefault(c.pair_key, {}).setdefault(c["architecture"], []).append(c)
    nets = same_network.groups(cells)
    same = {c.cell_id for g in nets.values() for c in g if len(g) > 1} - {
        same_network.trained_cell(g).cell_id for g in nets.values()}
    nid = {c.cell_id: same_network.network_id(c.config) for c in cells}
    ds = [(s, p) for a in groups.values() for s in a.get("sequential", [])
          for p in a.get("parallel", [])]
    ds_same = sum(1 for s, p in ds if nid[s.cell_id] == nid[p.cell_id])
    multi = sum(1 for a in groups.values() if len(a) > 1)
    print(f"cells: {len(cells)} in the grid, {len(nets)} distinct networks to train")
    if same:
        print(f"  same-network copies: {len(same)} cells are bit for bit the network of another "
              "cell (e.g. parallel at layers 1 is sequential);")
        print("    each such network is trained once and recorded under both cells, "
              "marked in column same_network_as")
    print(f"deep/shallow pairs: {len(ds)}  (a sequential and a parallel cell with every other "
          "setting equal: one comparison each)")
    if ds_same:
        print(f"  of which {ds_same} are same-network pairs: controls that must come out "
              f"identical, left out of the statistics ({len(ds) - ds_same} pairs are evidence)")
    print(f"pair groups: {multi}  (settings shared by cells of two or more architectures; a "
          "group counts once however many architectures it holds)")
