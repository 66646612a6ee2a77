"""Same-network copies: every rule of sweep.same_network is a bit-identical network under torch, and
`study run` trains such a network once and records it under both cells (CLI, local executor;
and through Ray)."""
from __future__ import annotations

import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from study.models import build_for_cell, n_params
from study.options import TrialOptions
from study.runner import RunOptions, run_study
from study.store import Store
from study.train import train_epoch
from sweep import parse_spec, same_network

from conftest import run_cli

ZOO = """
[grid]
dataset = "digits"
architecture = ["sequential", "parallel", "highway", "merge_and_run", "deeply_fused",
                "learned_connectivity"]
layers = [1, 3]
filters = 4
kernel = 3
batch_norm = [false, true]
[grid.highway]
gate = ["residual", "coupled"]
[grid.merge_and_run]
branches = [1, 2]
[grid.deeply_fused]
shallow = ["identity", "conv"]
fuse_every = [1, 2]
[grid.learned_connectivity]
branches = [1, 2]
"""


def _train(config: dict, steps: int = 4, precision: str = "fp32", parallel_body: str = "loop"):
    """A few AdamW steps of the tool's own epoch (train.train_epoch, one batch each) on fixed
    random data, seeded as train.py seeds a cell."""
    torch.manual_seed(config["seed"])
    model, _ = build_for_cell(config, in_channels=1, n_classes=10)
    if config["architecture"] == "parallel":
        model.parallel_body = parallel_body
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    losses = [train_epoch(model, opt, x, y, len(x), config["seed"], epoch, steps, precision)[0]
              for epoch in range(1, steps + 1)]
    model.eval()
    with torch.no_grad():
        out = model(x)
    return losses, out, n_params(model)


def test_same_network_rules_are_bit_identical():
    """Every cell the rules call the sequential network trains to the same losses, outputs
    and parameter count as the sequential cell, bit for bit; every other cell differs."""
    cells = parse_spec(ZOO).cells()
    by_id = {c.cell_id: c for c in cells}
    claimed = other = 0
    for c in cells:
        if c["architecture"] == "sequential":
            continue
        nid = same_network.network_id(c.config)
        seq = [s for s in cells if s["architecture"] == "sequential" and s.pair_key == c.pair_key][0]
        ref = _train(seq.config)
        got = _train(c.config)
        same = got[0] == ref[0] and torch.equal(got[1], ref[1]) and got[2] == ref[2]
        if nid != c.cell_id:
            claimed += 1
            assert nid == seq.cell_id and nid in by_id
            assert same, (c.config, got[0], ref[0])
        else:
            other += 1
            assert not same, f"an identity the rules miss: {c.config}"
    # parallel@1, highway residual, merge_and_run 1 branch, deeply_fused identity at
    # fuse_every 1 (and at layers 1 for fuse_every 2), learned_connectivity 1 branch @ 1 layer;
    # x 2 batch_norm settings
    assert claimed == 2 * (1 + 2 + 2 + 3 + 1) and other > claimed


SPEC = """
[study]
name = "same-network"
[grid]
dataset = "digits"
architecture = ["sequential", "parallel", "highway"]
layers = [1, 2]
filters = 4
kernel = 3
epochs = 2
batch_size = 64
max_train_examples = 200
[grid.highway]
gate = ["residual", "coupled"]
"""


def test_run_trains_each_network_once_and_records_both_rows(tmp_path):
    spec_path = tmp_path / "same_network.toml"
    spec_path.write_text(SPEC)
    cells = parse_spec(SPEC).cells()
    out = tmp_path / "res"

    r = run_cli("plan", spec_path, "--results", out)
    assert r.returncode == 0, r.stderr
    # 8 cells: parallel@1, highway-residual@1 and highway-residual@2 are sequential nets
    assert "cells: 8 in the grid, 5 distinct networks to train" in r.stdout
    assert "same-network copies: 3 cells" in r.stdout
    assert "deep/shallow pairs: 2" in r.stdout and "of which 1 are same-network pairs" in r.stdout

    r = run_cli("run", spec_path, "--results", out, "--executor", "local")
    assert r.returncode == 0, r.stderr
    assert "ran 5 cells (5 ok, 0 failed, 0 diverged)" in r.stdout
    assert "recorded 3 same-network copies without training; 8 of 8 cells done" in r.stdout
    store = Store(out)
    df = store.read_trials().set_index("cell_id")
    assert sorted(df.index) == sorted(c.cell_id for c in cells)
    ep = store.read_epochs()
    assert ep.groupby("cell_id").size().to_dict() == {c.cell_id: 2 for c in cells}
    marked = df[df["same_network_as"].notna()]
    assert len(marked) == 3
    measured = ["train_loss", "val_loss", "test_loss", "train_acc", "val_acc", "test_acc",
                "n_params", "wall_s", "started_at"]
    for cid, row in marked.iterrows():
        src = df.loc[row["same_network_as"]]
        c = next(c for c in cells if c.cell_id == cid)
        assert src["architecture"] == "sequential" and pd.isna(src["same_network_as"])
        # the copy's own identity, the trained cell's numbers
        assert (row["architecture"], row["pair_key"]) == (c["architecture"], c.pair_key)
        assert row["gate"] == c.config.get("gate") or pd.isna(row["gate"])
        assert (row[measured] == src[measured]).all()
        a = ep[ep["cell_id"] == cid].sort_values("epoch")
        b = ep[ep["cell_id"] == row["same_network_as"]].sort_values("epoch")
        assert a["val_loss"].tolist() == b["val_loss"].tolist()
    # the report shows the layers-1 pair as a control, not as evidence
    text = (out / "report.html").read_text()
    assert "1 same-network pair, all identical: the pairing works" in text

    # a resume after a crash between the two writes: the copy lands, nothing trains. The
    # crash state is made by writing every store file again without the copy's rows.
    copy_id = marked.index[0]
    for folder in (store.trials_dir, store.epochs_dir):
        for f in folder.glob("*.parquet"):
            t = pq.read_table(f)
            pq.write_table(t.filter(pc.not_equal(t["cell_id"], copy_id)), f)
    assert copy_id not in set(store.read_trials()["cell_id"])
    r = run_cli("run", spec_path, "--results", out, "--executor", "local", "--no-figures")
    assert r.returncode == 0, r.stderr
    assert "ran 0 cells" in r.stdout and "recorded 1 same-network copies" in r.stdout
    assert "recorded 1 same-network copy from cells already in the store" in r.stderr
    df2 = store.read_trials().set_index("cell_id")
    assert sorted(df2.index) == sorted(df.index)
    assert (df2.loc[copy_id, measured] == df.loc[copy_id, measured]).all()
    assert df2.loc[copy_id, "same_network_as"] == df.loc[copy_id, "same_network_as"]
    assert len(store.read_epochs().query("cell_id == @copy_id")) == 2
    others = [c for c in df.index if c != copy_id]
    pd.testing.assert_frame_equal(df2.loc[others, measured], df.loc[others, measured])

    # nothing to run: the report on disk is kept, not redrawn
    report_mtime = (out / "report.html").stat().st_mtime_ns
    r = run_cli("run", spec_path, "--results", out, "--executor", "local")
    assert r.returncode == 0 and "nothing to run" in r.stderr
    assert "unchanged: nothing ran" in r.stdout and "figure:" not in r.stdout
    assert (out / "report.html").stat().st_mtime_ns == report_mtime


@pytest.mark.slow
def test_ray_run_records_copies(ray_session, tmp_path):
    spec = parse_spec(SPEC.replace('gate = ["residual", "coupled"]', 'gate = "residual"')
                      .replace("layers = [1, 2]", "layers = 1"))
    summary = run_study(spec, RunOptions(TrialOptions(str(tmp_path / "res")), executor="ray",
                                         quiet=True))
    # three cells, one network (sequential = parallel@1 = highway residual)
    assert (summary.total, summary.ran, summary.copied) == (3, 1, 2)
    df = Store(tmp_path / "res").read_trials()
    assert df["val_loss"].nunique() == 1 and df["same_network_as"].notna().sum() == 2
    assert (df["node_id"].str.len() > 0).all()
