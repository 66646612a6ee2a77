"""precision as a cell parameter: bf16 trains on the CPU, the TF32 flags are set per cell,
the default keeps today's cell_ids, bad values and tf32 without a GPU are refused; the new
columns (train_s, precision, device_name) read as missing from stores written before them."""
from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from study import schema
from study.options import TrialOptions
from study.store import Store
from study.train import run_cell
from sweep import Cell, SpecError, parse_spec, same_network

from conftest import run_cli
from test_same_network import _train

CONFIG = {"dataset": "digits", "architecture": "parallel", "layers": 2, "filters": 4,
          "kernel": 3, "activation": "relu", "batch_norm": False, "head": "flatten", "pool": 1,
          "lr": 3e-3, "weight_decay": 1e-4, "batch_size": 64, "epochs": 2, "seed": 0,
          "max_train_examples": 200, "val_fraction": 0.1}


def _cell(**over) -> dict:
    return Cell.from_config({**CONFIG, **over}).to_dict()


def _flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_bf16_cell_trains_on_cpu_and_records_it(tmp_path):
    row, epochs = run_cell(_cell(precision="bf16"), TrialOptions(str(tmp_path), device="cpu"))
    assert row["status"] == "ok", row.get("error")
    assert row["precision"] == "bf16" and row["device"] == "cpu" and row["device_name"]
    assert row["parallel_body"] == "loop"
    # evaluation is FP32: the recorded losses are ordinary finite floats
    assert 0 < row["val_loss"] < 10 and isinstance(row["val_loss"], float)
    assert [e["epoch"] for e in epochs] == [1, 2]
    # train_s is the training pass alone: below the cumulative wall_s, which adds validation
    assert all(0 < e["train_s"] <= e["wall_s"] for e in epochs)
    assert epochs[1]["wall_s"] >= epochs[0]["train_s"] + epochs[1]["train_s"]
    table = schema.conform([row], schema.TRIALS)  # every key is a schema column
    assert table["precision"][0].as_py() == "bf16"


def test_fp32_sets_tf32_flags_off_also_after_a_tf32_cell(tmp_path):
    before = _flags()
    try:
        opts = TrialOptions(str(tmp_path), device="cpu")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        row, _ = run_cell(_cell(precision="fp32"), opts)
        assert row["status"] == "ok" and _flags() == (False, False)
        # run_cell does not refuse tf32 on a CPU (preflight does): it sets the flags, which
        # a CPU build accepts, and the fp32 cell after it in this process clears them
        row, _ = run_cell(_cell(precision="tf32", seed=1), opts)
        assert row["status"] == "ok" and row["precision"] == "tf32" and _flags() == (True, True)
        row, _ = run_cell(_cell(precision="fp32", seed=2), opts)
        assert row["status"] == "ok" and _flags() == (False, False)
        row, _ = run_cell(_cell(precision="bf16", seed=3), opts)
        assert row["status"] == "ok" and _flags() == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_cell_id_changes_with_non_default_precision_only():
    plain = Cell.from_config(CONFIG)
    fp32 = Cell.from_config({**CONFIG, "precision": "fp32"})
    assert (fp32.cell_id, fp32.pair_key) == (plain.cell_id, plain.pair_key)
    ids = {Cell.from_config({**CONFIG, "precision": p}).cell_id for p in ("fp32", "tf32", "bf16")}
    assert len(ids) == 3
    # precision is a shared setting: a bf16 parallel cell pairs with the bf16 sequential one
    bf = {a: Cell.from_config({**CONFIG, "architecture": a, "precision": "bf16"})
          for a in ("sequential", "parallel")}
    assert bf["sequential"].pair_key == bf["parallel"].pair_key != plain.pair_key
    spec = parse_spec(SPEC.replace("PRECISION", '["fp32", "bf16"]'))
    assert {c["precision"] for c in spec.cells()} == {"fp32", "bf16"}


SPEC = """
[study]
name = "prec"
[grid]
dataset = "digits"
architecture = ["sequential", "parallel"]
layers = 2
filters = 4
kernel = 3
epochs = 1
max_train_examples = 100
precision = PRECISION
"""


def test_unknown_precision_refused_by_the_parser(tmp_path):
    with pytest.raises(SpecError, match="'grid.precision' = 'fp16' is not allowed.*fp32, tf32, bf16"):
        parse_spec(SPEC.replace("PRECISION", '"fp16"'))
    p = tmp_path / "s.toml"
    p.write_text(SPEC.replace("PRECISION", '"fp16"'))
    r = run_cli("plan", p, "--results", tmp_path / "res")
    assert r.returncode == 2 and "fp16" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_tf32_without_a_gpu_refused_before_the_first_cell(tmp_path, executor):
    p = tmp_path / "s.toml"
    p.write_text(SPEC.replace("PRECISION", '["fp32", "tf32"]'))
    out = tmp_path / "res"
    r = run_cli("run", p, "--results", out, "--executor", executor, "--no-figures")
    assert r.returncode == 3, r.stderr
    msg = r.stderr.strip()
    assert len(msg.splitlines()) == 1 and "2 pending cells have precision = tf32" in msg
    assert "needs a CUDA GPU" in msg and "Traceback" not in r.stderr
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("body", ["loop", "wide"])
def test_parallel_at_one_layer_is_the_sequential_net_under_every_precision(precision, body):
    for bn in (False, True):
        seq = {**CONFIG, "architecture": "sequential", "layers": 1, "batch_norm": bn,
               "precision": precision}
        par = {**seq, "architecture": "parallel"}
        assert same_network.network_id(par) == Cell.from_config(seq).cell_id
        ref = _train(seq, precision=precision)
        got = _train(par, precision=precision, parallel_body=body)
        assert got[0] == ref[0] and torch.equal(got[1], ref[1]), (precision, body, bn)


def test_stores_written_before_the_new_columns_read_them_as_missing(tmp_path):
    store = Store(tmp_path)
    cell = Cell.from_config(CONFIG)
    old_trials = pa.schema([f for f in schema.TRIALS
                            if f.name not in ("precision", "device_name", "parallel_body")])
    old_epochs = pa.schema([f for f in schema.EPOCHS if f.name != "train_s"])
    row = {**cell.config, "cell_id": cell.cell_id, "pair_key": cell.pair_key, "status": "ok"}
    row.pop("precision", None)
    epoch = {"cell_id": cell.cell_id, "epoch": 1, "wall_s": 1.0}
    store.trials_dir.mkdir(parents=True)
    store.epochs_dir.mkdir(parents=True)
    pq.write_table(schema.conform([row], old_trials), store.trials_dir / f"{cell.cell_id}.parquet")
    pq.write_table(schema.conform([epoch], old_epochs), store.epochs_dir / f"{cell.cell_id}.parquet")
    for _ in ("parts", "merged"):
        t, e = store.read_trials().iloc[0], store.read_epochs().iloc[0]
        assert t["cell_id"] == cell.cell_id and pd.isna(t["precision"]) and pd.isna(t["device_name"])
        assert e["wall_s"] == 1.0 and pd.isna(e["train_s"])
        # the id of an old row's config is its id today (precision unset = fp32 unhashed)
        assert Cell.from_config(same_network.config_from_row(t.to_dict())).cell_id == cell.cell_id
        store.compact()
