"""Layer 1b: statistics on a pairs frame (pure numpy / scipy / pandas)."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats as _sp

from ._common import Q_LABELS, dataset_order

Z95 = 1.959963984540054
BOOT_SEED = 20230101  # fixed: the same store always gives the same intervals
BOOT_N = 2000


def wilson_interval(k, n, z: float = Z95):
    """Wilson score interval of a binomial proportion k/n (NaN where n == 0); vectorised."""
    k = np.asarray(k, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        denom = 1 + z**2 / n
        centre = (p + z**2 / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return centre - half, centre + half


def bootstrap_median_ci(x, n_boot: int = BOOT_N, seed: int = BOOT_SEED, level: float = 0.95):
    """Percentile bootstrap interval of the median of x (NaN for an empty x)."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return np.nan, np.nan
    rng = np.random.default_rng(seed)
    meds = np.empty(n_boot)
    chunk = max(1, 2_000_000 // x.size)  # bounds memory at a few 10 MB for any n
    for s in range(0, n_boot, chunk):
        idx = rng.integers(0, x.size, size=(min(chunk, n_boot - s), x.size))
        meds[s:s + idx.shape[0]] = np.median(x[idx], axis=1)
    lo, hi = np.percentile(meds, [50 * (1 - level), 100 - 50 * (1 - level)])
    return float(lo), float(hi)


def holm(p) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (NaNs stay NaN and do not count as tests)."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    if ok.size == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    m = ok.size
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adj, 1.0)
    return out


def _wilcoxon(log_b, log_a):
    d = log_b - log_a
    if d.size == 0 or not np.any(d != 0):
        return np.nan, np.nan  # no signed differences: the test is undefined
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            r = _sp.wilcoxon(log_b, log_a, zero_method="wilcox", alternative="two-sided")
        except ValueError:
            return np.nan, np.nan
    return float(r.statistic), float(r.pvalue)


def _one(group: pd.DataFrame, metric: str) -> dict:
    a = pd.to_numeric(group[metric + "_a"], errors="coerce").to_numpy(float)
    b = pd.to_numeric(group[metric + "_b"], errors="coerce").to_numpy(float)
    both = np.isfinite(a) & np.isfinite(b)
    a, b = a[both], b[both]
    pos = (a > 0) & (b > 0)  # the log scale needs positive losses
    log_ratio = np.log(b[pos]) - np.log(a[pos])
    wins, ties, n = int(np.sum(b < a)), int(np.sum(b == a)), int(a.size)
    lo, hi = wilson_interval(wins, n)
    ci_lo, ci_hi = bootstrap_median_ci(log_ratio)
    stat, p = _wilcoxon(np.log(b[pos]), np.log(a[pos]))
    med = float(np.median(log_ratio)) if log_ratio.size else np.nan
    return {"metric": metric, "n": n,
            "mean_a": float(a.mean()) if n else np.nan, "mean_b": float(b.mean()) if n else np.nan,
            "median_ratio": float(np.exp(med)), "ratio_ci_low": float(np.exp(ci_lo)),
            "ratio_ci_high": float(np.exp(ci_hi)),
            "b_wins": wins, "ties": ties, "win_rate_b": wins / n if n else np.nan,
            "win_ci_low": float(lo), "win_ci_high": float(hi),
            "wilcoxon_stat": stat, "p_value": p}


STATS_COLUMNS = ["a", "b", "dataset", "q_bin", "metric", "n", "mean_a", "mean_b",
                 "median_ratio", "ratio_ci_low", "ratio_ci_high", "b_wins", "ties",
                 "win_rate_b", "win_ci_low", "win_ci_high", "wilcoxon_stat", "p_value", "p_holm"]


def stats(pairs_df: pd.DataFrame, metrics=("train_loss", "val_loss")) -> pd.DataFrame:
    """Paired comparison of b against a, per dataset (q_bin 'all') and per dataset x Q bin,
    over the pairs of two different networks (same-network pairs are left out).

    For each group and loss metric:
      n              pairs with both losses finite;
      mean_a/mean_b  mean losses;
      median_ratio   median of b/a, with a percentile-bootstrap 95% interval
                     (ratio_ci_low/high; fixed seed, so reproducible);
      b_wins, ties   pairs where b's loss is lower / equal;
      win_rate_b     b_wins / n, with a Wilson 95% interval (win_ci_low/high);
      wilcoxon_stat, p_value  scipy.stats.wilcoxon, two-sided, paired, on log b vs log a
                     (so a constant factor counts the same at loss 0.001 as at 2; pairs with a
                     non-positive loss are left out of the test and the ratio);
      p_holm         Holm-adjusted p_value over all rows of the table.
    """
    rows = []
    if pairs_df is not None and "same_network" in pairs_df.columns:
        # one network on both sides is a control, not a comparison (see data.controls)
        pairs_df = pairs_df[~pairs_df["same_network"].astype(bool)]
    if pairs_df is None or pairs_df.empty:
        return pd.DataFrame(columns=STATS_COLUMNS)
    a = str(pairs_df["architecture_a"].iloc[0])
    b = str(pairs_df["architecture_b"].iloc[0])
    qb = pairs_df["q_bin"].astype(object).where(pairs_df["q_bin"].notna(), None)
    for ds in dataset_order(pairs_df["dataset"]):
        in_ds = pairs_df["dataset"] == ds
        groups = [("all", pairs_df[in_ds])]
        groups += [(q, pairs_df[in_ds & (qb == q)]) for q in Q_LABELS]
        for label, g in groups:
            if g.empty:
                continue
            for m in metrics:
                rows.append({"a": a, "b": b, "dataset": ds, "q_bin": label, **_one(g, m)})
    out = pd.DataFrame(rows)
    out["p_holm"] = holm(out["p_value"].to_numpy())
    return out[STATS_COLUMNS]
