"""Group-sequential equivalence: the level spent over planned looks (statistics only).

A study that looks at its verdict after each batch of seeds and stops when it says
"equivalent" inflates the error rate unless the looks are planned and the level is spent across
them (Lakens 2014; Jennison & Turnbull 1993 for equivalence). Here:

* Information at look k is I_k = n / (sigma2_between + sigma2_within / seeds_k), estimated at
  each look (analysis.variance), so the information fraction t_k = I_k / I_K is not
  seeds_k / seeds_K: seeds shrink only the within part.
* The level is spent by the Lan-DeMets O'Brien-Fleming function alpha(t) = 2 - 2 Phi(z_{1 -
  alpha/2} / sqrt(t)) on these fractions (rounded to two decimals, so boundaries are cached and
  the same fractions always give the same boundary), the last look spending what is left.
* Boundary c_k (a z value) solves P(Z_1 < c_1, ..., Z_{k-1} < c_{k-1}, Z_k >= c_k) = alpha(t_k) -
  alpha(t_{k-1}) under the canonical joint law Corr(Z_i, Z_j) = sqrt(t_i / t_j), by scipy's
  multivariate normal CDF with a fixed seed (deterministic). Each one-sided test of the TOST
  compares its t-test p-value with the nominal level 1 - Phi(c_k): both one-sided tests spend
  alpha (the intersection-union test needs no split), and each primary row gets alpha / m
  (Bonferroni across the family, valid under any spending).
* Stopping for *difference* is not allowed: a row is decided early only when the TOST declares
  it equivalent; the two-sided t-test is judged once, at the last look.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import optimize
from scipy import stats as _sp

MVN_SEED = 20231029  # scipy's multivariate normal integration is randomised: fixed, so exact reruns


def obf_spent(t: float, alpha: float) -> float:
    """Lan-DeMets O'Brien-Fleming spending: the level spent up to information fraction t."""
    if t <= 0:
        return 0.0
    if t >= 1:
        return float(alpha)
    return float(2 * _sp.norm.sf(_sp.norm.isf(alpha / 2) / math.sqrt(t)))


def _reject_region_mass(c_prev: tuple, fractions: tuple, c: float) -> float:
    """P(Z_1 < c_1, ..., Z_{k-1} < c_{k-1}, Z_k >= c), as one CDF of (Z_1, ..., -Z_k) at
    (c_1, ..., -c): no difference of two CDFs, so small masses keep their relative accuracy."""
    k = len(fractions)
    cov = np.array([[math.sqrt(min(a, b) / max(a, b)) for b in fractions] for a in fractions])
    flip = np.ones(k)
    flip[-1] = -1.0
    cov = cov * np.outer(flip, flip)
    mvn = _sp.multivariate_normal(mean=np.zeros(k), cov=cov, seed=MVN_SEED,
                                  maxpts=50_000 * k, abseps=1e-14, releps=1e-4)
    return float(mvn.cdf(np.array([*c_prev, -c])))


@lru_cache(maxsize=4096)
def _boundaries(fractions: tuple, alpha: float) -> tuple:
    out: list[float] = []
    spent = 0.0
    for k, t in enumerate(fractions, start=1):
        step = obf_spent(t, alpha) - spent
        spent += step
        if step <= 0:
            out.append(math.inf)  # nothing to spend at this look
            continue
        if k == 1:
            out.append(float(_sp.norm.isf(step)))
            continue
        c_prev, frac = tuple(out), fractions[:k]
        if not all(np.isfinite(c_prev)):
            c_prev = tuple(min(c, 12.0) for c in c_prev)
        f = lambda c: _reject_region_mass(c_prev, frac, c) - step  # noqa: E731
        out.append(float(optimize.brentq(f, -1.0, 12.0, xtol=1e-6)))
    return tuple(out)


def round_fractions(fractions) -> tuple:
    """Information fractions as the boundaries use them: increasing, in (0, 1], two decimals,
    the last look's 1."""
    out, last = [], 0.0
    for t in fractions:
        t = min(1.0, max(round(float(t), 2), last + 0.01))
        out.append(t)
        last = t
    return tuple(out)


def boundaries(fractions, alpha: float) -> list[float]:
    """z boundaries c_1..c_k for looks at these information fractions (the last 1 if final)."""
    return list(_boundaries(round_fractions(fractions), float(alpha)))


def nominal_levels(fractions, alpha: float) -> list[float]:
    """The nominal one-sided p-value each look's tests are compared with: 1 - Phi(c_k)."""
    return [float(_sp.norm.sf(c)) for c in boundaries(fractions, alpha)]


def information(n: int, sigma2_between: float, sigma2_within: float, seeds: int) -> float:
    """Fisher information about the mean log ratio from n settings of `seeds` seeds."""
    return n / (sigma2_between + sigma2_within / seeds)


def information_fraction(n: int, sigma2_between: float, sigma2_within: float, seeds: int,
                         seeds_last: int) -> float:
    """I_k / I_K at the current estimates, I_K with the seeds of the last planned look."""
    return information(n, sigma2_between, sigma2_within, seeds) / information(
        n, sigma2_between, sigma2_within, seeds_last)


def tost_p(d: np.ndarray, bound: float) -> float:
    """The TOST p-value (the larger one-sided t-test p) of mean log ratios d against +-bound."""
    n = d.size
    mean, se = float(d.mean()), float(d.std(ddof=1)) / math.sqrt(n)
    p_lower = _sp.t.sf((mean + bound) / se, n - 1)
    p_upper = _sp.t.cdf((mean - bound) / se, n - 1)
    return float(max(p_lower, p_upper))
