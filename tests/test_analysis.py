"""The analysis package against real Parquet stores written through study.store.Store.

The stores hold synthetic rows with known relationships (parallel loss = 0.9 x sequential on
every pair, Q bins chosen by hand), so every number the analysis gives back can be checked.
"""
from __future__ import annotations

import datetime as dt
import html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import analysis
from analysis.stats import holm, wilson_interval
from study import schema
from study.rows import cell_row
from study.store import Store
from sweep import parse_spec, same_network

REPO = Path(__file__).resolve().parents[1]

TINY = """
[study]
name = "tiny"
description = "synthetic <store> for tests & checks"

[grid]
dataset = ["digits", "mnist"]
architecture = ["sequential", "parallel"]
layers = [1, 2, 4]
filters = [4, 8]
kernel = 3
epochs = 3
"""

N_TRAIN, N_CLASSES = 1000, 10
STARTED = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)  # every synthetic cell's start
# (layers, filters) -> n_params; Q = 10000 / n_params lands in a known bin (edges included).
N_PARAMS = {(1, 4): 20000, (1, 8): 5000, (2, 4): 2000, (2, 8): 500, (4, 4): 10000, (4, 8): 1000}
Q_BIN = {(1, 4): "[0,1)", (1, 8): "[1,3)", (2, 4): "[3,10)", (2, 8): "[10,inf)",
         (4, 4): "[1,3)", (4, 8): "[10,inf)"}
FIGS = ["forest", "equivalence_loss", "table2", "ratio_distribution", "factor_effects", "learning_curves",
        "equivalence_accuracy", "zoo"]


def seq_losses(cfg) -> tuple[float, float]:
    train = 0.01 * cfg["layers"] + 0.001 * cfg["filters"] + (0.5 if cfg["dataset"] == "mnist" else 0)
    return train, 2 * train + 0.01 * cfg["layers"]


def make_row(cell, status="ok", factor=0.9, error=None, mark=True) -> dict:
    """parallel = factor x sequential, except where the two are one network (layers 1): there
    the numbers are equal, and the row is marked as a run records it (unless mark=False, a
    store written before the marker existed). Built by study.rows.cell_row, as a run builds it."""
    cfg = cell.config
    train, val = seq_losses(cfg)
    copy = same_network.network_id(cfg) != cell.cell_id
    par = cfg["architecture"] != "sequential" and not copy
    if par:
        train, val = factor * train, factor * val
    result = {"status": status, "error": error, "n_params": N_PARAMS[(cfg["layers"], cfg["filters"])],
              "n_train": N_TRAIN, "n_classes": N_CLASSES, "epochs_done": 3, "wall_s": 2.5,
              "same_network_as": same_network.network_id(cfg) if copy and mark else None}
    if status == "ok":
        result.update(train_loss=train, val_loss=val, test_loss=val * 1.01,
                      train_acc=0.9, val_acc=0.85 if par else 0.80, test_acc=0.84 if par else 0.79)
    elif status == "diverged":
        result.update(train_loss=float("nan"), val_loss=float("nan"))
    return cell_row(cell.to_dict(), result, study="tiny", attempts=1, started_at=STARTED,
                    host="test-host", device="cpu")


def curve(row: dict) -> list[dict]:
    if row["status"] != "ok":
        return []
    return [{"cell_id": row["cell_id"], "epoch": e, "train_loss": row["train_loss"] * (4 - e),
             "val_loss": row["val_loss"] * (4 - e) ** 0.5, "train_acc": 0.5, "val_acc": 0.5,
             "wall_s": float(e)} for e in (1, 2, 3)]


def build(root: Path, text: str = TINY, keep=lambda c: True, status=lambda c: "ok",
          error=lambda c: None, epochs=lambda c: True) -> tuple[Store, list[dict]]:
    spec = parse_spec(text)
    store = Store(root)
    store.ensure_writable()
    store.save_spec(text, spec.name, "tests")
    rows = []
    for c in spec.cells():
        if not keep(c):
            continue
        row = make_row(c, status(c), error=error(c))
        store.write_result(row, curve(row) if epochs(c) else [])
        if not epochs(c):
            (store.epochs_dir / f"{c.cell_id}.parquet").unlink()
        rows.append(row)
    store.publish()  # what live readers see (analysis reads that): the epochs removed above too
    return store, rows


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """Every cell of TINY finished: 24 cells, 12 pairs, parallel = 0.9 x sequential."""
    root = tmp_path_factory.mktemp("full")
    _, rows = build(root)
    return root, rows


@pytest.fixture(scope="module")
def full_figures(full):
    root, _ = full
    return analysis.write_figures(root)


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """One dataset, missing twins, failed and diverged cells, a cell in flight, missing epochs."""
    root = tmp_path_factory.mktemp("partial")
    text = TINY.replace('dataset = ["digits", "mnist"]', 'dataset = "digits"').replace(
        "kernel = 3", "kernel = [3, 5]")
    cells = parse_spec(text).cells()
    seq = [c for c in cells if c["architecture"] == "sequential"]
    par = [c for c in cells if c["architecture"] == "parallel"]
    dropped = {par[0].cell_id, par[1].cell_id}  # two sequential cells without a twin
    in_flight = par[5].cell_id
    failed = {par[2].cell_id: "RuntimeError: CUDA out of memory <b>&</b> \"quotes\"",
              seq[3].cell_id: "ValueError: <script>alert('x')</script>"}
    diverged = {seq[4].cell_id: "loss became nan at epoch 2"}
    store, rows = build(
        root, text, keep=lambda c: c.cell_id not in dropped | {in_flight},
        status=lambda c: "failed" if c.cell_id in failed else
        "diverged" if c.cell_id in diverged else "ok",
        error=lambda c: failed.get(c.cell_id) or diverged.get(c.cell_id),
        epochs=lambda c: c.cell_id != seq[2].cell_id)
    store.checkpoints_dir.mkdir(exist_ok=True)
    store.checkpoint_path(in_flight).write_bytes(b"not a real checkpoint")
    return root, rows, {**failed, **diverged}


@pytest.fixture(scope="module")
def partial_report(partial):
    """write_report on the partial store (it draws every figure: done once for the module)."""
    return analysis.write_report(partial[0])


# -- layer 1: data ---------------------------------------------------------------------------
def test_load_adds_q_and_bins(full):
    root, rows = full
    df = analysis.load(root)
    assert len(df) == len(rows) == 24
    assert set(df.columns) >= set(schema.TRIAL_COLUMNS) | {"q", "q_bin"}
    for r in df.itertuples():
        key = (r.layers, r.filters)
        assert r.q == pytest.approx(N_TRAIN * N_CLASSES / N_PARAMS[key])
        assert str(r.q_bin) == Q_BIN[key]
    assert list(df["q_bin"].cat.categories) == ["[0,1)", "[1,3)", "[3,10)", "[10,inf)"]
    assert df["q_bin"].cat.ordered


def test_load_epochs_all_and_selected(full):
    root, rows = full
    ep = analysis.load_epochs(root)
    assert len(ep) == 3 * len(rows)
    one = analysis.load_epochs(root, [rows[0]["cell_id"], "no-such-cell"])
    assert list(one["epoch"]) == [1, 2, 3] and set(one["cell_id"]) == {rows[0]["cell_id"]}


def test_pairs_give_back_the_known_ratio(full):
    root, rows = full
    every = analysis.pairs(analysis.load(root))
    assert len(every) == 12 and every["pair_key"].is_unique
    # layers 1: one network on both sides, a control; the other 8 pairs are evidence
    assert list(every["same_network"]) == list(every["layers"] == 1)
    assert np.allclose(every.loc[every["same_network"], "val_loss_ratio"], 1.0)
    p = analysis.evidence(every)
    assert len(p) == 8 and (p["layers"] > 1).all()
    assert (p["architecture_a"] == "sequential").all() and (p["architecture_b"] == "parallel").all()
    for m in ("train_loss", "val_loss", "test_loss"):
        assert np.allclose(p[m + "_ratio"], 0.9)
        assert np.allclose(p[m + "_diff"], -0.1 * p[m + "_a"])
    assert np.allclose(p["val_acc_diff"], 0.05) and np.allclose(p["test_acc_ratio"], 0.84 / 0.79)
    p = every
    assert (p["q"] == p["q_a"]).all()
    assert [str(x) for x in p["q_bin"]] == [Q_BIN[(l, f)] for l, f in zip(p["layers"], p["filters"])]
    # the shared settings once, the per-side ones suffixed
    assert {"dataset", "layers", "filters", "kernel", "cell_id_a", "cell_id_b", "n_params_a"} <= set(p.columns)
    by_id = {r["cell_id"]: r for r in rows}
    for r in p.itertuples():
        assert by_id[r.cell_id_a]["pair_key"] == by_id[r.cell_id_b]["pair_key"] == r.pair_key


def test_pairs_keep_every_variant(tmp_path):
    text = """
[grid]
dataset = "digits"
architecture = ["sequential", "highway"]
layers = [1, 2]
filters = 4
kernel = 3
[grid.highway]
gate = ["full", "coupled"]
"""
    build(tmp_path, text)
    p = analysis.pairs(analysis.load(tmp_path), "sequential", "highway")
    assert len(p) == 4  # 2 sequential cells x 2 gate variants
    assert sorted(p["gate_b"]) == ["coupled", "coupled", "full", "full"]
    assert all("gate=" + g in v for g, v in zip(p["gate_b"], p["variant_b"]))
    assert (p["variant_a"] == "").all()
    assert p.groupby("cell_id_a").size().tolist() == [2, 2]
    assert "gate" in "".join(analysis.swept_factors(p))


def test_pairs_only_status_ok_and_unknown_arch(partial):
    root, rows, _ = partial
    df = analysis.load(root)
    p = analysis.pairs(df)
    ok_ids = set(df.loc[df["status"] == "ok", "cell_id"])
    assert set(p["cell_id_a"]) <= ok_ids and set(p["cell_id_b"]) <= ok_ids
    seq_ok = df[(df.status == "ok") & (df.architecture == "sequential")]
    par_ok = df[(df.status == "ok") & (df.architecture == "parallel")]
    assert len(p) == len(set(seq_ok.pair_key) & set(par_ok.pair_key))
    with pytest.raises(analysis.AnalysisError, match="unknown architecture"):
        analysis.pairs(df, "sequential", "resnet")


def test_table2_means_equal_hand_computed(full):
    root, rows = full
    t2 = analysis.table2(analysis.load(root))
    expect = {}
    for r in rows:
        key = (r["dataset"], r["architecture"], Q_BIN[(r["layers"], r["filters"])])
        expect.setdefault(key, []).append((r["train_loss"], r["val_loss"]))
    assert len(t2) == len(expect)
    for r in t2.itertuples():
        vals = expect[(r.dataset, r.architecture, r.q_bin)]
        assert r.n == len(vals)
        assert r.train_loss == pytest.approx(sum(v[0] for v in vals) / len(vals))
        assert r.val_loss == pytest.approx(sum(v[1] for v in vals) / len(vals))
    md = analysis.table2_markdown(t2)
    lines = md.splitlines()
    assert lines[0] == "| | Q∈[0,1) | Q∈[1,3) | Q∈[3,10) | Q∈[10,inf) |"
    assert [ln.split(" | ")[0] for ln in lines[2:6]] == [
        "| DIGITS sequential", "| DIGITS parallel", "| MNIST sequential", "| MNIST parallel"]
    (tr, va), = expect[("digits", "sequential", "[0,1)")]
    assert f"| DIGITS sequential | {tr:.5f} / {va:.5f} |" in md


# -- statistics -------------------------------------------------------------------------------
def test_stats_give_back_ratio_and_win_rate(full):
    root, _ = full
    s = analysis.stats(analysis.pairs(analysis.load(root)))
    assert set(s["metric"]) == {"train_loss", "val_loss"}
    assert np.allclose(s["median_ratio"], 0.9)
    assert np.allclose(s["ratio_ci_low"], 0.9) and np.allclose(s["ratio_ci_high"], 0.9)
    assert (s["win_rate_b"] == 1.0).all() and (s["ties"] == 0).all()
    per_ds = s[s["q_bin"] == "all"]
    # 6 pairs per dataset, 2 of them (layers 1) one network: 4 comparisons, no ties
    assert sorted(per_ds["dataset"].unique()) == ["digits", "mnist"] and (per_ds["n"] == 4).all()
    # Exact two-sided signed-rank p for 4 differences of one sign: 2 / 2**4.
    assert np.allclose(per_ds["wilcoxon_p"], 2 / 16)
    # Wilson interval of 4/4: [4 / (4 + z^2), 1].
    z2 = 1.959963984540054 ** 2
    assert np.allclose(per_ds["win_ci_low"], 4 / (4 + z2)) and np.allclose(per_ds["win_ci_high"], 1)
    by_bin = s[(s["q_bin"] != "all") & (s["dataset"] == "digits") & (s["metric"] == "val_loss")]
    # [0,1) held only the layers-1 control (1, 4): no comparison there
    assert dict(zip(by_bin["q_bin"], by_bin["n"])) == {"[1,3)": 1, "[3,10)": 1, "[10,inf)": 2}
    assert (s["wilcoxon_p_holm"] >= s["wilcoxon_p"]).all()


def test_same_network_pairs_are_controls_not_evidence(full):
    """The hand-made store: 12 pairs, 4 of them at layers 1 (one network, equal numbers)."""
    root, rows = full
    every = analysis.pairs(analysis.load(root))
    ctl = analysis.control_summary(every)
    assert ctl == {"n": 4, "identical": 4, "recorded_once": 4, "differing": [], "max_abs_diff": 0.0}
    assert len(analysis.controls(every)) == 4 and len(analysis.evidence(every)) == 8
    s = analysis.stats(every)  # given every pair, statistics still count the evidence only
    assert (s.loc[s["q_bin"] == "all", "n"] == 4).all() and (s["ties"] == 0).all()
    # the win rate is 4/4 per dataset, not 4/6 with two ties
    assert (s.loc[s["q_bin"] == "all", "win_rate_b"] == 1.0).all()


def test_copies_found_by_rule_in_a_store_without_the_marker(tmp_path):
    """A store written before same_network_as: the rule still finds the same-network pairs;
    and when they differ (a broken pairing) every output says so."""
    build(tmp_path / "old", keep=lambda c: c["dataset"] == "digits")
    for part in (tmp_path / "old" / "trials").glob("*.parquet"):
        t = pq.read_table(part)
        pq.write_table(t.drop(["same_network_as"]), part)  # the old schema
    every = analysis.pairs(analysis.load(tmp_path / "old"))
    ctl = analysis.control_summary(every)
    assert (ctl["n"], ctl["identical"], ctl["recorded_once"]) == (2, 2, 0)

    spec = parse_spec(TINY)
    store = Store(tmp_path / "broken")
    store.ensure_writable()
    store.save_spec(TINY, spec.name, "tests")
    for c in spec.cells():
        if c["dataset"] == "digits":
            row = make_row(c, mark=False)
            if c["architecture"] == "parallel" and c["layers"] == 1:
                row["val_loss"] *= 1.5  # one network, different numbers: must be flagged
            store.write_result(row, curve(row))
    store.close_live()  # as a run's end does: every landed cell in the live manifest
    every = analysis.pairs(analysis.load(tmp_path / "broken"))
    ctl = analysis.control_summary(every)
    assert (ctl["n"], ctl["identical"], len(ctl["differing"])) == (2, 0, 2)
    text = analysis.write_report(tmp_path / "broken").read_text()
    assert "WARNING: 2 of 2 same-network pairs are NOT identical" in text
    notes = (tmp_path / "broken" / "figures" / "NOTES.txt").read_text()
    assert "2 of 2 same-network sequential/parallel pairs differ" in notes


def test_wilson_and_holm_known_values():
    lo, hi = wilson_interval(5, 10)
    assert (float(lo), float(hi)) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert np.isnan(wilson_interval(0, 0)[0])
    assert holm([0.01, 0.04, np.nan, 0.03]) == pytest.approx([0.03, 0.06, np.nan, 0.06], nan_ok=True)


def test_stats_of_no_pairs_is_empty():
    assert analysis.stats(pd.DataFrame()).empty


# -- figures ------------------------------------------------------------------------------------
def test_write_figures_writes_every_file(full, full_figures):
    root, _ = full
    paths = full_figures
    out = root / "figures"
    for stem in FIGS:
        for ext in ("png", "pdf"):
            f = out / f"{stem}.{ext}"
            assert f in paths and f.stat().st_size > 1000, f
    for name in ("table2.csv", "table2.md", "stats.csv", "NOTES.txt"):
        assert (out / name) in paths and (out / name).stat().st_size > 0
    # one seed per setting: the only figure skipped is the seed noise, and it says what to do
    assert paths.notes == ["seed_noise: skipped, one seed per setting: no seed noise to measure "
                           "(add seed = [0, 1] to [grid])"]
    assert "seed_noise: skipped, one seed per setting" in (out / "NOTES.txt").read_text()
    assert (out / "equivalence_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "zoo.pdf").read_bytes()[:5] == b"%PDF-"
    t2 = pd.read_csv(out / "table2.csv")
    assert list(t2.columns) == ["dataset", "architecture", "q_bin", "n", "train_loss", "val_loss"]
    st = pd.read_csv(out / "stats.csv")
    assert np.allclose(st["median_ratio"], 0.9)


def test_learning_curves_for_chosen_pairs_and_unknown_keys(full, tmp_path):
    root, rows = full
    work = tmp_path / "copy"
    shutil.copytree(root, work)
    key = next(r["pair_key"] for r in rows if r["layers"] > 1)  # layers 1: controls only
    res = analysis.write_figures(work, pairs=[key[:10], "ffff0000nothere"], only="learning_curves")
    assert (work / "figures" / "learning_curves.png").stat().st_size > 0
    assert any("ffff0000nothere" in n for n in res.notes)
    res = analysis.write_figures(work, pairs=["nothere"], only=["learning_curves"])
    assert not (work / "figures" / "learning_curves.png").exists()  # stale file removed
    assert any(n.startswith("learning_curves: skipped") for n in res.notes)


def test_plot_functions_return_figures(full):
    root, _ = full
    df = analysis.load(root)
    p = analysis.pairs(df)
    from matplotlib.figure import Figure
    for fig in (analysis.plot_equivalence(p), analysis.plot_table2(analysis.table2(df)),
                analysis.plot_ratio_distribution(p), analysis.plot_factor_effects(p),
                analysis.plot_learning_curves(p, analysis.load_epochs(root), rows=analysis.evidence(p).index[:2]),
                analysis.plot_zoo(df)):
        assert isinstance(fig, Figure) and fig.axes
    reused = Figure()
    assert analysis.plot_zoo(df, fig=reused) is reused


def test_every_figure_function_on_a_store_with_missing_bins(tmp_path):
    """Only filters 8: Q bins [0,1) and [3,10) hold no cell. Every function still draws, the
    Table 2 heat map marks the empty bins, and every log axis carries at least two labels."""
    build(tmp_path, keep=lambda c: c["filters"] == 8)
    df = analysis.load(tmp_path)
    assert set(df["q_bin"].astype(str)) == {"[1,3)", "[10,inf)"}
    p = analysis.pairs(df)
    t2 = analysis.table2(df)
    figs = {"equivalence": analysis.plot_equivalence(p), "table2": analysis.plot_table2(t2),
            "ratio": analysis.plot_ratio_distribution(p), "factors": analysis.plot_factor_effects(p),
            "curves": analysis.plot_learning_curves(p, analysis.load_epochs(tmp_path),
                                                    rows=analysis.evidence(p).index[:2]),
            "zoo": analysis.plot_zoo(df),
            "accuracy": analysis.plot_table2(analysis.table2(df, ("train_acc", "val_acc")))}
    for name, fig in figs.items():
        fig.canvas.draw()
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                if axis.get_scale() == "log":
                    labels = [t.get_text() for t in axis.get_ticklabels() if t.get_text()]
                    assert len(labels) >= 2, (name, labels)
    heat = figs["table2"]
    texts = [t.get_text() for ax in heat.axes for t in ax.texts]
    # 2 datasets x 2 architectures x 2 empty bins x (train, val) panels
    assert texts.count("–") == 16
    assert sum("n=" in t for t in texts) == 16  # every filled cell says its n
    # one rule: every loss axis log (equivalence, curves, zoo), accuracy axes linear
    assert {ax.get_xscale() for ax in figs["equivalence"].axes if ax.get_xlabel()} == {"log"}
    assert {ax.get_yscale() for ax in figs["curves"].axes if ax.get_visible()} == {"log"}
    assert {ax.get_xscale() for ax in analysis.plot_equivalence(p, ("val_acc", "test_acc")).axes
            if ax.get_xlabel()} == {"linear"}
    # learning curves are titled by the settings, never by a hash
    titles = [ax.get_title() for ax in figs["curves"].axes if ax.get_visible() and ax.get_title()]
    assert titles and all("pair " not in t and "layers" in t for t in titles)


def test_partial_store_gives_every_figure_or_a_note(partial, partial_report):
    root, rows, errors = partial
    out = root / "figures"
    notes = (out / "NOTES.txt").read_text().splitlines()[1:]
    for stem in FIGS:
        drawn = (out / f"{stem}.png").exists() and (out / f"{stem}.pdf").exists()
        noted = any(n.startswith(f"- {stem}") for n in notes)
        assert drawn or noted, stem
    # one dataset, but pairs exist: the pair figures are drawn
    assert (out / "equivalence_loss.png").exists() and (out / "factor_effects.png").exists()
    st = pd.read_csv(out / "stats.csv")
    assert set(st["dataset"]) == {"digits"} and np.allclose(st["median_ratio"], 0.9)


def test_store_without_pairs_notes_every_pair_figure(tmp_path):
    build(tmp_path, status=lambda c: "failed" if c["architecture"] == "parallel" else "ok",
          error=lambda c: "boom" if c["architecture"] == "parallel" else None)
    res = analysis.write_figures(tmp_path)
    for stem in ("equivalence_loss", "ratio_distribution", "factor_effects", "learning_curves",
                 "equivalence_accuracy"):
        assert any(n.startswith(stem) and "no complete pairs" in n for n in res.notes), stem
        assert not (tmp_path / "figures" / f"{stem}.png").exists()
    assert (tmp_path / "figures" / "table2.png").exists() and (tmp_path / "figures" / "zoo.png").exists()
    assert "no finished (status ok) parallel cell" in (tmp_path / "figures" / "NOTES.txt").read_text()


def test_empty_store_and_not_a_store(tmp_path):
    (tmp_path / "empty").mkdir()
    Store(tmp_path / "empty").save_spec(TINY, "tiny", "tests")
    res = analysis.write_figures(tmp_path / "empty")
    assert {p.name for p in res} == {"NOTES.txt"}
    assert len(res.notes) >= len(FIGS)
    report = analysis.write_report(tmp_path / "empty").read_text()
    assert "No figure could be drawn" in report and "<dd>24</dd>" in report
    (tmp_path / "plain").mkdir()
    for fn in (analysis.write_figures, analysis.write_report):
        with pytest.raises(analysis.AnalysisError, match="not a results store"):
            fn(tmp_path / "plain")
        with pytest.raises(analysis.AnalysisError, match="not a folder"):
            fn(tmp_path / "missing")
    with pytest.raises(analysis.AnalysisError, match="two different"):
        analysis.write_figures(tmp_path / "empty", compare=("parallel", "parallel"))


def test_unreadable_part_is_noted_not_moved(tmp_path):
    store, rows = build(tmp_path)
    bad = store.trials_dir / "corrupt.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    store.publish()  # as the driver's next landing would: live readers (analysis) read it
    res = analysis.write_figures(tmp_path, only="zoo")
    assert any("trials/corrupt.parquet" in n for n in res.notes)
    assert bad.exists() and not store.quarantine_dir.exists()


# -- report ------------------------------------------------------------------------------------
def test_report_is_self_contained(partial, partial_report):
    root, rows, errors = partial
    path = partial_report
    assert path == root / "report.html"
    text = path.read_text()
    pngs = sorted((root / "figures").glob("*.png"))
    imgs = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(imgs) == len(pngs) >= 5
    assert not re.search(r'(src|href)="(?!data:)', text) and "<script" not in text
    for err in errors.values():
        assert html.escape(err, quote=True) in text
    assert "<script>alert" not in text and "synthetic &lt;store&gt; for tests &amp; checks" in text
    ok = sum(r["status"] == "ok" for r in rows)
    grid = len(parse_spec(Store(root).spec_path.read_text()).cells())
    for label, value in (("cells in the grid", grid), ("done (ok)", ok), ("failed", 2),
                         ("diverged", 1), ("running", 1), ("pending", grid - len(rows) - 1)):
        assert f"<dt>{label}</dt><dd>{value}</dd>" in text, label
    # a same-network copy's row copies its trained cell's time: counted once
    trained = [r for r in rows if not r.get("same_network_as")]
    assert len(trained) < len(rows)
    assert "compute time" in text and f"({len(trained) * 2.5:,.0f} s)" in text
    assert "DIGITS sequential" in text and "Wilcoxon" in text
    assert "What they do not show" in text and "Holm" in text and "TOST" in text
    assert 'name = &quot;tiny&quot;' in text  # the spec source, escaped


def test_report_leads_with_its_headline(full, tmp_path):
    root, rows = full
    work = tmp_path / "copy"
    shutil.copytree(root, work)
    text = analysis.write_report(work).read_text()
    head = text[text.index("<h2>Headline</h2>"):text.index("<h2>Progress</h2>")]
    # the margin and where it came from, then per dataset and loss the verdict with its numbers:
    # parallel = 0.9 x sequential on every setting, outside the default ±10 % (1/1.1 = 0.909)
    assert "Equivalence margin: ±10 %, the default" in head
    for ds in ("DIGITS", "MNIST"):
        for loss in ("train loss", "validation loss"):
            assert (f"<b>{ds}, {loss}</b>: parallel and sequential are <b>different</b>: "
                    "parallel's loss is about 10 % lower than sequential's (ratio 0.900, 97.5 % "
                    "interval [0.900, 0.900] not inside the ±10 % margin; t-test p = 0; n = 4 "
                    "settings)") in head
    assert ("Headline rows are the primary family: Holm-adjusted among themselves (m = 4) at "
            "alpha 0.05, each interval at the verdict's level, 1 − 2α/m = 97.5 % (Bonferroni).") in head
    assert "equivalent" not in head and "reliably" not in head
    assert "No Q bin has the 3 settings a verdict needs" in head
    assert "Each setting was trained with one seed" in head and "seed = [0, 1]" in head
    assert "4 same-network pairs, all identical: the pairing works" in head
    assert text.index("<h2>Headline</h2>") < text.index("<h2>Table 2")
    # Table 2 with n, its accuracy version, numbered captioned figures, environment
    assert "(n = 2)" in text and "<h2>Table 2 of accuracy" in text
    assert "0.8000 / 0.8500" not in text and "0.9000 / 0.8500 (n = " in text
    n_img = text.count("<img ")
    for k in range(1, n_img + 1):
        assert f"<b>Figure {k}.</b>" in text
    assert "error bars: percentile-bootstrap 95% interval" in text and "n = 8 settings" in text
    assert "Every loss axis is logarithmic" in text
    env = text[text.index("<h2>Environment</h2>"):]
    assert "torch" in env and "devices" in env and "hosts" in env and "compute time" in env


def test_analysis_never_imports_torch_or_ray(full, tmp_path):
    root, _ = full
    work = tmp_path / "copy"
    shutil.copytree(root, work)
    (tmp_path / "empty").mkdir()
    Store(tmp_path / "empty").save_spec(TINY, "tiny", "tests")
    # Every analysis module imports what it needs at the top, so one cheap run of each writer
    # (a figure on a full store, the report on an empty one) covers them all.
    code = ("import sys, analysis; analysis.write_figures(sys.argv[1], only='zoo'); "
            "analysis.write_report(sys.argv[2]); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'ray')]; "
            "assert not bad, bad; print('clean')")
    r = subprocess.run([sys.executable, "-c", code, str(work), str(tmp_path / "empty")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "clean" in r.stdout, r.stderr[-2000:]


# -- the report in a real browser ---------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
PROBE = """<script>
window.__errors = [];
addEventListener('error', function (e) {
  __errors.push('error: ' + (e.message || (e.target && e.target.outerHTML || '').slice(0, 80)));
}, true);
document.addEventListener('securitypolicyviolation', function (e) {
  __errors.push('csp: ' + e.violatedDirective + ' ' + e.blockedURI);
});
var __ce = console.error;
console.error = function () { __errors.push('console: ' + [].join.call(arguments, ' ')); };
addEventListener('load', function () {
  var im = [].slice.call(document.images);
  var out = document.createElement('pre'); out.id = '__probe';
  var wide = [].slice.call(document.querySelectorAll('body *')).filter(function (e) {
    return e.getBoundingClientRect().right > document.documentElement.clientWidth + 1;
  }).map(function (e) { return e.tagName; });
  out.textContent = JSON.stringify({widths: im.map(function (i) { return i.naturalWidth; }),
                                    errors: __errors, overflow: wide,
                                    scroll: document.documentElement.scrollWidth,
                                    client: document.documentElement.clientWidth});
  document.body.appendChild(out);
});
</script>"""


def _chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
             "--window-size=1280,4000", "--virtual-time-budget=10000",
             *(extra or ("--dump-dom",)), page.as_uri()]
    return subprocess.run([CHROMIUM, *flags], capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(partial_report, tmp_path):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("no headless browser at /usr/bin/chromium; apt-get install -y chromium")
    report = partial_report
    text = report.read_text()
    n_img = text.count("<img ")
    # A copy with a probe script (the report has none, and its policy forbids scripts): the
    # probe writes each image's naturalWidth and every error it sees into the DOM.
    probe = tmp_path / "probe.html"
    from analysis.report import CSP
    probe.write_text(text.replace(CSP, CSP + "; script-src 'unsafe-inline'")
                     .replace('<meta charset="utf-8">', '<meta charset="utf-8">' + PROBE, 1))
    r = _chromium(probe, tmp_path / "profile")
    m = re.search(r'<pre id="__probe">(.*?)</pre>', r.stdout, re.S)
    assert m, f"no probe output; chromium rc={r.returncode}: {r.stderr[-1500:]}"
    got = json.loads(html.unescape(m.group(1)))
    assert len(got["widths"]) == n_img >= 5
    assert all(w > 0 for w in got["widths"]), got["widths"]
    assert got["errors"] == []
    # nothing wider than the page: no horizontal scroll, no element past the right edge
    assert got["scroll"] <= got["client"] and got["overflow"] == [], got
    # The report itself, untouched: no console message of any kind (a policy violation or a
    # failed load would log one).
    r = _chromium(report, tmp_path / "profile2")
    console = [ln for ln in r.stderr.splitlines() if "CONSOLE" in ln]
    assert console == [], console
    assert "Study report: tiny" in r.stdout
    shot = tmp_path / "report.png"
    r = _chromium(report, tmp_path / "profile3", f"--screenshot={shot}", "--hide-scrollbars")
    assert shot.stat().st_size > 10_000, r.stderr[-1500:]


# -- scale ---------------------------------------------------------------------------------------
PAPER_SIZE = """
[study]
name = "scale"
[grid]
dataset = ["mnist", "cifar10"]
architecture = ["sequential", "parallel"]
layers = [1, 2, 3, 4, 6, 8]
filters = [8, 16, 32, 64]
kernel = [3, 5, 7]
activation = ["relu", "tanh"]
batch_norm = [false, true]
lr = [3e-3, 1e-3, 3e-4]
seed = [0, 1]
"""


def test_write_figures_at_paper_scale(tmp_path):
    """6,912 cells (the paper's count), with noise. The rows go into a few multi-row parts,
    which Store.read_trials reads like per-cell parts: this times the analysis itself, not
    the file-per-cell reading, which belongs to the store."""
    spec = parse_spec(PAPER_SIZE)
    cells = spec.cells()
    assert len(cells) == 6912
    store = Store(tmp_path)
    store.ensure_writable()
    store.save_spec(spec.source, spec.name, spec.origin)
    rng = np.random.default_rng(0)
    n = len(cells)
    cfg = pd.DataFrame([c.config for c in cells])
    n_params = (cfg["filters"] ** 2 * cfg["kernel"] ** 2 * cfg["layers"] + 100 * cfg["filters"]).to_numpy()
    n_train = np.where(cfg["dataset"] == "mnist", 54000, 45000)
    base = np.where(cfg["dataset"] == "mnist", 0.05, 1.0) * np.exp(rng.normal(0, 0.5, n))
    noise = np.where((cfg["architecture"] == "parallel") & (cfg["layers"] > 1),
                     np.exp(rng.normal(np.log(0.95), 0.1, n)), 1)  # layers 1: one network
    status = rng.choice(["ok", "failed", "diverged"], p=[0.97, 0.02, 0.01], size=n)
    rows = []
    for i, c in enumerate(cells):
        loss = float(base[int(c.pair_key[:8], 16) % n] * noise[i]) if status[i] == "ok" else None
        result = {"status": str(status[i]), "n_params": int(n_params[i]),
                  "n_train": int(n_train[i]), "n_classes": 10, "train_loss": loss,
                  "val_loss": loss and loss * 1.3, "val_acc": 0.9, "test_acc": 0.9,
                  "wall_s": 60.0, "error": None if status[i] == "ok" else "synthetic failure"}
        rows.append(cell_row(c.to_dict(), result, study=spec.name, attempts=1,
                             started_at=STARTED, host="test-host", device="cpu"))
    for k in range(8):
        pq.write_table(schema.conform(rows[k::8], schema.TRIALS), store.trials_dir / f"part{k}.parquet")
    # curves for a few pairs only: the figure must pick among pairs that have them
    for row in [r for r in rows if r["layers"] > 1][:40]:  # layers 1 pairs are controls
        if row["status"] == "ok":
            pq.write_table(schema.conform(curve(row), schema.EPOCHS),
                           store.epochs_dir / f"{row['cell_id']}.parquet")
    t0 = time.perf_counter()
    res = analysis.write_figures(tmp_path)
    took = time.perf_counter() - t0
    print(f"\nwrite_figures on {n} cells: {took:.1f} s; notes: {res.notes}")
    assert res.notes == []
    assert took < 120
    assert len(analysis.pairs(analysis.load(tmp_path))) > 3000


@pytest.mark.parametrize("width_in", [2.5, 4.0, 8.0])
def test_log_x_tick_labels_never_overlap(width_in):
    # equivalence_loss.png once printed "0.00050.001": 1-2-5 ticks on a narrow log x axis.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from analysis.ticks import log_axis

    for lo, hi in ((3e-4, 0.025), (0.05, 0.25), (2e3, 6e4), (1e-6, 10.0)):
        fig = Figure(figsize=(width_in, 2.5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot([lo, hi], [1, 2])
        log_axis(ax, "x", [lo, hi])
        fig.canvas.draw()
        boxes = sorted((t.get_window_extent() for t in ax.get_xticklabels()
                        if t.get_text() and lo <= t.get_position()[0] <= hi),
                       key=lambda b: b.x0)
        assert len(boxes) >= 2, (lo, hi, width_in)
        assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), (lo, hi, width_in)


def _outside_canvas(fig) -> str | None:
    """Whether anything drawn (labels, titles, tick labels, legend) runs past the canvas: the
    figure's tight box covers exactly what is drawn (ticks outside the limits are not)."""
    fig.canvas.draw()
    tight = fig.get_tightbbox(fig.canvas.get_renderer())
    w, h = fig.get_size_inches()
    if tight.x0 < -0.01 or tight.y0 < -0.01 or tight.x1 > w + 0.01 or tight.y1 > h + 0.01:
        return f"drawn box {tight.bounds} outside the {w} x {h} in canvas"
    return None


def test_every_label_and_title_fits_inside_its_figure(full):
    """factor_effects once cut its y label ("median log10(parallel/sequential)") at the top."""
    import matplotlib as mpl

    from analysis import draw

    root, _ = full
    df = analysis.load(root)
    p = analysis.pairs(df)
    st = analysis.settings(p)
    with mpl.rc_context(draw.STYLE):
        figs = {"factor_effects": draw.plot_factor_effects(st),
                "forest": draw.plot_forest(analysis.stats(st)),
                "equivalence_loss": draw.plot_equivalence(st),
                "ratio_distribution": draw.plot_ratio_distribution(st)}
    # the training-time figure, from stats rows of the shape analysis.stats gives them
    timed = pd.DataFrame([{"a": "sequential", "b": "parallel", "dataset": "digits", "q_bin": q,
                           "metric": "train_s_per_epoch", "n": 5, "median_ratio": 0.95,
                           "ratio_ci_low": 0.6, "ratio_ci_high": 1.05} for q in ("all", "[0,1)")])
    with mpl.rc_context(draw.STYLE):  # drawn and saved in the report's style
        figs["train_time"] = draw.plot_time_ratio(timed)
        for name, fig in figs.items():
            assert _outside_canvas(fig) is None, name
