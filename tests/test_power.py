"""Power of the paired TOST, the variance components a pilot gives, and the two Holm families.

Power is checked against values PowerTOST publishes and against a simulation of the paired
test (its Monte-Carlo error stated); the components are recovered from a store built with known
sigma2_between and sigma2_within through the store's writer (study.rows.cell_row).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sp

import analysis
from analysis.power import (paired_power, seeds_for_power, setting_variance, settings_for_power,
                            tost_power)
from analysis.variance import components
from analysis.verdicts import family_keys, holm
from study.rows import cell_row, now
from study.store import Store
from sweep import parse_spec


def _crossover_se(cv: float, n: int) -> float:
    """PowerTOST's standard error of a 2x2 crossover: sqrt(log(1 + CV^2)) * sqrt(2 / n)."""
    return math.sqrt(math.log1p(cv * cv)) * math.sqrt(2 / n)


@pytest.mark.parametrize("method", ["exact", "nct"])
@pytest.mark.parametrize("cv,n,published", [
    # PowerTOST, man/exppower.TOST.Rd, example: power.TOST(CV = 0.3, n = 40) "should give:
    # [1] 0.8158453" (2x2 crossover, theta0 = 0.95, limits 0.80-1.25, alpha 0.05)
    (0.3, 40, 0.8158453),
    # PowerTOST sampleN.TOST(theta0 = 0.95, CV = 0.20, design = "2x2", targetpower = 0.8)
    # gives n = 20, achieved power 0.8346802 (quoted at forum.bebac.at, entry 23749)
    (0.2, 20, 0.8346802),
])
def test_power_matches_powertost_published_values(cv, n, published, method):
    got = tost_power(math.log(0.95), math.log(1.25), _crossover_se(cv, n), n - 2, 0.05, method)
    assert got == pytest.approx(published, abs=5e-7)


def test_sample_size_search_matches_powertost_n20():
    """The smallest n of sampleN.TOST(CV = 0.2): 20 (power 0.8347); 18 stays below 0.8."""
    p = [tost_power(math.log(0.95), math.log(1.25), _crossover_se(0.2, n), n - 2) for n in (18, 20)]
    assert p[0] < 0.8 <= p[1]


def test_paired_power_matches_a_simulation_of_the_paired_tost():
    """20,000 simulated paired studies (n = 12 settings, sd 0.12, margin 10 %, true ratio 1.02,
    alpha 0.05), each tested as the verdict does (two one-sided t-tests, df = n - 1): the share
    declared equivalent lies within 4 Monte-Carlo standard errors (about 0.0035) of the power."""
    n, sd, bound, theta, sims = 12, 0.12, math.log(1.1), math.log(1.02), 20_000
    rng = np.random.default_rng(29)
    d = rng.normal(theta, sd, size=(sims, n))
    mean, se = d.mean(axis=1), d.std(axis=1, ddof=1) / math.sqrt(n)
    p_lower = sp.t.sf((mean + bound) / se, n - 1)
    p_upper = sp.t.cdf((mean - bound) / se, n - 1)
    rate = float(np.mean(np.maximum(p_lower, p_upper) < 0.05))
    want = paired_power(n, sd ** 2, bound, theta)
    mc_se = math.sqrt(want * (1 - want) / sims)
    assert abs(rate - want) < 4 * mc_se
    assert 0.3 < want < 0.9  # a power where the check has teeth


def test_noncentral_t_approximation_is_close_from_ten_settings():
    for n in (10, 20, 50):
        for theta in (0.0, 0.03):
            exact = paired_power(n, 0.01, math.log(1.1), theta)
            approx = paired_power(n, 0.01, math.log(1.1), theta, method="nct")
            assert abs(exact - approx) < 2e-3


def test_settings_for_power_is_the_smallest_that_reaches_it():
    v, bound = 0.02, math.log(1.1)
    n = settings_for_power(v, bound)
    assert paired_power(n, v, bound) >= 0.8 > paired_power(n - 1, v, bound)
    assert settings_for_power(v, bound, theta=math.log(1.2)) is None  # true ratio outside


def test_seeds_cannot_get_there_when_sigma2_between_dominates():
    bound = math.log(1.1)
    # between-setting variance alone leaves 10 settings under 80 %: no number of seeds helps
    assert paired_power(10, 0.02, bound) < 0.8
    assert seeds_for_power(10, 0.02, 0.05, bound) is None
    # seed noise dominates: more seeds get there, and the answer is the smallest such number
    s = seeds_for_power(10, 0.0005, 0.05, bound)
    assert s is not None and s > 1
    v = [setting_variance(0.0005, 0.05, k) for k in (s - 1, s)]
    assert paired_power(10, v[0], bound) < 0.8 <= paired_power(10, v[1], bound)


def test_power_notebook_api():
    p = analysis.power(n=20, sigma2_between=0.001, sigma2_within=0.004, seeds=2, margin=0.1)
    assert p == pytest.approx(paired_power(20, 0.003, math.log(1.1)), rel=1e-12)


# -- variance components ---------------------------------------------------------------------
def test_upper_limits_cover_the_truth_80_percent_of_the_time():
    """2,000 simulated pilots of 8 settings x 2 seeds (statistics only): each one-sided 80 %
    upper limit lies above the true component in 80 % +- 3 Monte-Carlo SE (0.027) of them."""
    rng = np.random.default_rng(7)
    sb, sw, sims, k, s = 0.01, 0.02, 2000, 8, 2
    cover_b = cover_w = 0
    for _ in range(sims):
        u = rng.normal(0, math.sqrt(sb), k)
        c = components([ui + rng.normal(0, math.sqrt(sw), s) for ui in u])
        cover_b += c["sigma2_between_upper"] >= sb
        cover_w += c["sigma2_within_upper"] >= sw
    tol = 3 * math.sqrt(0.8 * 0.2 / sims)
    assert abs(cover_w / sims - 0.8) < tol
    # Graybill-Wang's limit is approximate and conservative for small k: at least 80 %
    assert cover_b / sims > 0.8 - tol


def known_components_store(root: Path, sigma2_between: float, sigma2_within: float,
                           seeds=(0, 1, 2), layers=range(2, 10), filters=range(4, 104, 4),
                           rng_seed: int = 3) -> Store:
    """A store whose log ratio parallel/sequential at setting i and seed j is u_i + e_ij, with
    u_i ~ N(0, sigma2_between), e_ij ~ N(0, sigma2_within): the sequential side carries no noise."""
    text = f"""
[study]
name = "components"

[grid]
dataset = "digits"
architecture = ["sequential", "parallel"]
layers = {list(layers)}
filters = {list(filters)}
kernel = 3
seed = {list(seeds)}
epochs = 3
"""
    spec = parse_spec(text)
    store = Store(root)
    store.ensure_writable()
    store.save_spec(text, spec.name, "tests")
    rng = np.random.default_rng(rng_seed)
    effect: dict[tuple, float] = {}
    rows = []
    for c in spec.cells():
        cfg = c.config
        base = 0.05 * cfg["layers"] + 0.004 * cfg["filters"]
        log_loss = math.log(base)
        if cfg["architecture"] == "parallel":
            key = (cfg["layers"], cfg["filters"])
            u = effect.setdefault(key, rng.normal(0, math.sqrt(sigma2_between)))
            log_loss += u + rng.normal(0, math.sqrt(sigma2_within))
        loss = float(math.exp(log_loss))
        result = {"status": "ok", "n_params": 300 * cfg["layers"] * cfg["filters"],
                  "n_train": 1000, "n_classes": 10, "epochs_done": 3, "wall_s": 1.0,
                  "train_loss": loss, "val_loss": loss, "test_loss": loss, "train_acc": 0.9,
                  "val_acc": 0.9, "test_acc": 0.9}
        rows.append((cell_row(c.to_dict(), result, study=spec.name, attempts=1,
                              started_at=now(), host="test", device="cpu"), []))
    store.write_results(rows)
    return store


def test_variance_components_recovered_from_a_store(tmp_path):
    """200 settings x 3 seeds with sigma2_between 0.01 and sigma2_within 0.004: the estimates
    lie within 4 standard errors (within: sd ~ 7 % of it, df 400; between: sd ~ 0.0011)."""
    root = tmp_path / "components"
    known_components_store(root, 0.01, 0.004)
    comp = analysis.variance_components(analysis.pairs(analysis.load(root)))
    top = comp[(comp["q_bin"] == "all") & (comp["metric"] == "val_loss")].iloc[0]
    assert top["n_settings"] == 200 and top["n_runs"] == 600 and top["df_within"] == 400
    assert top["sigma2_within"] == pytest.approx(0.004, abs=4 * 0.004 * math.sqrt(2 / 400))
    sd_b = math.sqrt(2 / 199) * (0.01 + 0.004 / 3)
    assert top["sigma2_between"] == pytest.approx(0.01, abs=4 * sd_b)
    assert top["sigma2_within_upper"] > top["sigma2_within"]
    assert top["sigma2_between_upper"] > top["sigma2_between"]


# -- the two Holm families -------------------------------------------------------------------
def settings_frame(rows: dict[tuple[str, str], np.ndarray]) -> pd.DataFrame:
    """A settings frame (the analysis's unit of evidence) with given mean log ratios per
    (dataset, q_bin); both losses get the same log ratios."""
    out = []
    for (ds, q), d in rows.items():
        for i, x in enumerate(d):
            rec = {"dataset": ds, "q_bin": q, "architecture_a": "sequential",
                   "architecture_b": "parallel", "n_seeds": 1, "layers": i}
            for m in ("train_loss", "val_loss"):
                rec.update({m + "_a": 1.0, m + "_b": math.exp(x), m + "_log_ratio": x})
            out.append(rec)
    return pd.DataFrame(out)


def with_p(n: int, p_tost: float, bound: float = math.log(1.1)) -> np.ndarray:
    """n log ratios with mean 0 whose TOST p-value is p_tost (sd set from the t quantile)."""
    z = np.linspace(-1, 1, n)
    z = (z - z.mean()) / z.std(ddof=1)
    se = bound / sp.t.isf(p_tost, n - 1)
    return z * se * math.sqrt(n)


def test_holm_runs_within_each_family_not_over_the_table():
    """Two datasets, each with two bins: the four headline rows (2 datasets x 2 losses) are one
    family; each dataset x loss's bins another. The issue's case: a headline TOST p of 0.0072
    is 0.0144 after Holm over the two headline rows of one dataset's table (equivalent), where
    Holm over a 10-row table made it 0.065 (inconclusive)."""
    rows = {("mnist", "[0,1)"): with_p(10, 0.2), ("mnist", "[1,3)"): with_p(10, 0.3),
            ("cifar10", "[0,1)"): with_p(10, 0.01), ("cifar10", "[1,3)"): with_p(10, 0.02)}
    s = analysis.stats(settings_frame(rows))
    assert set(s["family"]) == {"primary", "secondary"}
    head = s[s["q_bin"] == "all"]
    assert (head["family"] == "primary").all() and (head["family_size"] == 4).all()
    assert list(head["p_tost_holm"]) == pytest.approx(list(holm(head["p_tost"])))
    for (ds, m), g in s[s["q_bin"] != "all"].groupby(["dataset", "metric"]):
        assert (g["family"] == "secondary").all() and (g["family_size"] == 2).all()
        assert list(g["p_tost_holm"]) == pytest.approx(list(holm(g["p_tost"])))
    assert s["family"].tolist() == ["primary" if q == "all" else "secondary" for q in s["q_bin"]]
    assert len(set(family_keys(s))) == 1 + 4
    # the numbers: two headline rows, p = 0.0072 each
    one = analysis.stats(settings_frame({("mnist", "[0,1)"): with_p(12, 0.0072)}))
    top = one[one["q_bin"] == "all"]
    assert list(top["p_tost_holm"]) == pytest.approx([0.0144, 0.0144], rel=1e-6)
    assert (top["verdict"] == "equivalent").all()
    # the old table-wide family (here 4 rows) would have paid for the bin rows too
    assert holm(one["p_tost"]).max() > top["p_tost_holm"].max()


def test_interval_at_the_verdicts_level_and_the_holm_mark():
    """Headline TOST p-values 0.02 and 0.04 over two rows: Holm decides both (0.04, 0.04), but
    Bonferroni (0.04, 0.08) only the first, so the second's 95 % interval (1 - 2 x 0.05 / 2)
    crosses the margin: that row is marked, the first is not. Each interval is the t interval
    at 1 - 2 alpha / m of the row's settings."""
    d_train, d_val = with_p(12, 0.02), with_p(12, 0.04)
    frame = settings_frame({("digits", "[0,1)"): d_train})
    frame["val_loss_log_ratio"] = np.tile(d_val, 1)
    frame["val_loss_b"] = np.exp(d_val)
    s = analysis.stats(frame)
    head = s[s["q_bin"] == "all"].set_index("metric")
    assert head.loc["train_loss", "p_tost_holm"] == pytest.approx(0.04, rel=1e-6)
    assert head.loc["val_loss", "p_tost_holm"] == pytest.approx(0.04, rel=1e-6)
    assert (head["verdict"] == "equivalent").all()
    assert head.loc["train_loss", "verdict_bonferroni"] == "equivalent"
    assert head.loc["val_loss", "verdict_bonferroni"] == "inconclusive"
    assert not head.loc["train_loss", "holm_only"] and head.loc["val_loss", "holm_only"]
    assert list(head["ci_family_level"]) == pytest.approx([0.95, 0.95])
    ci = sp.ttest_1samp(d_val, 0.0).confidence_interval(0.95)
    assert head.loc["val_loss", "ratio_ci_family_low"] == pytest.approx(math.exp(ci.low))
    assert head.loc["val_loss", "ratio_ci_family_high"] == pytest.approx(math.exp(ci.high))
    assert head.loc["val_loss", "ratio_ci_family_high"] > 1.1  # crosses the margin: the mark


def test_forest_draws_the_verdict_level_interval_and_marks_holm_rows():
    d_train, d_val = with_p(12, 0.02), with_p(12, 0.04)
    frame = settings_frame({("digits", "[0,1)"): d_train})
    frame["val_loss_log_ratio"] = d_val
    frame["val_loss_b"] = np.exp(d_val)
    s = analysis.stats(frame)
    fig = analysis.plot_forest(s)
    ax = fig.axes[0]
    thick = [ln for ln in ax.get_lines() if ln.get_linewidth() > 3]
    drawn = sorted(tuple(np.round(ln.get_xdata(), 9)) for ln in thick)
    rows = s[s["n"] > 0]
    want = sorted((round(lo, 9), round(hi, 9)) for lo, hi in
                  zip(rows["ratio_ci_family_low"], rows["ratio_ci_family_high"]))
    assert drawn == want
    labels = [t.get_text() for t in fig.axes[1].get_yticklabels()]
    marked = rows.sort_values(["metric"], key=lambda c: c.map({"train_loss": 0, "val_loss": 1}),
                              kind="stable")
    assert sum(lbl.endswith("†") for lbl in labels) == int(marked["holm_only"].sum()) == 1
    ylabels = [t.get_text() for t in ax.get_yticklabels()]
    assert any("95 %)" in y for y in ylabels)  # the level beside n
