"""Planning a study on a pilot's variance: the power of its equivalence test before the compute.

`study plan SPEC --pilot DIR` reads an earlier study (its cells are not the planned study's),
estimates per dataset x Q bin x loss the two variance components of the log ratio b/a
(analysis.variance) and gives, for the spec's settings x seeds at the planned margin and level,
the power of the TOST (analysis.power) at a true ratio of 1 and at the pilot's ratio, and the
smallest extensions (more seeds per setting, or more settings) that reach 80 % power, computed
on the components' 80 % upper confidence limits. Each row is tested at alpha / m, Bonferroni
within its Holm family (analysis.verdicts), which Holm's adjustment can only beat.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sweep.spec import DEFAULT_MARGIN, SEED_MARGIN

from ._common import PRETTY, Q_LABELS, AnalysisError, check_store
from .power import TARGET_POWER, paired_power, seeds_for_power, setting_variance, settings_for_power
from .variance import variance_components


class PilotError(AnalysisError):
    """A pilot that cannot plan (one seed per setting, no pairs): one line."""


def read_pilot(pilot: str | Path, a: str = "sequential", b: str = "parallel"):
    """(trials, evidence pairs) of a pilot study."""
    from .frames import evidence, load, pairs

    root = check_store(pilot)
    df = load(root)
    return df, evidence(pairs(df, a, b))


def pilot_components(pilot: str | Path, a: str = "sequential", b: str = "parallel") -> pd.DataFrame:
    """The pilot's variance components; PilotError where they cannot be estimated."""
    _, p = read_pilot(pilot, a, b)
    if p.empty:
        raise PilotError(f"pilot {pilot} has no finished {a}/{b} pairs of two different "
                         "networks: nothing to estimate the variance from")
    comp = variance_components(p)
    if not (comp["df_within"] > 0).any():
        raise PilotError(f"pilot {pilot} has one seed per setting: seed noise (sigma2_within) "
                         "cannot be estimated from it; run the pilot with two seeds per setting "
                         "(seed = [0, 1] in [grid], other seeds than the planned study's)")
    return comp


def pilot_seed_margins(pilot: str | Path) -> list[dict]:
    """margin = "seed" resolved from a pilot: per dataset x Q bin x loss, exp(median
    seed-to-seed |log ratio|) - 1, pooled over the pilot's architectures."""
    from .frames import load
    from .stats import seed_noise

    noise = seed_noise(load(check_store(pilot)))
    if noise.empty:
        raise PilotError(f"pilot {pilot} has one seed per setting: seed noise cannot be "
                         "estimated from it, so margin = \"seed\" cannot be resolved; run the "
                         "pilot with seed = [0, 1]")
    rows = noise[(noise["architecture"] == "all") & (noise["median_abs_log_ratio"] > 0)]
    return [{"dataset": r.dataset, "q_bin": str(r.q_bin), "metric": r.metric,
             "delta": float(np.expm1(r.median_abs_log_ratio))} for r in rows.itertuples()]


@dataclass
class PlannedRow:
    dataset: str
    q_bin: str
    metric: str
    settings: int
    seeds: int
    family_size: int
    margin: float


def power_table(planned: list[PlannedRow], comp: pd.DataFrame, alpha: float,
                target: float = TARGET_POWER) -> pd.DataFrame:
    """Per planned row: the pilot's components, the power at ratio 1 and at the pilot's ratio
    (point estimates, and the 80 % upper limits), and the extensions to `target` power."""
    out = []
    for r in planned:
        hit = comp[(comp["dataset"] == r.dataset) & (comp["q_bin"] == r.q_bin)
                   & (comp["metric"] == r.metric)]
        c = hit.iloc[0] if len(hit) else None
        row = {**r.__dict__, "level": alpha / max(r.family_size, 1), "pilot": c is not None}
        if c is not None and np.isfinite(c["sigma2_within"]) and np.isfinite(c["sigma2_between"]):
            bound = math.log1p(r.margin)
            lvl = row["level"]
            theta = float(c["mean_log_ratio"])
            v = setting_variance(c["sigma2_between"], c["sigma2_within"], r.seeds)
            vu = setting_variance(c["sigma2_between_upper"], c["sigma2_within_upper"], r.seeds)
            # the extensions aim at the pilot's ratio if it lies inside the margin, else at 1
            aim = theta if abs(theta) < bound else 0.0
            seeds = seeds_for_power(r.settings, c["sigma2_between_upper"],
                                    c["sigma2_within_upper"], bound, aim, lvl, target, r.seeds)
            n_needed = settings_for_power(vu, bound, aim, lvl, target, r.settings)
            row.update({k: float(c[k]) for k in ("sigma2_between", "sigma2_between_upper",
                                                 "sigma2_within", "sigma2_within_upper")},
                       pilot_settings=int(c["n_settings"]), pilot_ratio=math.exp(theta),
                       power_1=paired_power(r.settings, v, bound, 0.0, lvl),
                       power_1_upper=paired_power(r.settings, vu, bound, 0.0, lvl),
                       power_pilot=paired_power(r.settings, v, bound, theta, lvl),
                       power_pilot_upper=paired_power(r.settings, vu, bound, theta, lvl),
                       aim_ratio=math.exp(aim), seeds_needed=seeds, settings_needed=n_needed,
                       seeds_cannot=seeds is None and abs(aim) < bound)
        out.append(row)
    return pd.DataFrame(out)


def _ext(row) -> str:
    """The smallest extensions to 80 % power, in words."""
    if not row.get("pilot") or not np.isfinite(row.get("sigma2_within", np.nan)):
        return "no estimate (the pilot has no such row)"
    if row["power_pilot_upper"] >= TARGET_POWER and row["aim_ratio"] == row["pilot_ratio"]:
        return "already 80 % at the upper limits"
    parts = []
    s = row["seeds_needed"]
    if s is not None and not (isinstance(s, float) and np.isnan(s)):
        s = int(s)
        parts.append(f"{s - row['seeds']} more seeds per setting ({s})" if s > row["seeds"]
                     else "the planned seeds")
    else:
        parts.append("seeds cannot get there (sigma2_between dominates)")
    n = row["settings_needed"]
    if n is not None and not (isinstance(n, float) and np.isnan(n)):
        n = int(n)
        parts.append(f"{n - row['settings']:,} more settings ({n:,})" if n > row["settings"]
                     else "the planned settings")
    else:
        parts.append("no number of settings gets there")
    where = ("at the pilot's ratio" if row["aim_ratio"] == row["pilot_ratio"]
             else "at ratio 1 (the pilot's ratio lies outside the margin)")
    return " or ".join(parts) + f", {where}, 80 % upper limits"


def format_power(table: pd.DataFrame, pilot: str | Path, alpha: float, margin_text: str) -> list[str]:
    lines = [f"power of the equivalence test, from pilot {pilot} (margin {margin_text}; each row at "
             f"alpha/m, alpha {alpha:g}, m = rows in its Holm family; components: one-way "
             "random-effects ANOVA with 80 % upper limits):"]
    covered = set(table.loc[table["pilot"], "dataset"]) if len(table) else set()
    for ds in dict.fromkeys(table["dataset"]) if len(table) else []:
        if ds not in covered:
            lines.append(f"  {ds}: the pilot has no {ds} settings, so no estimate (a pilot "
                         f"measures the variance of the datasets it trains: add {ds} to it)")
    for r in table.to_dict("records"):
        if r["dataset"] not in covered:
            continue
        q = "all Q" if r["q_bin"] == "all" else f"Q in {r['q_bin']}"
        head = (f"  {r['dataset']} · {PRETTY.get(r['metric'], r['metric'])} · {q}: "
                f"{r['settings']:,} settings x {r['seeds']} seeds, margin ±{100 * r['margin']:.3g} %, "
                f"level {r['level']:.3g}")
        lines.append(head)
        if not r.get("pilot") or not np.isfinite(r.get("sigma2_within", np.nan)):
            lines.append("    the pilot has no settings here (or no repeats): no estimate")
            continue
        lines.append(f"    sigma2_between {r['sigma2_between']:.3g} (80 % upper {r['sigma2_between_upper']:.3g}), "
                     f"sigma2_within {r['sigma2_within']:.3g} (80 % upper {r['sigma2_within_upper']:.3g}); "
                     f"pilot: {int(r['pilot_settings'])} settings")
        lines.append(f"    power at ratio 1: {r['power_1']:.2f} ({r['power_1_upper']:.2f} at the upper "
                     f"limits); at the pilot's ratio {r['pilot_ratio']:.3f}: {r['power_pilot']:.2f} "
                     f"({r['power_pilot_upper']:.2f})")
        lines.append(f"    80 % power: {_ext(r)}")
    return lines


def planned_margin(margin, pilot_margins: dict | None, dataset: str, q_bin: str, metric: str) -> float:
    if margin == SEED_MARGIN:
        if pilot_margins and (dataset, q_bin, metric) in pilot_margins:
            return pilot_margins[(dataset, q_bin, metric)]
        return DEFAULT_MARGIN
    return float(margin)


METRICS = ("train_loss", "val_loss")


def power_lines(settings: dict, pilot: str | Path, analysis_table: dict) -> list[str]:
    """`study plan --pilot`'s lines. `settings`: {(dataset, q_bin): {setting: seeds}} of the
    planned study (study.power_plan.planned_settings); `analysis_table`: its spec's [analysis]."""
    comp = pilot_components(pilot)
    margin = analysis_table.get("margin", DEFAULT_MARGIN)
    alpha = analysis_table.get("alpha", 0.05)
    margins = None
    if margin == SEED_MARGIN:
        margins = {(r["dataset"], r["q_bin"], r["metric"]): r["delta"]
                   for r in pilot_seed_margins(pilot)}
    datasets = list(dict.fromkeys(ds for ds, _ in settings))
    primary_m = len(datasets) * len(METRICS)
    rows = []
    for ds in datasets:
        bins = [q for q in Q_LABELS if (ds, q) in settings]
        for m in METRICS:
            for q in ("all", *bins):
                s = settings[(ds, q)]
                seeds = sorted(s.values())[len(s) // 2]  # the median setting's seeds
                rows.append(PlannedRow(ds, q, m, len(s), seeds,
                                       primary_m if q == "all" else len(bins),
                                       planned_margin(margin, margins, ds, q, m)))
    text = (f"±{100 * margin:.3g} %" if margin != SEED_MARGIN else
            "seed noise of the pilot, per row")
    return format_power(power_table(rows, comp, alpha), pilot, alpha, text)
