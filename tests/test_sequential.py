"""The group-sequential equivalence test (analysis.sequential), checked on statistics only.

10,000 simulated studies at fixed sigma2_between = 0.0002, sigma2_within = 0.004, n = 20
settings and K = 2 looks (2 seeds per setting at look 1, 3 at look 2), one primary row at
alpha = 0.05: each look estimates the variance components and the information fraction, spends
alpha by Lan-DeMets O'Brien-Fleming and stops when the TOST declares equivalence.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.sequential import (boundaries, information_fraction, nominal_levels, obf_spent,
                                 tost_p)
from analysis.variance import components

SIMS, N, SB, SW, SEEDS, ALPHA = 10_000, 20, 0.0002, 0.004, (2, 3), 0.05
BOUND = math.log(1.1)


def test_obrien_fleming_boundaries_match_published_values():
    """Lan-DeMets O'Brien-Fleming, one-sided 0.025: two equally spaced looks 2.9626, 1.9686;
    three at 1/3, 2/3, 1 (rounded to 0.33, 0.67) about 3.71, 2.51, 1.993 (gsDesign's
    sfLDOF tables: 3.7103, 2.5114, 1.9930 at exactly 1/3, 2/3)."""
    assert boundaries([0.5, 1], 0.025) == pytest.approx([2.9626, 1.9686], abs=2e-4)
    c = boundaries([1 / 3, 2 / 3, 1], 0.025)
    assert c[2] == pytest.approx(1.9930, abs=2e-3) and c[1] == pytest.approx(2.51, abs=0.01)
    assert obf_spent(1.0, 0.05) == 0.05 and obf_spent(0.0, 0.05) == 0.0
    assert boundaries([0.37, 1], 0.05) == boundaries([0.37, 1], 0.05)  # deterministic


def simulate(theta: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(declared equivalent, looks used, declared equivalent by naive repeated testing at alpha)
    for SIMS studies whose true mean log ratio is theta."""
    rng = np.random.default_rng(seed)
    u = rng.normal(0, math.sqrt(SB), (SIMS, N))
    e = rng.normal(0, math.sqrt(SW), (SIMS, N, SEEDS[-1]))
    d = theta + u[:, :, None] + e  # log ratio of setting i at seed j
    equivalent = np.zeros(SIMS, bool)
    looks = np.zeros(SIMS, int)
    naive = np.zeros(SIMS, bool)
    for s in range(SIMS):
        fractions = []
        for k, seeds in enumerate(SEEDS):
            obs = d[s, :, :seeds]
            comp = components(list(obs))
            t = 1.0 if k == len(SEEDS) - 1 else information_fraction(
                N, comp["sigma2_between"], comp["sigma2_within"], seeds, SEEDS[-1])
            fractions.append(t)
            p = tost_p(obs.mean(axis=1), BOUND)
            naive[s] |= p < ALPHA
            if p < nominal_levels(fractions, ALPHA)[-1]:
                equivalent[s] = True
                break
        looks[s] = k + 1
    return equivalent, looks, naive


def test_on_the_margin_equivalent_comes_out_at_most_alpha_plus_3_mc_se():
    """True ratio on the margin (1.1): the share of studies declared equivalent is at most
    alpha + 3 Monte-Carlo SE (0.05 + 3 x 0.0022); repeated unadjusted testing (the trap) is
    above the sequential design's rate."""
    eq, looks, naive = simulate(BOUND, seed=1)
    mc_se = math.sqrt(ALPHA * (1 - ALPHA) / SIMS)
    assert eq.mean() <= ALPHA + 3 * mc_se
    assert naive.mean() > eq.mean()


def test_at_a_true_ratio_of_one_the_expected_number_of_looks_is_below_k():
    eq, looks, _ = simulate(0.0, seed=2)
    assert looks.mean() < len(SEEDS)
    assert eq.mean() > 0.8  # and the design still decides


def test_the_information_fraction_is_not_the_seed_fraction():
    """Seeds shrink only the within part: with sigma2_between > 0, I_1 / I_2 exceeds 2/3."""
    t = information_fraction(N, SB, SW, 2, 3)
    assert t == pytest.approx((SB + SW / 3) / (SB + SW / 2)) and t > 2 / 3
