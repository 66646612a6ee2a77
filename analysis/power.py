"""Power of the paired equivalence test (TOST on settings' mean log ratios), and the smallest
study that reaches a target power.

The model is the one the verdict tests: a setting's mean log ratio d_i = theta + u_i + e_i,
with u_i ~ N(0, sigma2_between) (how the architecture effect varies between settings) and e_i
the mean of `seeds` seed draws, each N(0, sigma2_within). So d_i ~ N(theta, sigma2_between +
sigma2_within / seeds), and the TOST on n settings is a one-sample t procedure with df = n - 1.

Power is computed exactly, as PowerTOST's `method = "exact"` does with Owen's Q: conditional on
the sample variance the mean is normal, so the power is the expectation over the chi-square
law of the variance of a difference of two normal CDFs, integrated with scipy.integrate.quad.
The noncentral-t approximation (PowerTOST's `method = "nct"`) is kept for comparison.
Checked against PowerTOST's published values in tests/test_power.py.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import integrate
from scipy import stats as _sp

TARGET_POWER = 0.8
MAX_SETTINGS = 10_000_000  # a search bound: beyond it the answer is "not reachable"


def tost_power(theta: float, bound: float, se: float, df: float, alpha: float = 0.05,
               method: str = "exact") -> float:
    """Probability that the TOST at level `alpha` (each one-sided test) declares equivalence
    within +-bound, when the estimate is N(theta, se^2) and its standard error is estimated
    with `df` degrees of freedom (se^2 * chi2_df / df).

    method "exact": integral over the chi-square law of the estimated variance (Owen's Q);
    "nct": the noncentral-t approximation, which ignores that the two one-sided tests share
    one variance estimate (accurate to about 1e-3 for df above 10, worse at small df)."""
    if not (se > 0 and df >= 1 and bound > 0):
        return float("nan")
    tc = float(_sp.t.isf(alpha, df))
    if method == "nct":
        # P(T1 >= tc and T2 <= -tc) ~ P(T2 <= -tc) - P(T1 < tc), T1, T2 noncentral t
        p = (_sp.nct.cdf(-tc, df, (theta - bound) / se)
             - _sp.nct.cdf(tc, df, (theta + bound) / se))
        return float(max(0.0, p))
    if method != "exact":
        raise ValueError(f"method must be 'exact' or 'nct', got {method!r}")
    # Rejection: -bound + tc*s < mean < bound - tc*s, s the estimated standard error; only
    # s < bound / tc can reject. With s^2 = se^2 * x / df, x ~ chi2(df):
    x_max = df * (bound / (tc * se)) ** 2
    chi2 = _sp.chi2(df)

    def conditional(x: float) -> float:
        s = se * math.sqrt(x / df)
        hi = (bound - tc * s - theta) / se
        lo = (-bound + tc * s - theta) / se
        return max(0.0, float(_sp.norm.cdf(hi) - _sp.norm.cdf(lo))) * float(chi2.pdf(x))

    # quad needs the chi-square mass in view: split at its mode and a few sd around it
    centre, spread = df, math.sqrt(2 * df)
    points = sorted({p for p in (max(df - 2, 0.0), centre - 3 * spread, centre + 3 * spread)
                     if 0 < p < x_max})
    value, _ = integrate.quad(conditional, 0.0, x_max, points=points or None, limit=200,
                              epsabs=1e-11, epsrel=1e-9)
    return float(min(1.0, max(0.0, value)))


def paired_power(n: int, sigma2: float, bound: float, theta: float = 0.0, alpha: float = 0.05,
                 method: str = "exact") -> float:
    """Power of the paired TOST on n settings whose mean log ratios have variance sigma2 (df =
    n - 1), at a true mean log ratio theta and margin +-bound (bound = log(1 + delta))."""
    if n < 2 or not np.isfinite(sigma2) or sigma2 < 0:
        return float("nan")
    if sigma2 == 0:
        return 1.0 if abs(theta) < bound else 0.0
    return tost_power(theta, bound, math.sqrt(sigma2 / n), n - 1, alpha, method)


def setting_variance(sigma2_between: float, sigma2_within: float, seeds: int) -> float:
    """Var of one setting's mean log ratio over `seeds` seeds."""
    return sigma2_between + sigma2_within / seeds


def settings_for_power(sigma2: float, bound: float, theta: float = 0.0, alpha: float = 0.05,
                       target: float = TARGET_POWER, start: int = 2) -> int | None:
    """The smallest number of settings n >= start with power >= target (None if the true
    ratio lies outside the margin, so no n reaches it). Power grows with n: bracket by
    doubling, then bisect."""
    if abs(theta) >= bound or not np.isfinite(sigma2):
        return None
    start = max(2, int(start))
    if paired_power(start, sigma2, bound, theta, alpha) >= target:
        return start
    lo, hi = start, start * 2
    while paired_power(hi, sigma2, bound, theta, alpha) < target:
        lo, hi = hi, hi * 2
        if hi > MAX_SETTINGS:
            return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if paired_power(mid, sigma2, bound, theta, alpha) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def seeds_for_power(n: int, sigma2_between: float, sigma2_within: float, bound: float,
                    theta: float = 0.0, alpha: float = 0.05, target: float = TARGET_POWER,
                    start: int = 1, max_seeds: int = 1000) -> int | None:
    """The smallest number of seeds per setting (>= start) that gives n settings the target
    power; None where even infinitely many seeds would not (sigma2_between alone is too
    large: seeds shrink only sigma2_within / seeds)."""
    if n < 2 or abs(theta) >= bound:
        return None
    if paired_power(n, sigma2_between, bound, theta, alpha) < target:
        return None  # the limit of infinitely many seeds
    seeds = max(1, int(start))
    while seeds <= max_seeds:
        if paired_power(n, setting_variance(sigma2_between, sigma2_within, seeds), bound,
                        theta, alpha) >= target:
            return seeds
        seeds = seeds + 1 if seeds < 16 else int(seeds * 1.25)
    return None


def power(n: int, sigma2_between: float, sigma2_within: float, seeds: int, margin: float,
          ratio: float = 1.0, alpha: float = 0.05, method: str = "exact") -> float:
    """Notebook entry: the power of the equivalence test of a study with n settings and
    `seeds` seeds per setting, at margin delta (ratio within [1/(1+delta), 1+delta]) and a
    true ratio b/a of `ratio`, each one-sided test at `alpha` (pass alpha / m for a family
    of m rows adjusted by Bonferroni)."""
    return paired_power(n, setting_variance(sigma2_between, sigma2_within, seeds),
                        math.log1p(margin), math.log(ratio), alpha, method)
