"""The sequential design: the [design] spec table, and `study run --until-decided` growing a
real digits study by a seed per look (real training, `--executor local`)."""
from __future__ import annotations

import json

import pytest

from analysis.report_looks import looks_html
from sweep import SpecError, parse_spec
from sweep.design import with_extension

from conftest import run_cli

# 3 settings x 2 architectures x 2 seeds = 12 cells at look 1, 6 more per look. A margin of
# 0.1 % cannot be shown with 3 settings: look 1 stays undecided, so the study grows.
GROW = """
[study]
name = "grow"

[grid]
dataset = "digits"
architecture = ["sequential", "parallel"]
layers = [2, 3, 4]
filters = 4
kernel = 3
epochs = 1
batch_size = 64
lr = 3e-3
max_train_examples = 200
seed = [0, 1]

[analysis]
margin = 0.001

[design]
looks = 2
extend = "seeds"
"""


def test_design_table_parses_and_its_extension_joins_the_grid():
    spec = parse_spec(GROW)
    assert spec.design == {"looks": 2, "extend": "seeds", "added_seeds": [], "base_seeds": [0, 1]}
    assert spec.grid["seed"] == [0, 1] and spec.analysis == {"margin": 0.001}
    grown = parse_spec(with_extension(GROW, [2]))
    assert grown.grid["seed"] == [0, 1, 2] and grown.design["added_seeds"] == [2]
    assert grown.design["base_seeds"] == [0, 1]
    # the design changes no cell_id: the grown grid holds every cell of the original
    assert {c.cell_id for c in spec.cells()} < {c.cell_id for c in grown.cells()}
    assert len(grown.cells()) == 18
    # a later look rewrites the tool's table instead of adding a second one
    assert with_extension(with_extension(GROW, [2]), [2, 3]).count("[design.extension]") == 1
    assert with_extension(with_extension(GROW, [2]), []).rstrip() == GROW.rstrip()
    assert parse_spec(GROW.replace('[design]\nlooks = 2\nextend = "seeds"\n', "")).design == {}


@pytest.mark.parametrize("design, says", [
    ("looks = 1", "'design.looks' must be a whole number from 2 to 5"),
    ("looks = 6", "'design.looks' must be a whole number from 2 to 5"),
    ('looks = "3"', "'design.looks' must be a whole number from 2 to 5"),
    ("looks = true", "'design.looks' must be a whole number from 2 to 5"),
    ('looks = 3\nextend = "settings"', "'design.extend' = 'settings' is not allowed"),
    ('extend = "seeds"', "[design] lacks 'looks'"),
    ("looks = 3\nlook = 2", "unknown key 'design.look'"),
    ("looks = 2\n[design.extension]\nseeds = [2, 3]", "adds 2 seeds, more than the 1 later"),
    ('looks = 3\n[design.extension]\nseeds = ["a"]', "holds only seeds = [whole numbers"),
])
def test_bad_design_values_give_one_line(design, says):
    text = GROW.split("[design]")[0] + "[design]\n" + design + "\n"
    with pytest.raises(SpecError) as e:
        parse_spec(text)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_until_decided_flags_give_one_line(tmp_path):
    spec = tmp_path / "plain.toml"
    spec.write_text(GROW.split("[design]")[0])
    r = run_cli("run", spec, "--results", tmp_path / "r", "--executor", "local", "--until-decided")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--until-decided needs a [design] table" in r.stderr
    r = run_cli("run", spec, "--results", tmp_path / "r", "--executor", "local", "--max-looks", "1")
    assert r.returncode == 2 and "--max-looks is a budget of --until-decided" in r.stderr
    assert not (tmp_path / "r").exists()


def test_until_decided_adds_a_seed_at_look_2_and_the_original_spec_continues(tmp_path):
    spec, res = tmp_path / "grow.toml", tmp_path / "res"
    spec.write_text(GROW)
    r = run_cli("run", spec, "--results", res, "--executor", "local", "--until-decided",
                "--no-figures")
    assert r.returncode == 0, r.stderr
    assert "[design] look 2: every setting gets seed 2" in r.stdout
    rec = json.loads((res / "design.json").read_text())
    assert rec["added_seeds"] == [2] and rec["base_seeds"] == [0, 1]
    assert [lk["seeds"] for lk in rec["looks"]] == [[0, 1], [0, 1, 2]]
    assert [lk["cells"] for lk in rec["looks"]] == [12, 18]
    assert rec["stopped"] == "the last planned look (2)" and rec["stopping_for_difference"] is False
    first, second = rec["looks"]
    assert {row["metric"] for row in first["rows"]} == {"train_loss", "val_loss"}
    for row in first["rows"]:  # an interim look: equivalent (stop) or undecided, never different
        assert row["decision"] == "undecided" and 0 < row["information_fraction"] < 1
        assert row["n"] == 3 and row["alpha_row"] == 0.025 and row["nominal_p"] < 0.025
    for row in second["rows"]:  # the last look: Lakens' verdict at the full spent level
        assert row["information_fraction"] == 1.0 and row["seeds_per_setting"] == 3
        assert row["decision"] in ("equivalent", "equivalent but different", "different",
                                   "inconclusive")
    assert "[design.extension]\nseeds = [2]" in (res / "spec.toml").read_text()
    html = looks_html(res)
    assert "information fraction" in html and "undecided" in html
    # the user's original spec, re-run, continues the grown study: nothing to run, no refusal
    r = run_cli("run", spec, "--results", res, "--executor", "local", "--no-figures")
    assert r.returncode == 0, r.stderr
    assert "ran 0 cells" in r.stdout and "18 of 18 cells done" in r.stdout
    assert "nothing to run: all 18 cells" in r.stderr


def test_a_budget_stops_after_look_1_with_the_verdicts_as_they_stand(tmp_path):
    spec, res = tmp_path / "grow.toml", tmp_path / "res"
    spec.write_text(GROW)
    r = run_cli("run", spec, "--results", res, "--executor", "local", "--until-decided",
                "--max-extra-cells", "5", "--no-figures")  # look 2 would add 6 cells
    assert r.returncode == 0, r.stderr
    assert "stopped after look 1: budget: --max-extra-cells 5" in r.stdout
    rec = json.loads((res / "design.json").read_text())
    assert len(rec["looks"]) == 1 and rec["added_seeds"] == []
    assert all(row["decision"] == "undecided" for row in rec["looks"][0]["rows"])
    # the other budget, on the same folder: look 1 again (nothing trains), stopped by it
    r = run_cli("run", spec, "--results", res, "--executor", "local", "--until-decided",
                "--max-looks", "1", "--no-figures")
    assert r.returncode == 0, r.stderr
    assert "ran 0 cells" in r.stdout and "stopped after look 1: budget: --max-looks 1" in r.stdout
    assert "seed 2" not in r.stdout and "seed = [0, 1]" in (res / "spec.toml").read_text()
    assert "[design.extension]" not in (res / "spec.toml").read_text()


def test_a_look_on_known_components_stops_equivalent_rows_early(tmp_path):
    """Statistics only (a store written through the store's writer, tests/test_power.py):
    40 settings with small spread decide *equivalent* at look 1 of 3; the fraction is the
    estimated I_1 / I_3 and the boundary Lan-DeMets O'Brien-Fleming's at alpha / m."""
    from analysis.looks import primary_look
    from analysis.sequential import boundaries, information_fraction
    from test_power import known_components_store

    known_components_store(tmp_path, 0.0001, 0.0004, seeds=(0, 1), layers=range(2, 6),
                           filters=range(4, 44, 4))
    rows = primary_look(tmp_path, seeds=2, seeds_last=4, last=False, history={}, decided={})
    assert {r["metric"] for r in rows} == {"train_loss", "val_loss"}
    for r in rows:
        assert r["n"] == 40 and r["alpha_row"] == 0.025
        t = information_fraction(40, r["sigma2_between"], r["sigma2_within"], 2, 4)
        assert r["information_fraction"] == pytest.approx(round(t, 2))
        assert t > 0.5  # seeds shrink only the within part
        assert r["boundary_z"] == pytest.approx(boundaries([t], 0.025)[0])
        assert r["decision"] == "equivalent" and r["p_tost"] < r["nominal_p"]
    # a row stopped at an earlier look is carried as it was, not tested again
    kept = {"dataset": "digits", "metric": "val_loss", "decision": "equivalent", "n": 40,
            "decided_at_look": 1}
    again = primary_look(tmp_path, 2, 4, False, {}, {"digits|val_loss": kept})
    assert [r for r in again if r["metric"] == "val_loss"] == [{**kept, "stopped_earlier": True}]
