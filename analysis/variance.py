"""The two variance components that decide the power of the equivalence test.

A setting's log ratio at seed j is d_ij = theta + u_i + e_ij: u_i ~ N(0, sigma2_between) is how
the architecture effect varies between settings, e_ij ~ N(0, sigma2_within) how one setting's
log ratio moves from seed to seed. Twins share their seed's initial weights and batch order, so
the within component is estimated on the log ratios themselves, not from each arm's noise.

Estimated by one-way random-effects ANOVA (method of moments, unbalanced seeds allowed), each
with a one-sided upper confidence limit: sigma2_within's from its chi-square law, and
sigma2_between's by the modified large-sample method of Graybill and Wang (Burdick & Graybill
1992, "Confidence Intervals on Variance Components", eq. 3.8), which combines the chi-square
quantiles of the two mean squares. A pilot's variance is itself uncertain: planning on the
upper limits keeps that in view.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as _sp

from ._common import Q_LABELS, dataset_order
from .frames import evidence, setting_columns

UPPER_LEVEL = 0.8  # one-sided confidence of the upper limits

VARIANCE_COLUMNS = ["dataset", "q_bin", "metric", "n_settings", "n_runs", "seeds_mean",
                    "mean_log_ratio", "sigma2_between", "sigma2_between_upper", "df_between",
                    "sigma2_within", "sigma2_within_upper", "df_within", "var_setting_mean"]


def components(groups: list[np.ndarray], level: float = UPPER_LEVEL) -> dict:
    """Moment estimates of sigma2_between and sigma2_within from one array of seed log ratios
    per setting, with one-sided `level` upper confidence limits (NaN where a component cannot
    be estimated: fewer than 2 settings, or no setting with two seeds for the within part)."""
    groups = [np.asarray(g, float)[np.isfinite(g)] for g in groups]
    groups = [g for g in groups if g.size]
    k = len(groups)
    sizes = np.array([g.size for g in groups], float)
    total = float(sizes.sum())
    out = {"n_settings": k, "n_runs": int(total), "seeds_mean": total / k if k else np.nan,
           "mean_log_ratio": np.nan, "sigma2_between": np.nan, "sigma2_between_upper": np.nan,
           "df_between": max(k - 1, 0), "sigma2_within": np.nan, "sigma2_within_upper": np.nan,
           "df_within": int(total - k), "var_setting_mean": np.nan}
    if k == 0:
        return out
    means = np.array([g.mean() for g in groups])
    out["mean_log_ratio"] = float(means.mean())
    if k >= 2:
        # Var of a setting's mean log ratio at the pilot's seeds, as the verdict sees it
        out["var_setting_mean"] = float(np.var(means, ddof=1))
    df_w = total - k
    ms_w = np.nan
    if df_w > 0:
        ms_w = float(sum(((g - g.mean()) ** 2).sum() for g in groups) / df_w)
        out["sigma2_within"] = ms_w
        out["sigma2_within_upper"] = float(df_w * ms_w / _sp.chi2.ppf(1 - level, df_w))
    if k < 2 or df_w <= 0:
        return out
    grand = float((sizes * means).sum() / total)
    df_b = k - 1
    ms_b = float((sizes * (means - grand) ** 2).sum() / df_b)
    n0 = (total - (sizes ** 2).sum() / total) / df_b  # seeds per setting (unbalanced: ANOVA's n0)
    out["sigma2_between"] = max(0.0, (ms_b - ms_w) / n0)
    # Graybill-Wang upper limit of (ms_b - ms_w) / n0
    h_b = df_b / _sp.chi2.ppf(1 - level, df_b) - 1
    g_w = 1 - df_w / _sp.chi2.ppf(level, df_w)
    upper = (ms_b - ms_w + np.sqrt((h_b * ms_b) ** 2 + (g_w * ms_w) ** 2)) / n0
    out["sigma2_between_upper"] = float(max(0.0, upper))
    return out


def seed_log_ratios(pairs_df: pd.DataFrame, metric: str) -> pd.Series:
    """log(b/a) of every evidence pair (one per setting and seed), indexed by setting."""
    p = evidence(pairs_df)
    if p.empty:
        return pd.Series(dtype=float)
    keys = setting_columns(p)
    g = p.groupby(keys, dropna=False, sort=False).ngroup()
    r = pd.to_numeric(p[metric + "_ratio"], errors="coerce").astype(float)
    return pd.Series(np.log(r.where(r > 0)).to_numpy(), index=g.to_numpy())


def variance_components(pairs_df: pd.DataFrame, metrics=("train_loss", "val_loss"),
                        level: float = UPPER_LEVEL) -> pd.DataFrame:
    """Per dataset x Q bin ("all" and each) x loss: sigma2_between and sigma2_within of the log
    ratio b/a with their one-sided `level` upper limits (columns VARIANCE_COLUMNS).
    `pairs_df`: a pairs frame (frames.pairs, one row per seed)."""
    if pairs_df is None or pairs_df.empty:
        return pd.DataFrame(columns=VARIANCE_COLUMNS)
    p = evidence(pairs_df)
    qb = p["q_bin"].astype(object)
    rows = []
    for ds in dataset_order(p["dataset"]):
        for q in ("all", *Q_LABELS):
            g = p[(p["dataset"] == ds) & ((qb == q) if q != "all" else True)]
            if g.empty:
                continue
            for m in metrics:
                d = seed_log_ratios(g, m).dropna()
                parts = [v.to_numpy() for _, v in d.groupby(level=0)]
                rows.append({"dataset": ds, "q_bin": q, "metric": m,
                             **components(parts, level)})
    return pd.DataFrame(rows, columns=VARIANCE_COLUMNS)
