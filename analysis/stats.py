"""Layer 1b: statistics on pairs, settings and repeat groups (pure numpy / scipy / statsmodels).

The unit of evidence is a *setting*: one deep/shallow comparison at fixed layers, filters,
kernel, ... (and variant). Its seeds are repeats of that comparison, so every test below runs
on the settings' mean log ratios (``frames.settings``), never on seeds as if they were pairs.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats as _sp
from statsmodels.stats.proportion import proportion_confint
from statsmodels.stats.weightstats import ttost_paired

from study import schema
from study.trials import trained_cells
from sweep.spec import DEFAULT_MARGIN, SEED_MARGIN

from ._common import Q_LABELS, dataset_order
from .verdicts import (ALPHA, MIN_SETTINGS, NO_VERDICT, PRIMARY, SECONDARY, VERDICTS,  # noqa: F401
                       _no_spread, _t_interval, adjust_families, family_keys, holm, verdict)
from .frames import evidence
from .frames import settings as _settings

Z95 = 1.959963984540054
BOOT_SEED = 20230101  # fixed: the same store always gives the same intervals
BOOT_N = 2000
EXACT_FROM = 400  # above this many values the median's bootstrap is computed, not sampled
def wilson_interval(k, n, z: float = Z95):
    """Wilson score interval of a binomial proportion k/n (NaN where n == 0); vectorised."""
    k = np.atleast_1d(np.asarray(k, dtype=float))
    n = np.atleast_1d(np.asarray(n, dtype=float))
    k, n = np.broadcast_arrays(k, n)
    lo, hi = np.full(k.shape, np.nan), np.full(k.shape, np.nan)
    ok = n > 0
    if ok.any():
        alpha = 2 * _sp.norm.sf(z)
        lo[ok], hi[ok] = proportion_confint(k[ok], n[ok], alpha=alpha, method="wilson")
    if lo.size == 1:
        return float(lo[0]), float(hi[0])
    return lo, hi


def _median_quantiles_exact(x: np.ndarray, qs) -> list[float]:
    """Quantiles of the bootstrap distribution of the median of x, computed exactly from the
    order statistics (no resampling): the k-th order statistic of a resample of n is at most
    x_(i) with probability P(Binomial(n, i/n) >= k). For even n (median = mean of the two
    middle order statistics) the quantile is the mean of those two statistics' quantiles,
    which matches resampling within its Monte-Carlo error (tests/test_analysis.py)."""
    s = np.sort(x)
    n = s.size
    # The resampled median's order statistic lies within a few sqrt(n) of the middle: only
    # that window is evaluated (checked below, the whole range otherwise).
    half = int(8 * np.sqrt(n)) + 2
    window = np.arange(max(1, n // 2 - half), min(n, n // 2 + half) + 1)
    out = np.zeros(len(qs))
    ks = [(n + 1) // 2] if n % 2 else [n // 2, n // 2 + 1]
    for k in ks:
        i = window
        cdf = _sp.binom.sf(k - 1, n, i / n)  # P(k-th smallest of a resample <= s[i-1])
        if cdf[0] > min(qs) or cdf[-1] < max(qs):
            i = np.arange(1, n + 1)
            cdf = _sp.binom.sf(k - 1, n, i / n)
        for j, q in enumerate(qs):
            pos = min(int(np.searchsorted(cdf, q, side="left")), len(i) - 1)
            out[j] += s[i[pos] - 1] / len(ks)
    return [float(v) for v in out]


def bootstrap_median_ci(x, n_boot: int = BOOT_N, seed: int = BOOT_SEED, level: float = 0.95):
    """Percentile bootstrap interval of the median of x (NaN for an empty x).

    Up to EXACT_FROM (400) values: `n_boot` resamples with a fixed seed (reproducible). Above
    it the bootstrap distribution of the median is computed exactly from the order
    statistics, which is what infinitely many resamples would give, in milliseconds for
    50,000 values."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return np.nan, np.nan
    qs = (0.5 * (1 - level), 1 - 0.5 * (1 - level))
    if x.size > EXACT_FROM:
        lo, hi = _median_quantiles_exact(x, qs)
        return lo, hi
    rng = np.random.default_rng(seed)
    meds = np.empty(n_boot)
    chunk = max(1, 2_000_000 // x.size)  # bounds memory at a few 10 MB for any n
    for s in range(0, n_boot, chunk):
        idx = rng.integers(0, x.size, size=(min(chunk, n_boot - s), x.size))
        meds[s:s + idx.shape[0]] = np.median(x[idx], axis=1)
    lo, hi = np.percentile(meds, [100 * qs[0], 100 * qs[1]])
    return float(lo), float(hi)


def _wilcoxon(d: np.ndarray):
    if d.size == 0 or not np.any(d != 0):
        return np.nan, np.nan  # no signed differences: the test is undefined
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            r = _sp.wilcoxon(d, zero_method="wilcox", alternative="two-sided")
        except ValueError:
            return np.nan, np.nan
    return float(r.statistic), float(r.pvalue)


# -- seed noise ------------------------------------------------------------------------------
def seed_pairs(df: pd.DataFrame, metrics=("train_loss", "val_loss")) -> pd.DataFrame:
    """Every pair of seeds within a repeat group: cells with status ok that differ only in
    `seed` (same architecture and everything else), one row per pair and metric with
    |log(loss_i / loss_j)|. Rows recorded as a copy of another network (`same_network_as`)
    are not repeats and stay out. Columns: dataset, q_bin, architecture, metric, group,
    abs_log_ratio."""
    cols = ["dataset", "q_bin", "architecture", "metric", "group", "abs_log_ratio"]
    if df is None or df.empty or "seed" not in df.columns:
        return pd.DataFrame(columns=cols)
    ok = trained_cells(df[df["status"] == "ok"])
    keys = [c for c in schema.PARAM_COLUMNS if c != "seed" and c in ok.columns]
    if ok.empty:
        return pd.DataFrame(columns=cols)
    ok = ok.assign(group=ok.groupby(keys, dropna=False, sort=False).ngroup())
    multi = ok["group"].map(ok["group"].value_counts()) > 1
    ok = ok[multi]
    out = []
    for m in metrics:
        v = pd.to_numeric(ok[m], errors="coerce")
        side = ok.assign(_log=np.log(v.where(v > 0)))[
            ["group", "seed", "dataset", "q_bin", "architecture", "_log"]].dropna(subset=["_log"])
        both = side.merge(side[["group", "seed", "_log"]], on="group", suffixes=("", "_j"))
        both = both[both["seed"] < both["seed_j"]]
        out.append(pd.DataFrame({"dataset": both["dataset"], "q_bin": both["q_bin"].astype(object),
                                 "architecture": both["architecture"], "metric": m,
                                 "group": both["group"],
                                 "abs_log_ratio": (both["_log"] - both["_log_j"]).abs()}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=cols)


SEED_NOISE_COLUMNS = ["dataset", "q_bin", "architecture", "metric", "n_groups", "n_seed_pairs",
                      "median_abs_log_ratio", "p90_abs_log_ratio", "median_ratio", "p90_ratio"]


def seed_noise(df: pd.DataFrame, metrics=("train_loss", "val_loss")) -> pd.DataFrame:
    """How much the loss moves when the same network is trained again with another seed.

    Per dataset x Q bin ("all" and each bin) x architecture (each, and "all": pooled over the
    architectures) x metric: n_groups (repeat groups: cells differing only in seed), n_seed_pairs
    (pairs of seeds within a group), the median and 90th percentile of |log loss ratio| between
    two seeds of one network, and the same as ratios (exp of those). Empty when no setting has
    two seeds."""
    sp = seed_pairs(df, metrics)
    if sp.empty:
        return pd.DataFrame(columns=SEED_NOISE_COLUMNS)
    sp = sp.assign(q_bin=sp["q_bin"].astype(object))
    # every pair also counts in its dataset's "all" bin and in the pooled "all" architecture
    parts = [sp, sp.assign(q_bin="all")]
    parts += [x.assign(architecture="all") for x in list(parts)]
    every = pd.concat(parts, ignore_index=True).dropna(subset=["q_bin"])
    g = every.groupby(["dataset", "q_bin", "architecture", "metric"], sort=False)["abs_log_ratio"]
    out = pd.DataFrame({"n_groups": every.groupby(["dataset", "q_bin", "architecture", "metric"],
                                                  sort=False)["group"].nunique(),
                        "n_seed_pairs": g.size(), "median_abs_log_ratio": g.median(),
                        "p90_abs_log_ratio": g.quantile(0.9)}).reset_index()
    out["median_ratio"] = np.exp(out["median_abs_log_ratio"])
    out["p90_ratio"] = np.exp(out["p90_abs_log_ratio"])
    # dataset, then "all" and the bins, then "all" and each architecture, then the metrics
    rank = {"dataset": {d: i for i, d in enumerate(dataset_order(out["dataset"]))},
            "q_bin": {q: i for i, q in enumerate(("all", *Q_LABELS))},
            "architecture": {a: i for i, a in enumerate(("all", *dict.fromkeys(sp["architecture"])))},
            "metric": {m: i for i, m in enumerate(metrics)}}
    out = out.sort_values(list(rank), key=lambda c: c.map(rank[c.name]), kind="stable")
    return out[SEED_NOISE_COLUMNS].reset_index(drop=True)


def noise_of(noise: pd.DataFrame | None, dataset: str, q_bin: str, metric: str,
             architecture: str = "all") -> float:
    """The median seed-to-seed |log ratio| of one row of a seed_noise table (NaN if none)."""
    if noise is None or noise.empty:
        return np.nan
    hit = noise[(noise["dataset"] == dataset) & (noise["q_bin"] == q_bin)
                & (noise["metric"] == metric) & (noise["architecture"] == architecture)]
    return float(hit["median_abs_log_ratio"].iloc[0]) if len(hit) else np.nan


def resolve_margin(margin, noise, dataset: str, q_bin: str, metric: str) -> tuple[float, str]:
    """(delta, where it came from) for one row of the equivalence table.

    A number is used as given. "seed" takes delta = exp(median seed-to-seed |log ratio|) - 1 of
    that dataset, bin and metric, pooled over the architectures: the change in loss that
    re-training one network with another seed exceeds half the time. Without repeats there it
    falls back to DEFAULT_MARGIN. A dict {(dataset, q_bin, metric): delta} holds the margins
    an analysis plan resolved from a pilot's seed noise (rows it lacks fall back likewise)."""
    if isinstance(margin, dict):
        if (dataset, q_bin, metric) in margin:
            return float(margin[(dataset, q_bin, metric)]), "pilot seed noise"
        return DEFAULT_MARGIN, "default (not in the plan's pilot)"
    if margin != SEED_MARGIN:
        return float(margin), "given"
    med = noise_of(noise, dataset, q_bin, metric)
    if np.isfinite(med) and med > 0:
        return float(np.expm1(med)), "seed noise"
    return DEFAULT_MARGIN, "default (no seed repeats)"


# -- the equivalence test --------------------------------------------------------------------
def _tests(d: np.ndarray, bound: float) -> dict:
    """TOST against +-bound and the two-sided paired t-test on settings' mean log ratios d
    (= log b - log a averaged over seeds). With zero spread the t statistics are infinite:
    the p-values are then their limits (0 or 1)."""
    n = d.size
    out = {"p_lower": np.nan, "p_upper": np.nan, "p_tost": np.nan, "t_stat": np.nan,
           "p_ttest": np.nan}
    if n < 2:
        return out
    if _no_spread(d):
        mean = float(np.mean(d))
        out.update(p_lower=0.0 if mean > -bound else 1.0, p_upper=0.0 if mean < bound else 1.0,
                   t_stat=np.inf * np.sign(mean) if mean else 0.0,
                   p_ttest=0.0 if mean else 1.0)
        out["p_tost"] = max(out["p_lower"], out["p_upper"])
        return out
    zeros = np.zeros_like(d)
    p_tost, (_, p_lo, _), (_, p_hi, _) = ttost_paired(d, zeros, -bound, bound)
    t = _sp.ttest_rel(d, zeros)
    out.update(p_lower=float(p_lo), p_upper=float(p_hi), p_tost=float(p_tost),
               t_stat=float(t.statistic), p_ttest=float(t.pvalue))
    return out


STATS_COLUMNS = [
    "a", "b", "dataset", "q_bin", "metric", "n", "n_runs", "mean_a", "mean_b",
    # the settings' mean log ratio b/a, as a ratio, with t intervals
    "ratio", "ratio_ci90_low", "ratio_ci90_high", "ratio_ci95_low", "ratio_ci95_high",
    "margin", "margin_source", "p_lower", "p_upper", "p_tost", "p_tost_holm",
    "t_stat", "p_ttest", "p_ttest_holm", "verdict",
    # the Holm family of the row, its size m, and the interval at the verdict's level: the
    # Bonferroni interval of the family, 1 - 2 alpha / m, with the verdict Bonferroni gives
    # (where it differs from Holm's, `holm_only` marks the row)
    "family", "family_size", "ci_family_level", "ratio_ci_family_low", "ratio_ci_family_high",
    "verdict_bonferroni", "holm_only",
    # rank-based counterparts (they do not decide the verdict)
    "median_ratio", "ratio_ci_low", "ratio_ci_high", "b_wins", "ties", "win_rate_b",
    "win_ci_low", "win_ci_high", "wilcoxon_stat", "wilcoxon_p", "wilcoxon_p_holm"]


def _one(g: pd.DataFrame, metric: str, delta: float) -> dict:
    a = pd.to_numeric(g[metric + "_a"], errors="coerce").to_numpy(float)
    b = pd.to_numeric(g[metric + "_b"], errors="coerce").to_numpy(float)
    d = pd.to_numeric(g[metric + "_log_ratio"], errors="coerce").to_numpy(float)
    runs = pd.to_numeric(g["n_seeds"], errors="coerce").to_numpy(float)
    keep = np.isfinite(a) & np.isfinite(b) & np.isfinite(d)
    a, b, d, runs = a[keep], b[keep], d[keep], runs[keep]
    n = int(d.size)
    wins, ties = int(np.sum(d < 0)), int(np.sum(d == 0))
    wlo, whi = wilson_interval(wins, n)
    mlo, mhi = bootstrap_median_ci(d)
    w_stat, w_p = _wilcoxon(d)
    lo90, hi90 = _t_interval(d, 0.90)
    lo95, hi95 = _t_interval(d, 0.95)
    bound = float(np.log1p(delta))
    return {"metric": metric, "n": n, "n_runs": int(runs.sum()),
            "mean_a": float(a.mean()) if n else np.nan, "mean_b": float(b.mean()) if n else np.nan,
            "ratio": float(np.exp(d.mean())) if n else np.nan,
            "ratio_ci90_low": float(np.exp(lo90)), "ratio_ci90_high": float(np.exp(hi90)),
            "ratio_ci95_low": float(np.exp(lo95)), "ratio_ci95_high": float(np.exp(hi95)),
            "margin": float(delta), **_tests(d, bound),
            "median_ratio": float(np.exp(np.median(d))) if n else np.nan,
            "ratio_ci_low": float(np.exp(mlo)), "ratio_ci_high": float(np.exp(mhi)),
            "b_wins": wins, "ties": ties, "win_rate_b": wins / n if n else np.nan,
            "win_ci_low": float(wlo), "win_ci_high": float(whi),
            "wilcoxon_stat": w_stat, "wilcoxon_p": w_p}


def stats(pairs_df: pd.DataFrame, metrics=("train_loss", "val_loss"), margin=DEFAULT_MARGIN,
          noise: pd.DataFrame | None = None, alpha: float = ALPHA) -> pd.DataFrame:
    """Paired comparison of b against a, per dataset (q_bin 'all') and per dataset x Q bin, over
    the settings of two different networks (same-network pairs are left out; the seeds of a
    setting are averaged first, so n counts settings and n_runs the seeds behind them).

    `pairs_df`: a pairs frame (frames.pairs) or a settings frame (frames.settings). `margin`: the
    relative margin delta (the ratio b/a counts as "the same" inside [1/(1+delta), 1+delta]),
    or "seed" to take it from `noise` (a seed_noise table) per dataset, bin and metric.

    For each group and loss metric, on the settings' mean log ratios d = log(b/a):
      ratio           exp(mean d), with t intervals at 90% (ratio_ci90_*) and 95% (ratio_ci95_*);
      margin, margin_source  delta used and where it came from;
      p_lower, p_upper, p_tost  two one-sided t-tests (statsmodels ttost_paired) against
                      -log(1+delta) and +log(1+delta), and their max; p_tost_holm Holm-adjusted
                      within the row's family: "primary" (the rows over all Q bins, one per
                      dataset x loss, among themselves) or "secondary" (the by-bin rows of
                      one dataset x loss);
      t_stat, p_ttest the ordinary two-sided paired t-test (scipy ttest_rel); p_ttest_holm;
      verdict         Lakens' four outcomes at alpha on the adjusted p-values: equivalent (TOST
                      significant, t-test not), equivalent but different (both), different
                      (t-test only), inconclusive (neither); "too few settings" below 3;
      family, family_size  the Holm family and its number of tested rows m;
      ci_family_level, ratio_ci_family_*  the Bonferroni interval of the family, at level
                      1 - 2 alpha / m: inside the margin exactly when the TOST at alpha / m is;
      verdict_bonferroni, holm_only  the verdict with Bonferroni instead of Holm, and whether
                      the two differ (Holm, step-down, can decide where the interval does not);
      median_ratio    exp(median d) with a percentile-bootstrap 95% interval (ratio_ci_*);
      b_wins, ties, win_rate_b  settings where b's loss is lower / equal, Wilson 95% interval;
      wilcoxon_stat, wilcoxon_p, wilcoxon_p_holm  scipy.stats.wilcoxon on d (rank-based
                      counterpart; it does not decide the verdict).
    """
    if pairs_df is None or pairs_df.empty:
        return pd.DataFrame(columns=STATS_COLUMNS)
    sdf = pairs_df if "n_seeds" in pairs_df.columns else _settings(pairs_df)
    if sdf.empty:
        return pd.DataFrame(columns=STATS_COLUMNS)
    a, b = str(sdf["architecture_a"].iloc[0]), str(sdf["architecture_b"].iloc[0])
    qb = sdf["q_bin"].astype(object).where(sdf["q_bin"].notna(), None)
    rows, logs = [], []
    for ds in dataset_order(sdf["dataset"]):
        in_ds = sdf["dataset"] == ds
        groups = [("all", sdf[in_ds])] + [(q, sdf[in_ds & (qb == q)]) for q in Q_LABELS]
        for label, g in groups:
            if g.empty:
                continue
            for m in metrics:
                delta, source = resolve_margin(margin, noise, ds, label, m)
                rows.append({"a": a, "b": b, "dataset": ds, "q_bin": label,
                             **_one(g, m, delta), "margin_source": source})
                logs.append(pd.to_numeric(g[m + "_log_ratio"], errors="coerce").to_numpy(float))
    out = adjust_families(pd.DataFrame(rows), logs, alpha)
    # Training time: rows of their own, outside the verdicts and the Holm families.
    times = time_rows(sdf, a, b)
    if len(times):
        out = pd.concat([out.astype(object), times.astype(object)], ignore_index=True)
        out = out.infer_objects()
    return out.reindex(columns=STATS_COLUMNS)


TIME_METRIC = "train_s_per_epoch"


def time_rows(sdf: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Per dataset and dataset x Q bin: the median over settings of the ratio b/a of training
    time per epoch (each setting's log ratio averaged over its seeds first), with a bootstrap
    95% interval, and the mean ratio with t intervals. Empty where no epoch recorded it."""
    col = TIME_METRIC + "_log_ratio"
    if col not in sdf.columns or not sdf[col].notna().any():
        return pd.DataFrame(columns=STATS_COLUMNS)
    qb = sdf["q_bin"].astype(object)
    rows = []
    for ds in dataset_order(sdf["dataset"]):
        in_ds = sdf["dataset"] == ds
        for label in ("all", *Q_LABELS):
            g = sdf[in_ds & ((qb == label) if label != "all" else True)]
            d = pd.to_numeric(g[col], errors="coerce").to_numpy(float)
            keep = np.isfinite(d)
            d, runs = d[keep], g["n_seeds"].to_numpy(float)[keep]
            if d.size == 0:
                continue
            lo, hi = bootstrap_median_ci(d)
            lo90, hi90 = _t_interval(d, 0.90)
            lo95, hi95 = _t_interval(d, 0.95)
            rows.append({"a": a, "b": b, "dataset": ds, "q_bin": label, "metric": TIME_METRIC,
                         "n": int(d.size), "n_runs": int(runs.sum()),
                         "mean_a": float(np.exp(np.log(g[TIME_METRIC + "_a"][keep]).mean())),
                         "mean_b": float(np.exp(np.log(g[TIME_METRIC + "_b"][keep]).mean())),
                         "ratio": float(np.exp(d.mean())),
                         "ratio_ci90_low": float(np.exp(lo90)), "ratio_ci90_high": float(np.exp(hi90)),
                         "ratio_ci95_low": float(np.exp(lo95)), "ratio_ci95_high": float(np.exp(hi95)),
                         "median_ratio": float(np.exp(np.median(d))),
                         "ratio_ci_low": float(np.exp(lo)), "ratio_ci_high": float(np.exp(hi)),
                         "b_wins": int(np.sum(d < 0)), "ties": int(np.sum(d == 0)),
                         "win_rate_b": float(np.mean(d < 0)), "verdict": "", "margin_source": ""})
    return pd.DataFrame(rows, columns=STATS_COLUMNS)


def equivalence(pairs_df: pd.DataFrame, margin=DEFAULT_MARGIN, noise: pd.DataFrame | None = None,
                metrics=("train_loss", "val_loss")) -> pd.DataFrame:
    """The equivalence part of `stats`: one row per dataset x Q bin x loss with n settings, the
    ratio and its 90%/95% intervals, the margin, the TOST and t-test p-values (raw and Holm)
    and the verdict."""
    cols = ["a", "b", "dataset", "q_bin", "metric", "n", "n_runs", "ratio", "ratio_ci90_low",
            "ratio_ci90_high", "ratio_ci95_low", "ratio_ci95_high", "margin", "margin_source",
            "p_lower", "p_upper", "p_tost", "p_tost_holm", "t_stat", "p_ttest", "p_ttest_holm",
            "verdict", "family", "family_size", "ci_family_level",
            "ratio_ci_family_low", "ratio_ci_family_high", "verdict_bonferroni", "holm_only"]
    return stats(pairs_df, metrics, margin, noise)[cols]


ARCH_EFFECT_COLUMNS = ["dataset", "q_bin", "metric", "n_pairs", "median_abs_log_ratio",
                       "p90_abs_log_ratio", "median_ratio", "p90_ratio"]


def arch_effect(pairs_df: pd.DataFrame, metrics=("train_loss", "val_loss")) -> pd.DataFrame:
    """The architecture effect measured as seed noise is: |log(b/a)| of each pair of two
    different networks (each setting and seed), per dataset x Q bin ("all" and each) x metric:
    median and 90th percentile, as log ratios and as ratios."""
    if pairs_df is None or pairs_df.empty:
        return pd.DataFrame(columns=ARCH_EFFECT_COLUMNS)
    pairs_df = evidence(pairs_df)
    rows = []
    qb = pairs_df["q_bin"].astype(object)
    for ds in dataset_order(pairs_df["dataset"]):
        for q in ("all", *Q_LABELS):
            g = pairs_df[(pairs_df["dataset"] == ds) & ((qb == q) if q != "all" else True)]
            for m in metrics:
                r = pd.to_numeric(g[m + "_ratio"], errors="coerce").to_numpy(float)
                v = np.abs(np.log(r[np.isfinite(r) & (r > 0)]))
                if v.size == 0:
                    continue
                med, p90 = np.percentile(v, [50, 90])
                rows.append({"dataset": ds, "q_bin": q, "metric": m, "n_pairs": int(v.size),
                             "median_abs_log_ratio": float(med), "p90_abs_log_ratio": float(p90),
                             "median_ratio": float(np.exp(med)), "p90_ratio": float(np.exp(p90))})
    return pd.DataFrame(rows, columns=ARCH_EFFECT_COLUMNS)
