"""The analytic FLOP count of sweep.cost against torch's FlopCounterMode, and the cost that
`study plan` prints (text and --json)."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from study.models import build_for_cell
from sweep import parse_spec
from sweep.cost import PEAK_FLOPS, cell_flops, examples, forward_flops
from sweep.params import DATASET_SIZES

from conftest import run_cli

BASE = {"dataset": "mnist", "layers": 3, "filters": 8, "kernel": 3, "activation": "relu",
        "batch_norm": False, "head": "flatten", "pool": 2, "epochs": 2, "val_fraction": 0.1}
CELLS = [
    {"architecture": "sequential"},
    {"architecture": "parallel", "kernel": 5, "pool": 1, "batch_norm": True},
    {"architecture": "parallel", "dataset": "cifar10", "kernel": 4, "pool": 4, "head": "gap"},
    {"architecture": "plain", "layers": 1, "filters": 16},
    {"architecture": "highway", "gate": "full", "gate_kernel": 3},
    {"architecture": "highway", "gate": "coupled"},
    {"architecture": "merge_and_run", "branches": 2},
    {"architecture": "deeply_fused", "shallow": "conv", "fuse_every": 2, "layers": 5},
    {"architecture": "learned_connectivity", "branches": 2, "active_inputs": 1, "layers": 1},
]


@pytest.mark.parametrize("over", CELLS, ids=lambda o: "-".join(map(str, o.values())))
def test_forward_flops_match_flop_counter_mode(over):
    config = {**BASE, **over}
    ds = DATASET_SIZES[config["dataset"]]
    torch.manual_seed(0)
    model, _ = build_for_cell(config, ds.channels, ds.classes)
    model.eval()
    x = torch.randn(2, ds.channels, ds.height, ds.width)
    with FlopCounterMode(display=False) as fwd:
        model(x)
    assert fwd.get_total_flops() == 2 * forward_flops(config)
    # backward = 2 x forward, but for the stem's input gradient, which no one asks for
    model.train()
    with FlopCounterMode(display=False) as step:
        model(x).sum().backward()
    stem = 2 * ds.height * ds.width * config["filters"] * ds.channels * config["kernel"] ** 2
    assert 3 * fwd.get_total_flops() - 2 * stem == step.get_total_flops()


def test_cell_flops_follow_the_written_convention():
    config = {**BASE, "architecture": "sequential", "max_train_examples": 1000}
    n_train, n_val, n_test = examples(config)
    assert (n_train, n_val, n_test) == (1000, 6000, 10_000)
    fwd = forward_flops(config)
    assert cell_flops(config) == 2 * fwd * (3 * 1000 + 6000) + fwd * (1000 + 6000 + 10_000)


SPEC = """
[study]
name = "cost"
[grid]
dataset = ["digits", "mnist"]
architecture = ["sequential", "parallel"]
layers = [1, 2]
filters = 4
kernel = 3
epochs = 3
"""


def test_plan_prints_the_cost_and_json(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(SPEC)
    r = run_cli("plan", p, "--results", tmp_path / "res", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # 8 cells, parallel@1 is the sequential net twice: 6 networks train
    assert out["cells"] == 8 and out["networks"] == 6
    cost = out["cost"]
    cells = [c for c in parse_spec(SPEC).cells() if not (c["architecture"] == "parallel"
                                                           and c["layers"] == 1)]
    assert cost["total_flops"] == sum(cell_flops(c.config) for c in cells)
    assert cost["hours_at_bf16_peak"] == pytest.approx(cost["total_flops"] / PEAK_FLOPS["bf16"] / 3600)
    by_ds = {d["dataset"]: d for d in cost["datasets"]}
    assert by_ds["mnist"]["networks"] == 3 and by_ds["mnist"]["min_cell_flops"] <= by_ds["mnist"]["max_cell_flops"]
    r = run_cli("plan", p, "--results", tmp_path / "res")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("cost", "  digits", "  mnist", "  total"))]
    assert lines[0].startswith("cost (training FLOPs; hours at one H100 SXM's dense peak, 989 TFLOPS")
    assert any("mnist    3 networks" in ln and "BF16" in ln and "TF32" in ln for ln in lines)
    assert not (tmp_path / "res").exists()  # plan writes nothing
