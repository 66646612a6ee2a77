"""Lesion analysis: tiny trained nets in a real results store, lesioned end to end."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

import analysis
import sweep
from study import data as sdata
from study.lesion import LesionError, lesion_orders, run_lesion, val_loss
from study.models import build_for_cell, model_kwargs
from study.store import Store
from study.train import train_epoch

SPEC = """
[study]
name = "lesion-test"
save_weights = true
[grid]
dataset = "digits"
architecture = ["sequential", "parallel", "highway", "merge_and_run", "learned_connectivity"]
layers = 3
filters = 4
kernel = 3
lr = 1e-2
batch_size = 16
epochs = 1
[grid.highway]
gate = ["full", "coupled"]
[grid.merge_and_run]
branches = 3
"""
TRAINED = ("sequential", "parallel")  # the others are saved untrained: wiring checks only


def _save_cell(root, cell, data):
    config = cell.config
    torch.manual_seed(config["seed"])
    model, width = build_for_cell(config, data.in_channels, data.n_classes)
    if config["architecture"] in TRAINED:  # one epoch of the tool's own loop
        opt = torch.optim.AdamW(model.parameters(), lr=config["lr"])
        train_epoch(model, opt, data.train_x, data.train_y, config["batch_size"],
                    config["seed"], epoch=1, epochs=1)
    rel = f"weights/{cell.cell_id}.pt"
    (root / "weights").mkdir(exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "config": config, "filters_used": width,
                "in_channels": data.in_channels, "n_classes": data.n_classes}, root / rel)
    row = {**config, "cell_id": cell.cell_id, "pair_key": cell.pair_key, "status": "ok",
           "weights_path": rel, "filters_used": width}
    Store(root).write_result(row, epochs=[])
    return model.eval()


@pytest.fixture(scope="module")
def lesioned(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("results")
    spec = sweep.parse_spec(SPEC)
    cells = spec.cells()
    data = sdata.load("digits", val_fraction=cells[0]["val_fraction"])
    models = {c.cell_id: _save_cell(root, c, data) for c in cells}
    # A failed cell with a path, and an ok cell without one: neither is lesioned.
    extra = dict(cells[0].config, seed=1)
    Store(root).write_result({**extra, **_ids(extra), "status": "failed",
                              "weights_path": "weights/none.pt"}, epochs=[])
    df, paths = run_lesion(root)
    yield root, cells, models, data, df, paths
    torch.set_num_threads(threads)


def _ids(config):
    c = sweep.Cell.from_config(config)
    return {"cell_id": c.cell_id, "pair_key": c.pair_key}


def _rows(df, arch):
    return df[df["architecture"] == arch]


def test_table_shape_and_files(lesioned):
    root, cells, _, _, df, paths = lesioned
    # sequential, parallel, 2 highway: 3 blocks -> 1 + 3 + 2 rows; merge_and_run (K=3): 1 block
    # -> intact + remove; learned_connectivity is skipped with a note.
    assert len(df) == 4 * 6 + 2
    assert set(df["architecture"]) == {"sequential", "parallel", "highway", "merge_and_run"}
    assert any("learned_connectivity" in n for n in df.attrs["notes"])
    assert set(_rows(df, "highway")["variant"]) == {"highway gate=full", "highway gate=coupled"}
    [table] = paths  # study computes; the figure is analysis's
    assert table == root / "lesions" / "lesions.parquet" and table.stat().st_size > 0
    assert not (root / "figures").exists()
    back = pd.read_parquet(table)
    for col in ["cell_id", "architecture", "dataset", "layers", "filters", "kernel", "lesion",
                "position", "val_loss", "val_loss_intact", "loss_increase"]:
        assert col in back
    assert len(back) == len(df)
    assert not list(root.glob("lesions/.*.tmp")) and not list(root.glob("figures/.*.tmp"))


def test_the_figure_is_drawn_by_analysis_from_the_table(lesioned, tmp_path):
    root, _, _, _, df, _ = lesioned
    png, pdf = analysis.write_lesion_figure(root)
    assert png == root / "figures" / "lesions.png" and pdf == root / "figures" / "lesions.pdf"
    assert png.stat().st_size > 0 and pdf.stat().st_size > 0
    # the figure shows every variant the table holds (one legend entry each)
    fig = analysis.plot_lesions(pd.read_parquet(root / "lesions" / "lesions.parquet"))
    legend = [t.get_text() for a in fig.axes if a.get_legend() for t in a.get_legend().get_texts()]
    assert sorted(legend) == sorted(set(df["variant"]))
    # write_figures and the report draw it with the others, from the table on disk
    assert png in analysis.write_figures(root)
    report = analysis.write_report(root).read_text()
    assert "figures/lesions.png" in report
    # a store without lesions: no lesion figure and no note about one
    empty = tmp_path / "none"
    empty.mkdir()
    Store(empty).save_spec(SPEC, "lesion-test", "tests")
    res = analysis.write_figures(empty)
    assert not any("lesion" in n for n in res.notes)
    assert not (empty / "figures" / "lesions.png").exists()
    with pytest.raises(analysis.AnalysisError, match="run `study lesion"):
        analysis.write_lesion_figure(empty)


def test_intact_loss_is_the_trained_models(lesioned):
    _, cells, models, data, df, _ = lesioned
    for cell in cells:
        if cell["architecture"] in TRAINED:
            row = df[(df["cell_id"] == cell.cell_id) & (df["lesion"] == "intact")].iloc[0]
            assert row["val_loss"] == pytest.approx(val_loss(models[cell.cell_id], data.val_x, data.val_y))
            assert row["loss_increase"] == 0.0


def test_parallel_swap_is_a_no_op_and_removal_is_not(lesioned):
    _, _, _, _, df, _ = lesioned
    par = _rows(df, "parallel")
    swaps, removes = par[par["lesion"] == "swap"], par[par["lesion"] == "remove"]
    assert list(swaps["position"]) == [0, 1] and list(removes["position"]) == [0, 1, 2]
    assert (swaps["val_loss"] == swaps["val_loss_intact"]).all()
    assert (swaps["loss_increase"] == 0.0).all()
    assert (removes["loss_increase"] != 0.0).all()
    # The sequential twin is order-dependent: its swaps change the loss.
    seq = _rows(df, "sequential")
    assert (seq.loc[seq["lesion"] == "swap", "loss_increase"] != 0.0).all()


def test_parallel_order_invariance_is_real_not_just_sorted(lesioned):
    # run_lesion evaluates parallel nets in index order; here the model itself, reordered.
    _, cells, models, data, _, _ = lesioned
    par = next(models[c.cell_id] for c in cells if c["architecture"] == "parallel")
    with torch.no_grad():
        assert torch.allclose(par(data.val_x, [2, 0, 1]), par(data.val_x), atol=1e-5)


def test_lesion_orders():
    assert lesion_orders(3) == [("intact", None, [0, 1, 2]), ("remove", 0, [1, 2]),
                                ("remove", 1, [0, 2]), ("remove", 2, [0, 1]),
                                ("swap", 0, [1, 0, 2]), ("swap", 1, [0, 2, 1])]


def test_no_saved_weights_is_a_clear_error(tmp_path):
    config = sweep.parse_spec(SPEC).cells()[0].config
    Store(tmp_path).write_result({**config, **_ids(config), "status": "ok"}, epochs=[])
    with pytest.raises(LesionError, match="save_weights"):
        run_lesion(tmp_path)


def test_rebuild_uses_filters_used(tmp_path):
    # A match_params cell saved at another width is rebuilt at that width.
    config = dict(sweep.parse_spec(SPEC).cells()[0].config)
    config.update(architecture="highway", gate="full", gate_bias=-2.0, gate_kernel=1,
                  match_params=True, layers=2, filters=8)
    data = sdata.load("digits", val_fraction=config["val_fraction"])
    model, width = build_for_cell(config, 1, 10)
    assert width != 8 and model_kwargs(config)["filters"] == 8
    (tmp_path / "w").mkdir()
    torch.save({"state_dict": model.state_dict(), "config": config, "filters_used": width,
                "in_channels": 1, "n_classes": 10}, tmp_path / "w" / "a.pt")
    Store(tmp_path).write_result({**config, **_ids(config), "status": "ok",
                                  "weights_path": "w/a.pt"}, epochs=[])
    df, _ = run_lesion(tmp_path)
    assert set(df["filters_used"]) == {width} and set(df["filters"]) == {8}
    intact = df[df["lesion"] == "intact"]["val_loss"].iloc[0]
    assert intact == pytest.approx(val_loss(model.eval(), data.val_x, data.val_y))


def test_unreadable_weights_file_is_a_note_not_a_crash(tmp_path):
    config = sweep.parse_spec(SPEC).cells()[0].config
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "bad.pt").write_bytes(b"not a torch file")
    Store(tmp_path).write_result({**config, **_ids(config), "status": "ok",
                                  "weights_path": "weights/bad.pt"}, epochs=[])
    with pytest.raises(LesionError, match="cannot rebuild"):
        run_lesion(tmp_path)
