"""`study plan SPEC --pilot DIR`: the power the planned study's equivalence test will have.

The spec side (this module): the planned settings per dataset x Q bin, each setting a
deep/shallow comparison of two different networks with its seeds, and the refusal of a pilot
that shares cells with the spec. The statistics side is analysis.plan_pilot (study/cli.py
joins the two: only the CLI imports analysis).
"""
from __future__ import annotations

from pathlib import Path

from sweep import SpecError, same_network
from sweep.params import DATASET_SIZES, n_train_examples

from .coverage import Q_LABELS, cell_n_params, q_bin
from .store import Store

A, B = "sequential", "parallel"


def planned_settings(cells) -> dict[tuple[str, str], dict[tuple, int]]:
    """{(dataset, q_bin): {setting: seeds}} of the spec's deep/shallow comparisons of two
    different networks (same-network pairs are controls, not evidence); q_bin of the deep side,
    as the analysis bins a pair."""
    by_pair: dict[str, dict[str, object]] = {}
    for c in cells:
        if c["architecture"] in (A, B):
            by_pair.setdefault(c.pair_key, {})[c["architecture"]] = c
    out: dict[tuple[str, str], dict[tuple, int]] = {}
    for sides in by_pair.values():
        if len(sides) < 2:
            continue
        a, b = sides[A], sides[B]
        if same_network.network_id(a.config) == same_network.network_id(b.config):
            continue
        cfg = a.config
        setting = tuple(sorted((k, repr(v)) for k, v in cfg.items() if k not in ("seed", "architecture")))
        n_train = n_train_examples(cfg["dataset"], cfg["val_fraction"], cfg.get("max_train_examples"))
        q = n_train * DATASET_SIZES[cfg["dataset"]].classes / cell_n_params(cfg)
        for label in ("all", Q_LABELS[q_bin(q)]):
            seeds = out.setdefault((cfg["dataset"], label), {})
            seeds[setting] = seeds.get(setting, 0) + 1
    return out


def check_pilot_disjoint(pilot: Path, cell_ids: set[str]) -> None:
    """Refuse a pilot that holds cells of the planned study: its variance would be judged twice."""
    store = Store(pilot)
    if not store.exists() and not store.trials_dir.is_dir():
        raise SpecError(f"pilot {pilot} is not a results folder (no spec.toml, no trials/); give "
                        "the folder an earlier `study run` wrote to")
    done = set(store.read_trials(columns=["cell_id"], live=True)["cell_id"])
    shared = done & cell_ids
    if shared:
        raise SpecError(f"pilot {pilot} shares {len(shared)} cells with the planned study (e.g. "
                        f"{sorted(shared)[0][:12]}): a pilot must be other seeds or other settings, "
                        "or the study's own data would set its plan")


def missing_pilot_line(spec) -> str:
    return ("power: not computed: it needs sigma2_between (how the architecture effect varies "
            "between settings) and sigma2_within (how a setting's log ratio moves from seed to "
            "seed), which a pilot measures: run a few settings with two seeds (other seeds than "
            f"this study's) with `study run pilot.toml`, then `study plan {spec.origin} --pilot "
            "results/pilot`")
