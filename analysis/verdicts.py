"""The verdicts: Lakens' four outcomes of the equivalence test, the Holm families they are
adjusted in, and each row's interval at the level its verdict used.

Two families (so the headline does not pay for the breakdown): the headline rows, one per
dataset x loss over all Q bins (the paper's claim), are the primary family, Holm-adjusted among
themselves; the by-bin rows are a secondary family per dataset x loss. The interval at the
verdict's level is the family's Bonferroni interval, 1 - 2 alpha / m: it lies inside the margin
exactly when the TOST at alpha / m rejects. Holm, step-down, can decide a row that Bonferroni
does not; such rows are marked (`holm_only`).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as _sp
from statsmodels.stats.multitest import multipletests

ALPHA = 0.05  # the verdicts' level, on Holm-adjusted p-values (the spec's [analysis] alpha)
# The two families of the Holm adjustment: the headline rows (each dataset x loss over all Q
# bins: the paper's claim) among themselves, and the by-bin rows within each dataset x loss, so
# the headline does not pay for the breakdown.
PRIMARY, SECONDARY = "primary", "secondary"
MIN_SETTINGS = 3  # fewer settings get no verdict
VERDICTS = ("equivalent", "equivalent but different", "different", "inconclusive")
NO_VERDICT = "too few settings"


def holm(p) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values (NaNs stay NaN and do not count as tests)."""
    p = np.asarray(p, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], method="holm")[1]
    return out


def _no_spread(d: np.ndarray) -> bool:
    """All values equal up to rounding (log(0.9 x) - log(x) differs in the last bits)."""
    return bool(np.ptp(d) <= 1e-12 * max(1.0, float(np.max(np.abs(d)))))


def _t_interval(d: np.ndarray, level: float) -> tuple[float, float]:
    if d.size < 2:
        return np.nan, np.nan
    if _no_spread(d):
        return float(d[0]), float(d[0])
    ci = _sp.ttest_1samp(d, 0.0).confidence_interval(level)
    return float(ci.low), float(ci.high)


def verdict(p_tost_holm: float, p_ttest_holm: float, n: int, alpha: float = ALPHA) -> str:
    """Lakens' four outcomes on the adjusted p-values at alpha (NO_VERDICT below MIN_SETTINGS)."""
    if n < MIN_SETTINGS or not (np.isfinite(p_tost_holm) and np.isfinite(p_ttest_holm)):
        return NO_VERDICT
    eq, diff = p_tost_holm < alpha, p_ttest_holm < alpha
    return VERDICTS[0 if eq and not diff else 1 if eq else 2 if diff else 3]


def family_keys(df: pd.DataFrame) -> pd.Series:
    """The Holm family of each row: one primary family of the headline rows (q_bin "all"),
    and one secondary family per dataset x loss of its by-bin rows."""
    primary = df["q_bin"].astype(object) == "all"
    return pd.Series(np.where(primary, PRIMARY,
                              SECONDARY + ":" + df["dataset"].astype(str) + ":"
                              + df["metric"].astype(str)), index=df.index)


def adjust_families(out: pd.DataFrame, logs: list[np.ndarray], alpha: float = ALPHA) -> pd.DataFrame:
    """Holm within each family (family_keys), the verdicts on the adjusted p-values, and the
    interval at the verdict's level with the Bonferroni verdict beside it. `logs`: each row's
    settings' mean log ratios (for the interval)."""
    keys = family_keys(out)
    out["family"] = np.where(keys == PRIMARY, PRIMARY, SECONDARY)
    for col in ("p_tost", "p_ttest", "wilcoxon_p"):
        out[col + "_holm"] = np.nan
    out["family_size"] = 0
    for key, idx in out.groupby(keys, sort=False).groups.items():
        for col in ("p_tost", "p_ttest", "wilcoxon_p"):
            out.loc[idx, col + "_holm"] = holm(out.loc[idx, col].to_numpy())
        out.loc[idx, "family_size"] = int(np.isfinite(out.loc[idx, "p_tost"]).sum())
    out["verdict"] = [verdict(pt, pd_, n, alpha) for pt, pd_, n in
                      zip(out["p_tost_holm"], out["p_ttest_holm"], out["n"])]
    m = out["family_size"].clip(lower=1).to_numpy(float)
    out["verdict_bonferroni"] = [
        verdict(min(1.0, pt * k), min(1.0, pd_ * k), n, alpha)
        for pt, pd_, n, k in zip(out["p_tost"], out["p_ttest"], out["n"], m)]
    out["holm_only"] = (out["verdict"] != out["verdict_bonferroni"]).to_numpy()
    out["ci_family_level"] = 1 - 2 * alpha / m
    lo, hi = zip(*(_t_interval(d[np.isfinite(d)], lvl) if np.isfinite(lvl) else (np.nan, np.nan)
                   for d, lvl in zip(logs, out["ci_family_level"])))
    out["ratio_ci_family_low"], out["ratio_ci_family_high"] = np.exp(lo), np.exp(hi)
    return out


