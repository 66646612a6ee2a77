"""Layer 3a: everything one analysis of a store computes, as one result object (`analyse`).

Nothing is drawn or written here: `draw.draw_figures` draws the result, `write.write_outputs`
saves the figures and tables, `report.render` lays it out as HTML.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd

from study.store import ReadReport, StoreReader
from study.trials import fused
from sweep import SpecError, parse_spec
from study import analysis_plan
from sweep.spec import DEFAULT_MARGIN, SEED_MARGIN, parse_margin

from . import frames
from ._common import AnalysisError, NothingToPlot, check_compare, check_store, guarded
from .captions import FIGURES
from .study_power import study_power, with_power
from .stats import seed_noise, seed_pairs, stats
from .verdicts import ALPHA

LESIONS_TABLE = Path("lesions") / "lesions.parquet"  # under DIR, written by study.lesion


@dataclass
class CurveInput:
    """What the learning-curve figure draws: the chosen rows of the evidence pairs and the
    epoch rows of both sides of each."""
    rows: list
    epochs: pd.DataFrame


@dataclass
class Analysis:
    """Everything one run computed; the drawing, writing and report layers take it."""
    root: Path
    a: str
    b: str
    trials: pd.DataFrame
    pairs: pd.DataFrame  # evidence: pairs of two different networks (one row per seed)
    table2: pd.DataFrame
    stats: pd.DataFrame
    bad_parts: list[str]
    notes: list[str] = field(default_factory=list)  # about the store, before any figure's
    all_pairs: pd.DataFrame | None = None  # evidence and same-network controls
    controls: dict = field(default_factory=dict)  # frames.control_summary
    table2_acc: pd.DataFrame | None = None
    settings: pd.DataFrame | None = None  # evidence with seeds averaged: the unit of evidence
    noise: pd.DataFrame | None = None  # stats.seed_noise
    seed_pairs: pd.DataFrame | None = None  # stats.seed_pairs of the two architectures
    margin: float | str = DEFAULT_MARGIN  # a delta, or "seed"
    margin_from: str = "default"  # "--margin", "spec [analysis]", "plan (...)" or "default"
    alpha: float = ALPHA
    plan: dict | None = None  # the saved analysis plan (study.analysis_plan), None if none
    exploratory: str = ""  # why the verdicts are exploratory ("" when they follow the plan)
    power: pd.DataFrame | None = None  # analysis.study_power: each primary row's power
    wanted: set[str] = field(default_factory=lambda: set(FIGURES))  # figures to draw
    curves: CurveInput | None = None  # None: the learning curves are skipped (see notes)
    lesions: pd.DataFrame | None = None  # DIR/lesions/lesions.parquet, when there is one
    # stem -> what reading that figure's input found (kept for its place among the notes)
    figure_notes: dict[str, list[str]] = field(default_factory=dict)


def _saved_analysis(root: Path) -> dict:
    try:
        return parse_spec(StoreReader(root).spec_path.read_text()).analysis
    except (OSError, UnicodeDecodeError, SpecError):
        return {}  # no readable spec: the report says so under Progress


def study_margin(root: Path, margin=None) -> tuple[float | str, str]:
    """The margin to judge with, and where it came from: `margin` if given (--margin), else the
    saved spec's [analysis] margin, else DEFAULT_MARGIN."""
    if margin is not None:
        return parse_margin(margin, "--margin"), "--margin"
    saved = _saved_analysis(root).get("margin")
    if saved is not None:
        return saved, "spec [analysis]"
    return DEFAULT_MARGIN, "default"


def judgement(root: Path, margin=None) -> dict:
    """How this analysis judges, against the saved analysis plan: the margin (a number, "seed",
    or the plan's pilot margins as a {(dataset, q_bin, loss): delta} table), where it came
    from, alpha, the plan, and why the verdicts are exploratory ("" when they are not)."""
    spec = _saved_analysis(root)
    used, source = study_margin(root, margin)
    alpha = spec.get("alpha", ALPHA)
    plan = analysis_plan.read_plan(root)
    force = analysis_plan.in_force(plan) if plan else None
    why = ""
    if used == SEED_MARGIN and source != "--margin" and spec.get("pilot") and force \
            and force.get("pilot") == spec.get("pilot") and analysis_plan.margin_table(force):
        used, source = analysis_plan.margin_table(force), "plan (pilot seed noise)"
    if used == SEED_MARGIN:
        why = "exploratory (margin from the same data)"
    if plan is not None:
        if not plan.get("before_data", True):
            why = why or "exploratory (plan recorded after data)"
        changed_after = [c for c in plan.get("changes", []) if c.get("after_data")
                         and c.get("source") == "spec [analysis]"]
        planned_margin = force.get("margin")
        if changed_after or (source == "--margin" and used != planned_margin) \
                or alpha != force.get("alpha", ALPHA):
            why = "exploratory (plan changed after data)"
    return {"margin": used, "margin_from": source, "alpha": alpha, "plan": plan,
            "exploratory": why}


def analyse(root: str | Path, compare=("sequential", "parallel"),
            pairs: Iterable[str] | None = None, only: Iterable[str] | None = None,
            margin=None) -> Analysis:
    """Load the store and compute pairs / settings / Table 2 / seed noise / statistics, and
    the inputs of the figures to draw (all, or the stems in `only`). `pairs`: pair keys for
    the learning curves. `margin`: the equivalence margin (a positive number or "seed"),
    default the spec's [analysis] margin or DEFAULT_MARGIN."""
    root = check_store(root)
    if isinstance(compare, str) or len(compare) != 2:
        raise AnalysisError(f"compare takes two architectures (a, b), got {compare!r}")
    a, b = compare
    check_compare(a, b)
    judged = judgement(root, margin)
    report = ReadReport()
    res = _compute(root, a, b, judged["margin"], report, judged["alpha"])
    res.margin_from, res.plan, res.exploratory = (judged["margin_from"], judged["plan"],
                                                  judged["exploratory"])
    res.stats = res.stats.assign(exploratory=res.exploratory)
    res.notes = _store_notes(res, report)
    res.power = guarded("power", res.notes, lambda: study_power(res))
    res.stats = with_power(res.stats, res.power)
    res.wanted = _wanted(only)
    if "learning_curves" in res.wanted:
        notes = res.figure_notes.setdefault("learning_curves", [])
        res.curves = guarded("learning_curves", notes,
                             lambda: _curve_input(root, res.pairs, pairs, notes))
    if "lesions" in res.wanted and (root / LESIONS_TABLE).is_file():  # else no figure, no note
        res.lesions = guarded("lesions", res.figure_notes.setdefault("lesions", []),
                              lambda: read_lesions(root))
    return res


def _compute(root: Path, a: str, b: str, margin, report: ReadReport,
             alpha: float = ALPHA) -> Analysis:
    df = frames.load(root, report)
    times = frames.train_time(root, report=report)
    if len(times):  # epochs that recorded their training pass: the speed half of the claim
        # a fused cell's time is its group's: only cells trained one per trial count
        df = df.assign(train_s_per_epoch=df["cell_id"].map(times).where(~fused(df)))
    all_pairs = frames.pairs(df, a, b)
    # Same-network pairs are controls, not evidence: out of every statistic and pair figure.
    pairs_df = frames.evidence(all_pairs)
    settings_df = frames.settings(pairs_df)  # seeds of a setting averaged: n counts settings
    both = df[df["architecture"].isin([a, b])]
    noise = seed_noise(both)
    return Analysis(root=root, a=a, b=b, trials=df, pairs=pairs_df, table2=frames.table2(df),
                    stats=stats(settings_df, margin=margin, noise=noise, alpha=alpha),
                    bad_parts=list(report.bad_parts), all_pairs=all_pairs,
                    controls=frames.control_summary(all_pairs),
                    table2_acc=frames.table2(df, ("train_acc", "val_acc")),
                    settings=settings_df, noise=noise, seed_pairs=seed_pairs(both),
                    margin=margin, alpha=alpha)


def _store_notes(res: Analysis, report: ReadReport) -> list[str]:
    """What the report and NOTES.txt say about the store before any figure: a broken
    same-network control, unreadable parts, an architecture with no finished cell."""
    notes = []
    ctl = res.controls
    if ctl["n"] and ctl["identical"] < ctl["n"]:
        notes.append(f"{ctl['n'] - ctl['identical']} of {ctl['n']} same-network {res.a}/{res.b} "
                     "pairs differ although both sides are one network: the pairing or the run "
                     "is broken (pairs " + ", ".join(k[:8] for k in ctl["differing"][:5]) + ")")
    notes += [f"unreadable part skipped (left in place): {x}" for x in report.bad_parts]
    ok = res.trials[res.trials["status"] == "ok"]
    for arch in (res.a, res.b):
        if not (ok["architecture"] == arch).any():
            notes.append(f"no finished (status ok) {arch} cell in the store")
    return notes


def _wanted(only) -> set[str]:
    wanted = set(FIGURES) if only is None else {only} if isinstance(only, str) else set(only)
    unknown = wanted - set(FIGURES)
    if unknown:
        raise AnalysisError(f"unknown figure {sorted(unknown)[0]!r}; figures: "
                            + ", ".join(FIGURES))
    return wanted


def _curve_input(root: Path, pairs_df: pd.DataFrame, keys, notes: list[str]) -> CurveInput:
    """The pairs named by `keys`, else those with the largest, smallest and median
    validation-loss ratio, with their epoch rows."""
    if pairs_df.empty:
        raise NothingToPlot("no complete pairs (both twins finished with status ok)")
    if keys:
        rows, unknown = frames.resolve_pair_keys(pairs_df, keys)
        if unknown:
            notes.append("learning_curves: no complete pair with key " + ", ".join(unknown))
        if not rows:
            raise NothingToPlot("none of the requested pair keys names a complete pair")
    else:
        rows = frames.choose_curve_pairs(pairs_df,
                                         StoreReader.part_ids(StoreReader(root).epochs_dir, live=True))
        if not rows:
            raise NothingToPlot("no complete pair has epoch records for both twins")
    chosen = pairs_df.loc[rows]
    report = ReadReport()
    ep = frames.load_epochs(root, list(chosen["cell_id_a"]) + list(chosen["cell_id_b"]), report)
    notes += [f"learning_curves: unreadable part skipped: {x}" for x in report.bad_parts]
    return CurveInput(rows, ep)


def read_lesions(root: Path) -> pd.DataFrame:
    return pd.read_parquet(root / LESIONS_TABLE)
