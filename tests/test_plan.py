"""Planning for a verdict: `study plan --pilot`, and the analysis plan saved before the data.

Pilot and study stores are written through the store's writer (tests/test_power.py's
known_components_store); the plan is read and written by the real `study` command.
"""
from __future__ import annotations

import json
import math

import pandas as pd

import analysis
import analysis.plan_pilot
from study import analysis_plan

from conftest import run_cli
from test_power import known_components_store

PLANNED = """
[study]
name = "planned"

[grid]
dataset = "digits"
architecture = ["sequential", "parallel"]
layers = [2, 3, 4, 6]
filters = [4, 8, 16]
kernel = 3
seed = [0, 1]
epochs = 3
"""


def test_plan_with_a_pilot_prints_components_power_and_extensions(tmp_path):
    pilot = tmp_path / "pilot"
    known_components_store(pilot, 0.0004, 0.002, seeds=(10, 11), layers=(2, 3, 4),
                           filters=(4, 8, 16, 32))
    spec = tmp_path / "planned.toml"
    spec.write_text(PLANNED)
    r = run_cli("plan", spec, "--pilot", pilot, "--results", tmp_path / "res")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"power of the equivalence test, from pilot {pilot}" in out
    assert "digits · validation loss · all Q: 12 settings x 2 seeds, margin ±10 %, level 0.025" in out
    assert "sigma2_between" in out and "(80 % upper" in out and "sigma2_within" in out
    assert "power at ratio 1:" in out and "at the pilot's ratio" in out
    assert "80 % power:" in out
    assert "power: not computed" not in out


def test_plan_without_a_pilot_says_what_is_missing(tmp_path):
    spec = tmp_path / "planned.toml"
    spec.write_text(PLANNED)
    r = run_cli("plan", spec, "--results", tmp_path / "res")
    assert r.returncode == 0, r.stderr
    assert ("power: not computed: it needs sigma2_between (how the architecture effect varies "
            "between settings) and sigma2_within") in r.stdout
    assert "--pilot results/pilot" in r.stdout


def test_a_pilot_sharing_cells_with_the_study_is_refused(tmp_path):
    pilot = tmp_path / "pilot"
    # seeds 0 and 1 at layers 2-4, filters 4-16: cells of the planned study itself
    known_components_store(pilot, 0.0004, 0.002, seeds=(0, 1), layers=(2, 3, 4), filters=(4, 8, 16))
    before = sorted(p.name for p in pilot.rglob("*"))
    spec = tmp_path / "planned.toml"
    spec.write_text(PLANNED)
    r = run_cli("plan", spec, "--pilot", pilot, "--results", tmp_path / "res")
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "shares 36 cells with the planned study" in r.stderr
    assert "a pilot must be other seeds or other settings" in r.stderr
    assert sorted(p.name for p in pilot.rglob("*")) == before


def test_a_one_seed_pilot_gives_one_line(tmp_path):
    pilot = tmp_path / "pilot"
    known_components_store(pilot, 0.0004, 0.002, seeds=(10,), layers=(2, 3, 4), filters=(4, 8))
    spec = tmp_path / "planned.toml"
    spec.write_text(PLANNED)
    r = run_cli("plan", spec, "--pilot", pilot, "--results", tmp_path / "res")
    assert r.returncode == 3 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"study: pilot {pilot} has one seed per setting: seed noise (sigma2_within) cannot be "
        "estimated from it; run the pilot with two seeds per setting (seed = [0, 1] in [grid], "
        "other seeds than the planned study's)"]


def _verdict_state(root):
    res = analysis.compute.analyse(root, only=["forest"])
    return res, set(res.stats["exploratory"])


def test_a_margin_given_after_the_data_makes_the_verdicts_exploratory(tmp_path):
    root = tmp_path / "study"
    # the plan is saved (as `study run` does) before the first cell lands
    root.mkdir()
    analysis_plan.record_plan(root, {"margin": 0.1}, has_data=False)
    known_components_store(root, 0.0001, 0.001, seeds=(0, 1), layers=(2, 3, 4), filters=(4, 8, 16))
    res, why = _verdict_state(root)
    assert why == {""} and res.plan["before_data"] is True
    assert "follow the plan" in analysis.report_plan.plan_html(res)

    r = run_cli("report", root, "--margin", "0.2")
    assert r.returncode == 0, r.stderr
    st = pd.read_csv(root / "figures" / "stats.csv")
    loss = st["metric"].isin(["train_loss", "val_loss"])
    assert (st.loc[loss, "exploratory"] == "exploratory (plan changed after data)").all()
    html = (root / "report.html").read_text()
    assert "exploratory (plan changed after data)" in html and "<h2>The analysis plan</h2>" in html
    # the two families and their adjustment are named beside the statistics table
    assert "<b>Two families.</b> The headline rows" in html and "family (rows)" in html
    plan = json.loads((root / "analysis_plan.json").read_text())
    assert [(c["source"], c["margin"]) for c in plan["changes"]] == [("--margin", 0.2)]
    # without --margin the plan's own margin judges again, as planned
    assert _verdict_state(root)[1] == {""}


def test_a_spec_change_after_data_is_recorded_and_exploratory(tmp_path):
    root = tmp_path / "study"
    root.mkdir()
    analysis_plan.record_plan(root, {"margin": 0.1}, has_data=False)
    known_components_store(root, 0.0001, 0.001, seeds=(0, 1), layers=(2, 3), filters=(4, 8))
    line = analysis_plan.record_plan(root, {"margin": 0.3}, has_data=True)
    assert "analysis plan changed (margin 0.1, alpha 0.05 -> margin 0.3, alpha 0.05)" in line
    assert _verdict_state(root)[1] == {"exploratory (plan changed after data)"}


def test_a_store_from_before_plans_gets_one_marked_after_data(tmp_path):
    root = tmp_path / "old"
    known_components_store(root, 0.0001, 0.001, seeds=(0, 1), layers=(2, 3), filters=(4, 8))
    assert analysis_plan.read_plan(root) is None
    line = analysis_plan.record_plan(root, {}, has_data=True)
    assert "recorded now, after data" in line
    assert _verdict_state(root)[1] == {"exploratory (plan recorded after data)"}


def test_seed_margin_without_a_pilot_is_exploratory(tmp_path):
    root = tmp_path / "study"
    root.mkdir()
    analysis_plan.record_plan(root, {"margin": "seed"}, has_data=False)
    known_components_store(root, 0.0001, 0.001, seeds=(0, 1), layers=(2, 3, 4), filters=(4, 8))
    res = analysis.compute.analyse(root, only=["forest"], margin="seed")
    assert set(res.stats["exploratory"]) == {"exploratory (margin from the same data)"}
    assert "The margin comes from the same data it judges" in analysis.report._headline(res)


def test_seed_margin_from_a_pilot_is_fixed_in_the_plan(tmp_path):
    pilot = tmp_path / "pilot"
    known_components_store(pilot, 0.0004, 0.002, seeds=(10, 11), layers=(2, 3, 4), filters=(4, 8))
    root = tmp_path / "study"
    root.mkdir()
    spec_analysis = {"margin": "seed", "pilot": str(pilot),
                     "pilot_margins": analysis.plan_pilot.pilot_seed_margins(pilot)}
    analysis_plan.record_plan(root, spec_analysis, has_data=False)
    plan = analysis_plan.read_plan(root)
    margins = analysis_plan.margin_table(plan)
    noise = analysis.seed_noise(analysis.load(pilot))
    want = noise[(noise["q_bin"] == "all") & (noise["architecture"] == "all")
                 & (noise["metric"] == "val_loss")]["median_abs_log_ratio"].iloc[0]
    assert margins[("digits", "all", "val_loss")] == math.expm1(want)
    text = f'[analysis]\nmargin = "seed"\npilot = "{pilot}"\n'
    store = known_components_store(root, 0.0001, 0.001, seeds=(0, 1), layers=(2, 3, 4),
                                   filters=(4, 8))
    store.save_spec(store.spec_path.read_text() + text, "components", "tests")
    res = analysis.compute.analyse(root, only=["forest"])
    top = res.stats[(res.stats["q_bin"] == "all") & (res.stats["metric"] == "val_loss")].iloc[0]
    assert top["margin_source"] == "pilot seed noise"
    assert top["margin"] == margins[("digits", "all", "val_loss")]
    assert set(res.stats["exploratory"]) == {""}
