"""One look of a group-sequential study: each primary row's information fraction, boundary
and decision, from the store as it stands (statistics only; study.sequential_run drives it).

At look k of K (seeds_k seeds per setting; the last planned look has seeds_K):
* t_k = I_k / I_K with I = n / (sigma2_between + sigma2_within / seeds), both components
  estimated now (analysis.variance); the last planned look is t = 1. Without two seeds the
  within part cannot be estimated and t_k falls back to seeds_k / seeds_K (at most the true
  fraction: a stricter boundary).
* Each primary row (dataset x loss over all Q bins) gets alpha / m, Bonferroni over the m
  tested primary rows (valid under any spending), spent by Lan-DeMets O'Brien-Fleming over its
  own fractions so far (analysis.sequential). Its TOST p-value (the larger of the two
  one-sided tests, each of which spends alpha / m) is compared with the look's nominal level.
* Stopping for difference is not allowed: before the last look a row is either *equivalent*
  (it stops there) or *undecided*; the two-sided t-test is judged once, at the last look,
  where every row gets Lakens' verdict at its nominal level (TOST) and alpha / m (t-test).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from study.sequential_run import EQUIVALENT, UNDECIDED, row_key

from .compute import judgement
from .frames import load, pairs
from .sequential import boundaries, information_fraction, round_fractions
from .stats import seed_noise, stats
from .variance import variance_components
from .verdicts import MIN_SETTINGS, NO_VERDICT, VERDICTS

assert EQUIVALENT == VERDICTS[0]


def _fraction(n: int, sb: float, sw: float, seeds: int, seeds_last: int, last: bool) -> float:
    if last:
        return 1.0
    if not np.isfinite(sw):
        return seeds / seeds_last
    return float(information_fraction(n, sb if np.isfinite(sb) else 0.0, sw, seeds, seeds_last))


def primary_look(root: str | Path, seeds: int, seeds_last: int, last: bool,
                 history: dict[str, list[float]], decided: dict[str, dict],
                 compare=("sequential", "parallel")) -> list[dict]:
    """Each primary row at this look: n, the variance components, the information fraction,
    the boundary (z) and nominal level, the TOST and t-test p-values and the decision.
    `history`: each row's fractions at the earlier looks; `decided`: rows already stopped as
    equivalent at an earlier look (kept as they were: no row is tested after it stopped)."""
    root = Path(root)
    plan = judgement(root)
    alpha = float(plan["alpha"])
    df = load(root)
    p = pairs(df, *compare)
    table = stats(p, margin=plan["margin"], noise=seed_noise(df), alpha=alpha)
    primary = table[(table["q_bin"].astype(object) == "all")
                    & table["metric"].isin(["train_loss", "val_loss"])]
    var = variance_components(p)
    var = var[var["q_bin"] == "all"].set_index(["dataset", "metric"])
    tested = primary[(primary["n"] >= MIN_SETTINGS) & np.isfinite(primary["p_tost"])]
    m = max(1, len(tested))
    rows = []
    for _, r in primary.iterrows():
        key = row_key(r["dataset"], r["metric"])
        if key in decided:
            rows.append({**decided[key], "stopped_earlier": True})
            continue
        n = int(r["n"])
        comp = var.loc[(r["dataset"], r["metric"])] if (r["dataset"], r["metric"]) in var.index \
            else None
        sb = float(comp["sigma2_between"]) if comp is not None else math.nan
        sw = float(comp["sigma2_within"]) if comp is not None else math.nan
        out = {"dataset": str(r["dataset"]), "metric": str(r["metric"]), "n": n,
               "seeds_per_setting": seeds, "sigma2_between": _num(sb), "sigma2_within": _num(sw),
               "margin": _num(r["margin"]), "alpha_row": alpha / m, "ratio": _num(r["ratio"]),
               "p_tost": _num(r["p_tost"]), "p_ttest": _num(r["p_ttest"])}
        if n < MIN_SETTINGS or not np.isfinite(r["p_tost"]):
            rows.append({**out, "information_fraction": None, "boundary_z": None,
                         "nominal_p": None, "decision": NO_VERDICT})
            continue
        t = _fraction(n, sb, sw, seeds, seeds_last, last)
        fractions = round_fractions([*history.get(key, []), t])
        c = boundaries(fractions, alpha / m)[-1]
        nominal = float(0.5 * math.erfc(c / math.sqrt(2))) if math.isfinite(c) else 0.0
        eq = bool(r["p_tost"] < nominal)
        if last:
            diff = bool(r["p_ttest"] < alpha / m)
            decision = VERDICTS[0 if eq and not diff else 1 if eq else 2 if diff else 3]
        else:
            decision = EQUIVALENT if eq else UNDECIDED
        rows.append({**out, "information_fraction": fractions[-1], "boundary_z": _num(c),
                     "nominal_p": nominal, "decision": decision})
    return rows


def _num(v) -> float | None:
    """JSON-safe: NaN and infinities become None."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
