"""Equivalence: seed noise, settings as the unit of evidence, TOST and t-test verdicts, margins.

Stores with a known truth are written through the store's own writer with rows built by
study.rows.cell_row (the real schema); one end-to-end run trains digits cells with two seeds.
"""
from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sp

import analysis
from analysis.stats import VERDICTS, bootstrap_median_ci, holm, wilson_interval
from analysis.verdicts import family_keys
from study.rows import cell_row, now
from study.store import Store
from sweep import parse_spec

from conftest import run_cli

N_TRAIN, N_CLASSES = 1000, 10


def spec_text(layers, filters, seeds, margin=None, kernel=(3,)) -> str:
    text = f"""
[study]
name = "truth"

[grid]
dataset = "digits"
architecture = ["sequential", "parallel"]
layers = {list(layers)}
filters = {list(filters)}
kernel = {list(kernel)}
seed = {list(seeds)}
epochs = 3
"""
    if margin is not None:
        text += f"\n[analysis]\nmargin = {margin!r}\n".replace("'", '"')
    return text


def build(root: Path, text: str, shift: float, noise_sd: float, rng_seed: int = 0,
          time_factor: float | None = None) -> Store:
    """parallel's losses = exp(shift) x sequential's, each cell with its own log-normal noise
    of `noise_sd` (the seed noise); each setting has its own base loss. With `time_factor`,
    each cell gets three epoch rows whose training pass (train_s) takes time_factor x as long
    on parallel (the first epoch 50 % longer: a warm-up the per-epoch median ignores)."""
    spec = parse_spec(text)
    store = Store(root)
    store.ensure_writable()
    store.save_spec(text, spec.name, "tests")
    rng = np.random.default_rng(rng_seed)
    results = []
    for c in spec.cells():
        cfg = c.config
        base = 0.05 * cfg["layers"] + 0.004 * cfg["filters"] + 0.01 * cfg["kernel"]
        log_loss = np.log(base) + (shift if cfg["architecture"] == "parallel" else 0.0)
        train = float(np.exp(log_loss - 1.0 + rng.normal(0, noise_sd)))
        val = float(np.exp(log_loss + rng.normal(0, noise_sd)))
        result = {"status": "ok", "n_params": 300 * cfg["layers"] * cfg["filters"],
                  "n_train": N_TRAIN, "n_classes": N_CLASSES, "epochs_done": 3, "wall_s": 1.0,
                  "train_loss": train, "val_loss": val, "test_loss": val, "train_acc": 0.9,
                  "val_acc": 0.9, "test_acc": 0.9}
        row = cell_row(c.to_dict(), result, study=spec.name, attempts=1, started_at=now(),
                       host="test", device="cpu")
        epochs = []
        if time_factor is not None:
            per_epoch = 0.01 * cfg["layers"] * cfg["filters"] * (
                time_factor if cfg["architecture"] == "parallel" else 1.0)
            epochs = [{"cell_id": c.cell_id, "epoch": e, "train_loss": train, "val_loss": val,
                       "train_acc": 0.9, "val_acc": 0.9, "wall_s": per_epoch * e,
                       "train_s": per_epoch * (1.5 if e == 1 else 1.0)} for e in (1, 2, 3)]
        results.append((row, epochs))
    store.write_results(results)
    return store


def all_row(res_stats: pd.DataFrame, metric="val_loss") -> pd.Series:
    return res_stats[(res_stats["q_bin"] == "all") & (res_stats["metric"] == metric)].iloc[0]


def settings_log_ratios(root: Path, metric="val_loss") -> np.ndarray:
    """The settings' mean log ratios, computed here from the raw rows (independently of
    analysis): per (layers, filters, kernel) the mean over seeds of log(parallel/sequential)."""
    df = Store(root).read_trials()
    df["log"] = np.log(df[metric])
    wide = df.pivot_table(index=["layers", "filters", "kernel", "seed"], columns="architecture",
                          values="log")
    d = (wide["parallel"] - wide["sequential"]).groupby(level=["layers", "filters", "kernel"]).mean()
    return d.to_numpy()


CASES = {  # name: (layers, filters, seeds, shift, noise sd, the verdict of validation loss)
    "equivalent": ((2, 3, 4, 5, 6), (4, 8, 12, 16, 20, 24), (0, 1, 2), 0.0, 0.03, "equivalent"),
    "different": ((2, 3, 4, 5, 6), (4, 8, 12, 16), (0, 1), math.log(1.3), 0.05, "different"),
    "equivalent but different": ((2, 3, 4, 5, 6, 7, 8, 9), (4, 8, 12, 16, 20), (0, 1),
                                 math.log(1.02), 0.005, "equivalent but different"),
    "inconclusive": ((2, 3, 4, 5, 6), (4,), (0,), 0.0, 0.3, "inconclusive"),
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    out = {}
    for name, (layers, filters, seeds, shift, sd, _) in CASES.items():
        root = tmp_path_factory.mktemp(name.replace(" ", "_"))
        build(root, spec_text(layers, filters, seeds), shift, sd)
        out[name] = root
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_the_verdict_of_each_known_truth(stores, name):
    layers, filters, seeds, shift, sd, expect = CASES[name]
    df = analysis.load(stores[name])
    s = analysis.stats(analysis.pairs(df), noise=analysis.seed_noise(df))
    r = all_row(s)
    assert r["verdict"] == expect, r.to_dict()
    # n counts settings, n_runs the seeds behind them
    assert r["n"] == len(layers) * len(filters) and r["n_runs"] == r["n"] * len(seeds)
    assert r["ratio_ci90_low"] > r["ratio_ci95_low"] and r["ratio_ci90_high"] < r["ratio_ci95_high"]
    assert r["ratio_ci90_low"] < r["ratio"] < r["ratio_ci90_high"]


def test_tost_and_t_test_numbers_match_scipy_t(stores):
    """The TOST and two-sided t p-values recomputed from scipy.stats.t on the same numbers."""
    root = stores["equivalent"]
    s = analysis.stats(analysis.pairs(analysis.load(root)), margin=0.1)
    r = all_row(s)
    d = settings_log_ratios(root)
    n, mean, se = d.size, d.mean(), d.std(ddof=1) / math.sqrt(d.size)
    bound = math.log(1.1)
    t = sp.t(df=n - 1)
    assert r["p_lower"] == pytest.approx(t.sf((mean + bound) / se), rel=1e-9)
    assert r["p_upper"] == pytest.approx(t.cdf((mean - bound) / se), rel=1e-9)
    assert r["p_tost"] == pytest.approx(max(r["p_lower"], r["p_upper"]), rel=1e-12)
    assert r["p_ttest"] == pytest.approx(2 * t.sf(abs(mean) / se), rel=1e-9)
    assert r["t_stat"] == pytest.approx(mean / se, rel=1e-9)
    half90, half95 = t.ppf(0.95) * se, t.ppf(0.975) * se
    assert r["ratio"] == pytest.approx(math.exp(mean), rel=1e-12)
    assert r["ratio_ci90_low"] == pytest.approx(math.exp(mean - half90), rel=1e-9)
    assert r["ratio_ci95_high"] == pytest.approx(math.exp(mean + half95), rel=1e-9)
    # Holm within each family: the headline rows among themselves, the bins per dataset x loss
    for _, fam in s.groupby(family_keys(s)):
        assert list(fam["p_tost_holm"]) == pytest.approx(list(holm(fam["p_tost"])), nan_ok=True)
        assert list(fam["p_ttest_holm"]) == pytest.approx(list(holm(fam["p_ttest"])), nan_ok=True)
    tested = s["p_tost"].notna()  # a bin with one setting has no test
    assert tested.sum() >= 4 and (s.loc[tested, "p_tost_holm"] >= s.loc[tested, "p_tost"]).all()


def test_seeds_are_averaged_into_settings(stores):
    root = stores["equivalent"]
    p = analysis.pairs(analysis.load(root))
    st = analysis.settings(p)
    assert len(p) == 5 * 6 * 3 and len(st) == 5 * 6 and (st["n_seeds"] == 3).all()
    assert "seed" not in st.columns
    assert np.sort(st["val_loss_log_ratio"].to_numpy()) == pytest.approx(
        np.sort(settings_log_ratios(root)), rel=1e-12)
    # the ratio is that of the geometric means of the two sides
    assert st["val_loss_ratio"].to_numpy() == pytest.approx(
        (st["val_loss_b"] / st["val_loss_a"]).to_numpy(), rel=1e-12)


def test_seed_noise_per_group_and_pooled(stores):
    root = stores["equivalent"]
    df = analysis.load(root)
    noise = analysis.seed_noise(df)
    pooled = noise[(noise["q_bin"] == "all") & (noise["architecture"] == "all")
                   & (noise["metric"] == "val_loss")].iloc[0]
    # 30 settings x 2 architectures = 60 repeat groups of 3 seeds: 3 pairs each
    assert (pooled["n_groups"], pooled["n_seed_pairs"]) == (60, 180)
    vals = []
    for _, g in df.groupby(["architecture", "layers", "filters", "kernel"]):
        logs = np.log(g["val_loss"].to_numpy())
        vals += [abs(x - y) for x, y in itertools.combinations(logs, 2)]
    assert pooled["median_abs_log_ratio"] == pytest.approx(np.median(vals), rel=1e-12)
    assert pooled["p90_abs_log_ratio"] == pytest.approx(np.percentile(vals, 90), rel=1e-12)
    # N(0, 0.03) per cell: a difference of two has sd 0.042; its |.| median is 0.6745 x that
    assert 0.02 < pooled["median_abs_log_ratio"] < 0.04
    per_arch = noise[(noise["q_bin"] == "all") & (noise["architecture"] != "all")]
    assert set(per_arch["architecture"]) == {"sequential", "parallel"}


def test_same_network_copies_are_not_seed_repeats(tmp_path):
    """A row recorded as a copy (same_network_as) is not a repeat of the network it copies."""
    text = spec_text((1, 2), (4,), (0, 1))
    store = build(tmp_path, text, 0.0, 0.05)
    df = store.read_trials()
    par1 = (df["architecture"] == "parallel") & (df["layers"] == 1)
    seq1 = df[(df["architecture"] == "sequential") & (df["layers"] == 1)].set_index("seed")
    df.loc[par1, "same_network_as"] = df.loc[par1, "seed"].map(seq1["cell_id"])
    noise = analysis.seed_noise(analysis.add_q(df))
    top = noise[(noise["q_bin"] == "all") & (noise["metric"] == "val_loss")]
    n_groups = dict(zip(top["architecture"], top["n_groups"]))
    # sequential: layers 1 and 2; parallel: layers 2 only (layers 1 is sequential's copy)
    assert n_groups == {"all": 3, "sequential": 2, "parallel": 1}


def test_margin_from_the_spec_from_the_command_line_and_from_seed_noise(tmp_path):
    layers, filters, seeds = (2, 3, 4, 5), (4, 8, 12), (0, 1)
    root = tmp_path / "spec_margin"
    build(root, spec_text(layers, filters, seeds, margin=0.05), 0.0, 0.02)
    res = analysis.compute.analyse(root, only=["forest"])
    assert res.margin == 0.05 and res.margin_from == "spec [analysis]"
    assert (res.stats["margin"] == 0.05).all()
    head = analysis.report._headline(res)
    assert "Equivalence margin: ±5 %, from the spec's [analysis] table" in head

    r = run_cli("report", root, "--margin", "0.2")
    assert r.returncode == 0, r.stderr
    st = pd.read_csv(root / "figures" / "stats.csv")
    assert (st["margin"] == 0.2).all()
    assert "Equivalence margin: ±20 %, given by --margin" in (root / "report.html").read_text()

    res = analysis.compute.analyse(root, only=["forest"], margin="seed")
    noise = analysis.seed_noise(analysis.load(root))
    row = all_row(res.stats)
    pooled = noise[(noise["q_bin"] == "all") & (noise["architecture"] == "all")
                   & (noise["metric"] == "val_loss")]["median_abs_log_ratio"].iloc[0]
    assert row["margin_source"] == "seed noise"
    assert row["margin"] == pytest.approx(math.expm1(pooled), rel=1e-12)
    assert "the seed noise of each row" in analysis.report._headline(res)


def test_a_one_seed_study_says_so_and_seed_margin_falls_back(tmp_path):
    root = tmp_path / "one"
    text = spec_text((2, 3, 4), (4, 8), (0,))
    build(root, text, 0.0, 0.05)
    res = analysis.compute.analyse(root, margin="seed")
    assert res.noise.empty and (res.stats["margin"] == analysis.DEFAULT_MARGIN).all()
    assert (res.stats["margin_source"] == "default (no seed repeats)").all()
    head = analysis.report._headline(res)
    assert ("Each setting was trained with one seed, so the seed-to-seed noise cannot be "
            "measured") in head and "<code>seed = [0, 1]</code>" in head
    assert "rows without seed repeats fall back to ±10 %" in head
    spec = tmp_path / "one.toml"
    spec.write_text(text)
    r = run_cli("plan", spec, "--results", tmp_path / "planned")
    assert r.returncode == 0, r.stderr
    assert "seeds: one per setting, so seed-to-seed noise cannot be measured" in r.stdout
    assert "add `seed = [0, 1]` to [grid]" in r.stdout


@pytest.mark.parametrize("name,words", [
    ("equivalent", "parallel and sequential are <b>equivalent</b> within ±10 % (TOST p = "),
    ("equivalent but different", "parallel and sequential are <b>equivalent but different</b>: "
                                 "parallel's loss is about 2.1 % higher than sequential's, a real "
                                 "difference inside the ±10 % margin"),
    ("different", "parallel and sequential are <b>different</b>: parallel's loss is about 30 % "
                  "higher than sequential's (ratio 1.3"),
    ("inconclusive", "<b>inconclusive</b>: the ratio parallel/sequential "),
])
def test_the_headline_words_each_verdict(stores, tmp_path, name, words):
    work = tmp_path / "copy"
    shutil.copytree(stores[name], work)
    text = analysis.write_report(work).read_text()
    head = text[text.index("<h2>Headline</h2>"):text.index("<h2>Progress</h2>")]
    assert "<b>DIGITS, validation loss</b>: " + words in head, head
    assert "reliably" not in head
    if name == "inconclusive":
        assert "crosses the ±10 % margin" in head
    else:  # several seeds: the architecture effect set against re-seeding
        assert "than re-seeding does (median |log ratio| " in head
    assert text.count("<b>Figure ") >= 1 and "figures/forest.png" in text


def test_bad_margins_are_refused_in_one_line(tmp_path, stores):
    for bad in ("-0.1", "abc", "0", "nan"):
        r = run_cli("report", stores["inconclusive"], "--margin", bad)
        assert r.returncode == 2, (bad, r.stderr)
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert "--margin" in r.stderr
    for bad in ('"wide"', "-1", "true"):
        spec = tmp_path / "bad.toml"
        spec.write_text(spec_text((2,), (4,), (0,)) + f"\n[analysis]\nmargin = {bad}\n")
        r = run_cli("plan", spec, "--results", tmp_path / "x")
        assert r.returncode == 2 and "analysis.margin" in r.stderr and "Traceback" not in r.stderr
    spec.write_text(spec_text((2,), (4,), (0,)) + "\n[analysis]\nmargn = 0.1\n")
    r = run_cli("plan", spec, "--results", tmp_path / "x")
    assert r.returncode == 2 and "unknown key 'analysis.margn' (did you mean 'margin'?)" in r.stderr


def test_the_analysis_table_changes_no_cell_id():
    base = spec_text((1, 2), (4, 8), (0, 1))
    ids = [c.cell_id for c in parse_spec(base).cells()]
    assert [c.cell_id for c in parse_spec(base + '\n[analysis]\nmargin = "seed"\n').cells()] == ids
    assert parse_spec(base + "\n[analysis]\nmargin = 0.25\n").analysis == {"margin": 0.25}


def test_training_time_ratio_rows_figure_and_headline(tmp_path):
    """The speed half of the claim: the ratio b/a of training time per epoch, from the epochs'
    train_s, as rows outside the verdicts and the Holm families."""
    root = tmp_path / "timed"
    build(root, spec_text((2, 3, 4), (4, 8), (0, 1)), 0.0, 0.03, time_factor=0.8)
    res, out = analysis.write.analyse_draw_write(root)
    t = res.stats[res.stats["metric"] == "train_s_per_epoch"]
    top = t[t["q_bin"] == "all"].iloc[0]
    assert top["n"] == 6 and top["n_runs"] == 12
    assert top["median_ratio"] == pytest.approx(0.8, rel=1e-12)
    assert top["ratio_ci_low"] == pytest.approx(0.8) and top["ratio_ci_high"] == pytest.approx(0.8)
    assert (t["verdict"] == "").all() and t["p_tost"].isna().all() and t["p_ttest"].isna().all()
    # the loss rows' Holm families are those of a table without the time rows
    loss = res.stats[res.stats["metric"] != "train_s_per_epoch"]
    for _, fam in loss.groupby(family_keys(loss)):
        assert list(fam["p_tost_holm"]) == pytest.approx(list(holm(fam["p_tost"])), nan_ok=True)
    assert "train_time" in out.pngs
    head = analysis.report._headline(res)
    assert ("<b>DIGITS, training time per epoch</b>: parallel takes 0.80× sequential's (median "
            "over 6 settings, 95 % interval [0.80, 0.80]; on this hardware and schedule)") in head
    text = analysis.report.render(res, out)
    assert "<h3>Training time per epoch</h3>" in text and "They describe this hardware" in text
    # a store whose epochs never recorded train_s: no time rows, no figure, no note about it
    old = tmp_path / "untimed"
    build(old, spec_text((2, 3), (4,), (0, 1)), 0.0, 0.03)
    res, out = analysis.write.analyse_draw_write(old)
    assert not (res.stats["metric"] == "train_s_per_epoch").any() and "train_time" not in out.pngs
    assert not any("train_time" in n for n in out.notes)


# -- the maintained implementations keep today's numbers ------------------------------------------
def test_wilson_and_holm_from_statsmodels_give_the_textbook_numbers():
    z = 1.959963984540054
    for k, n in ((0, 5), (3, 10), (7, 7), (41, 100)):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        lo, hi = wilson_interval(k, n)
        assert lo == pytest.approx(centre - half, abs=1e-12)
        assert hi == pytest.approx(centre + half, abs=1e-12)
    assert all(np.isnan(wilson_interval(0, 0)))
    p = np.array([0.01, 0.04, np.nan, 0.03, 0.2])
    # Holm by hand: sorted 0.01, 0.03, 0.04, 0.2 times 4, 3, 2, 1, running max, capped at 1
    assert holm(p) == pytest.approx([0.04, 0.09, np.nan, 0.09, 0.2], nan_ok=True, abs=1e-15)


def test_the_exact_bootstrap_of_the_median_matches_resampling():
    """Above 400 values the median's bootstrap distribution is computed from the order
    statistics. Tolerance: two order statistics of the sample (resampling 20,000 times has a
    Monte-Carlo error of about one there)."""
    rng = np.random.default_rng(3)
    for n in (401, 800, 1501):
        x = np.sort(rng.lognormal(size=n))
        lo, hi = bootstrap_median_ci(x)
        r = np.random.default_rng(11)
        meds = np.concatenate([np.median(x[r.integers(0, n, size=(1000, n))], axis=1)
                               for _ in range(20)])
        mlo, mhi = np.percentile(meds, [2.5, 97.5])
        for exact, mc in ((lo, mlo), (hi, mhi)):
            assert abs(np.searchsorted(x, exact) - np.searchsorted(x, mc)) <= 2, (n, exact, mc)
    # up to 400 values: the seeded resampling of before, unchanged
    small = rng.normal(size=200)
    r = np.random.default_rng(20230101)
    meds = np.median(small[r.integers(0, 200, size=(2000, 200))], axis=1)
    assert bootstrap_median_ci(small) == pytest.approx(tuple(np.percentile(meds, [2.5, 97.5])))


# -- end to end ------------------------------------------------------------------------------------
E2E = """
[study]
name = "e2e-seeds"

[grid]
dataset = "digits"
architecture = ["sequential", "parallel"]
layers = [1, 2, 3, 4]
filters = 4
kernel = 3
pool = 1
epochs = 2
batch_size = 64
lr = 3e-3
max_train_examples = 300
seed = [0, 1]
"""


def test_a_digits_study_with_two_seeds_gets_a_forest_and_a_verdict(tmp_path):
    spec = tmp_path / "e2e.toml"
    spec.write_text(E2E)
    out = tmp_path / "res"
    r = run_cli("run", spec, "--results", out, "--executor", "local", "--quiet")
    assert r.returncode == 0, r.stderr
    assert (out / "figures" / "forest.png").stat().st_size > 5000
    assert (out / "figures" / "seed_noise.png").stat().st_size > 5000
    noise = pd.read_csv(out / "figures" / "seed_noise.csv")
    assert set(noise["architecture"]) == {"all", "sequential", "parallel"}
    st = pd.read_csv(out / "figures" / "stats.csv")
    top = st[(st["q_bin"] == "all") & (st["metric"] == "val_loss")].iloc[0]
    assert top["n"] == 3 and top["n_runs"] == 6  # layers 2-4; layers 1 is one network
    assert top["verdict"] in VERDICTS
    html = (out / "report.html").read_text()
    assert "Equivalence margin: ±10 %, the default" in html
    assert "<h2>Seed noise: re-seeding against swapping the architecture</h2>" in html
    # the analysis plan was saved by the run, before its first cell landed
    plan = json.loads((out / "analysis_plan.json").read_text())
    assert plan["before_data"] is True and plan["margin"] == 0.1 and plan["changes"] == []
    assert "The verdicts of this report follow the plan." in html

    # Only [analysis] changed: no cell runs, the spec is updated, the report is drawn again.
    spec.write_text(E2E + "\n[analysis]\nmargin = 0.3\n")
    r = run_cli("run", spec, "--results", out, "--executor", "local", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "ran 0 cells" in r.stdout and "unchanged" not in r.stdout
    assert "margin = 0.3" in (out / "spec.toml").read_text()
    assert "Equivalence margin: ±30 %, from the spec's [analysis] table" in (
        out / "report.html").read_text()
    st = pd.read_csv(out / "figures" / "stats.csv")
    loss = st["metric"].isin(["train_loss", "val_loss"])
    assert (st.loc[loss, "margin"] == 0.3).all() and st.loc[~loss, "margin"].isna().all()
    # ... and the change is recorded in the plan, after data: its verdicts are exploratory
    plan = json.loads((out / "analysis_plan.json").read_text())
    assert [(c["margin"], c["after_data"]) for c in plan["changes"]] == [(0.3, True)]
    assert (st.loc[loss, "exploratory"] == "exploratory (plan changed after data)").all()
    assert "exploratory (plan changed after data)" in (out / "report.html").read_text()
