"""The power a finished study had, and its next step: for each primary (headline) row, the
power of its TOST at a true ratio of 1 and at the measured ratio, and the smallest extension
(more seeds per setting, or more settings) that gives 80 % power if the variance is as measured,
on the components' 80 % upper confidence limits (analysis.variance). Replaces the rough sqrt(n)
estimate of the settings needed.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as _sp

from .power import TARGET_POWER, paired_power, seeds_for_power, setting_variance, settings_for_power
from .variance import UPPER_LEVEL, variance_components
from .verdicts import PRIMARY

POWER_COLUMNS = ["dataset", "q_bin", "metric", "n", "seeds", "level", "sigma2_between",
                 "sigma2_between_upper", "sigma2_within", "sigma2_within_upper",
                 "var_setting_mean", "var_setting_mean_upper", "power_at_1", "power_at_ratio",
                 "seeds_needed", "settings_needed", "seeds_cannot"]


def study_power(res) -> pd.DataFrame:
    """One row per primary stats row of an Analysis (`res.stats`, `res.pairs`)."""
    s = res.stats
    if s is None or s.empty or "family" not in s.columns:
        return pd.DataFrame(columns=POWER_COLUMNS)
    comp = variance_components(res.pairs)
    rows = []
    for r in s[s["family"] == PRIMARY].itertuples(index=False):
        c = comp[(comp["dataset"] == r.dataset) & (comp["q_bin"] == r.q_bin)
                 & (comp["metric"] == r.metric)]
        if c.empty or r.n < 2 or not np.isfinite(r.margin):
            continue
        c = c.iloc[0]
        rows.append(row_power(r, c, res.alpha))
    return pd.DataFrame(rows, columns=POWER_COLUMNS)


def row_power(r, c, alpha: float) -> dict:
    """Power and the extension to 80 % of one stats row `r` with its variance components `c`."""
    level = alpha / max(int(r.family_size), 1)
    bound = math.log1p(r.margin)
    theta = math.log(r.ratio)
    seeds = max(1, int(round(c["seeds_mean"])))
    n = int(r.n)
    # the variance of a setting's mean log ratio as the verdict saw it, with its chi-square
    # upper limit (k - 1 degrees of freedom)
    v = float(c["var_setting_mean"])
    v_up = (n - 1) * v / _sp.chi2.ppf(1 - UPPER_LEVEL, n - 1) if n > 1 else np.nan
    aim = theta if abs(theta) < bound else 0.0
    out = {"dataset": r.dataset, "q_bin": r.q_bin, "metric": r.metric, "n": n, "seeds": seeds,
           "level": level, **{k: float(c[k]) for k in ("sigma2_between", "sigma2_between_upper",
                                                      "sigma2_within", "sigma2_within_upper")},
           "var_setting_mean": v, "var_setting_mean_upper": v_up,
           "power_at_1": paired_power(n, v, bound, 0.0, level),
           "power_at_ratio": paired_power(n, v, bound, theta, level),
           "seeds_needed": None, "settings_needed": None, "seeds_cannot": False}
    if abs(theta) >= bound:
        return out  # the measured ratio lies outside the margin: no extension aims at it
    if np.isfinite(c["sigma2_within_upper"]) and np.isfinite(c["sigma2_between_upper"]):
        s_up = setting_variance(c["sigma2_between_upper"], c["sigma2_within_upper"], seeds)
        out["seeds_needed"] = seeds_for_power(n, c["sigma2_between_upper"],
                                              c["sigma2_within_upper"], bound, aim, level,
                                              TARGET_POWER, seeds)
        out["seeds_cannot"] = out["seeds_needed"] is None
    else:
        s_up = v_up  # one seed per setting: only the total variance is measured
    if np.isfinite(s_up):
        out["settings_needed"] = settings_for_power(s_up, bound, aim, level, TARGET_POWER, n)
    return out


def power_of(power: pd.DataFrame | None, dataset: str, metric: str):
    """The power row of one headline (None if none)."""
    if power is None or power.empty:
        return None
    hit = power[(power["dataset"] == dataset) & (power["metric"] == metric)]
    return next(hit.itertuples(index=False)) if len(hit) else None


POWER_IN_STATS = {"power_at_1": "power_at_1", "power_at_ratio": "power_at_ratio",
                  "seeds_needed": "seeds_for_80", "settings_needed": "settings_for_80"}


def with_power(stats_df: pd.DataFrame, power: pd.DataFrame | None) -> pd.DataFrame:
    """The stats table with each primary row's power and extension to 80 % (stats.csv's
    power_at_1, power_at_ratio, seeds_for_80, settings_for_80; NaN elsewhere)."""
    if stats_df is None or stats_df.empty:
        return stats_df
    out = stats_df.copy()
    for col in POWER_IN_STATS.values():
        out[col] = np.nan
    if power is None or power.empty:
        return out
    for p in power.itertuples(index=False):
        hit = ((out["dataset"] == p.dataset) & (out["q_bin"] == p.q_bin)
               & (out["metric"] == p.metric))
        for src, col in POWER_IN_STATS.items():
            v = getattr(p, src)
            out.loc[hit, col] = np.nan if v is None else float(v)
    return out
