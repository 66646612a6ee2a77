"""Lesion analysis: tiny nets trained by the tool into a real results store, lesioned end to end."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

import analysis
import sweep
from study import data as sdata
from study.lesion import LesionError, lesion_orders, load_model, run_lesion
from study.options import TrialOptions
from study.rows import cell_row, failed_result, now
from study.store import Store
from study.train import run_cell

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


def _train(root, cell) -> dict:
    """Train a cell the way `study run` does (run_cell, weights saved by the store) and land
    its row; returns the row."""
    opts = TrialOptions(results_dir=str(root), study="lesion-test", device="cpu",
                        save_weights=True)
    row, epochs = run_cell(cell.to_dict(), opts)
    assert row["status"] == "ok" and row["weights_path"], row.get("error")
    Store(root).write_result(row, epochs)
    return row


def _land(root, cell, result: dict) -> None:
    """A row the tool did not train (what a failed cell or an older store leaves)."""
    row = cell_row(cell.to_dict(), result, study="lesion-test", attempts=1, started_at=now(),
                   host="test")
    Store(root).write_result(row, epochs=[])


@pytest.fixture(scope="module")
def lesioned(tmp_path_factory):
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("results")
    cells = sweep.parse_spec(SPEC).cells()
    rows = {c.cell_id: _train(root, c) for c in cells}
    # A failed cell with a path, and an ok cell without one: neither is lesioned.
    failed = sweep.Cell.from_config(dict(cells[0].config, seed=1))
    _land(root, failed, {**failed_result("boom"), "weights_path": "weights/none.pt"})
    unsaved = sweep.Cell.from_config(dict(cells[0].config, seed=2))
    _land(root, unsaved, {"status": "ok"})
    df, paths = run_lesion(root)
    yield root, cells, rows, df, paths
    torch.set_num_threads(threads)


def _rows(df, arch):
    return df[df["architecture"] == arch]


def test_table_shape_and_files(lesioned):
    root, cells, _, df, paths = lesioned
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
    lesionable = {c.cell_id for c in cells if c["architecture"] != "learned_connectivity"}
    assert set(df["cell_id"]) == lesionable  # not the failed cell, nor the one saved no weights
    assert not list(root.glob("lesions/.*.tmp")) and not list(root.glob("figures/.*.tmp"))


def test_the_figure_is_drawn_by_analysis_from_the_table(lesioned, tmp_path):
    root, _, _, df, _ = lesioned
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
    # The rebuilt net, evaluated as training evaluated it (train.evaluate, same device, same
    # weights, same validation split), gives exactly the validation loss its row records.
    _, _, rows, df, _ = lesioned
    intact = df[df["lesion"] == "intact"]
    assert len(intact) == df["cell_id"].nunique()
    for _, lesion_row in intact.iterrows():
        assert lesion_row["val_loss"] == rows[lesion_row["cell_id"]]["val_loss"]
        assert lesion_row["val_loss_intact"] == lesion_row["val_loss"]
        assert lesion_row["loss_increase"] == 0.0


def test_parallel_swap_is_a_no_op_and_removal_is_not(lesioned):
    _, _, _, df, _ = lesioned
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
    root, cells, rows, _, _ = lesioned
    cell = next(c for c in cells if c["architecture"] == "parallel")
    par, _ = load_model(root / rows[cell.cell_id]["weights_path"])
    data = sdata.load("digits", val_fraction=cell["val_fraction"])
    with torch.no_grad():
        assert torch.allclose(par(data.val_x, [2, 0, 1]), par(data.val_x), atol=1e-5)


def test_lesion_orders():
    assert lesion_orders(3) == [("intact", None, [0, 1, 2]), ("remove", 0, [1, 2]),
                                ("remove", 1, [0, 2]), ("remove", 2, [0, 1]),
                                ("swap", 0, [1, 0, 2]), ("swap", 1, [0, 2, 1])]


def test_no_saved_weights_is_a_clear_error(tmp_path):
    _land(tmp_path, sweep.parse_spec(SPEC).cells()[0], {"status": "ok"})
    with pytest.raises(LesionError, match="save_weights"):
        run_lesion(tmp_path)


def test_rebuild_uses_filters_used(tmp_path):
    # A match_params cell trains at another width than `filters`; it is rebuilt at that width.
    config = dict(sweep.parse_spec(SPEC).cells()[0].config)
    config.update(architecture="highway", gate="full", gate_bias=-2.0, gate_kernel=1,
                  match_params=True, layers=2, filters=8)
    row = _train(tmp_path, sweep.Cell.from_config(config))
    assert row["filters_used"] != 8
    df, _ = run_lesion(tmp_path)
    assert set(df["filters_used"]) == {row["filters_used"]} and set(df["filters"]) == {8}
    assert df[df["lesion"] == "intact"]["val_loss"].iloc[0] == row["val_loss"]


def test_unreadable_weights_file_is_a_note_not_a_crash(lesioned, tmp_path):
    # Two cells and more: the one whose weights file is unreadable gets a note and is
    # skipped; every other cell is lesioned as before.
    root, cells, rows, df, _ = lesioned
    store = tmp_path / "store"
    shutil.copytree(root, store)
    bad = next(c.cell_id for c in cells if c["architecture"] == "sequential")
    (store / rows[bad]["weights_path"]).write_bytes(b"not a torch file")
    got, _ = run_lesion(store)
    [note] = [n for n in got.attrs["notes"] if bad in n]
    assert "cannot rebuild" in note and rows[bad]["weights_path"] in note
    expected = df[df["cell_id"] != bad].reset_index(drop=True)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected)
    # With no readable cell at all, there is nothing to lesion: the error says why.
    alone = tmp_path / "alone"
    (alone / "weights").mkdir(parents=True)
    (alone / "weights" / "bad.pt").write_bytes(b"not a torch file")
    _land(alone, cells[0], {"status": "ok", "weights_path": "weights/bad.pt"})
    with pytest.raises(LesionError, match="cannot rebuild"):
        run_lesion(alone)
