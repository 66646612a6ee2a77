"""The Parquet store: schema written = schema defined, atomic parts, quarantine, the lock."""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from study import schema
from study.atomic import atomic_write, atomic_write_table, atomic_write_text
from study.rows import cell_row, failed_result, now
from study.store import DriverLock, ReadReport, Store, StoreError, StoreReader
from sweep import Cell

CONFIG = {"dataset": "digits", "architecture": "sequential", "layers": 2, "filters": 4,
          "kernel": 3, "activation": "relu", "batch_norm": False, "lr": 1e-3,
          "weight_decay": 1e-4, "batch_size": 64, "epochs": 2, "seed": 0, "val_fraction": 0.1}
TRAINED = {"status": "ok", "n_params": 100, "epochs_done": 2, "train_loss": 0.5,
           "val_loss": 0.6, "wall_s": 1.0, "device": "cpu"}


def make_row(result: dict | None = None, config: dict | None = None) -> dict:
    """A cell's store row as the trial builds it (study.rows.cell_row): `result` is what
    training returned (default: a trained cell's), `config` the grid values to change."""
    cell = Cell.from_config({**CONFIG, **(config or {})})
    return cell_row(cell.to_dict(), TRAINED if result is None else result, study="tests",
                    attempts=1, started_at=now(), host="test")


def test_written_parts_have_exactly_the_defined_schema(tmp_path):
    store = Store(tmp_path)
    row = make_row()
    store.write_result(row, [{"cell_id": row["cell_id"], "epoch": 1, "train_loss": 1.0,
                              "val_loss": 1.1, "train_acc": 0.5, "val_acc": 0.4, "wall_s": 0.1,
                              "train_s": 0.08}])
    t = pq.read_table(tmp_path / "trials" / f"{row['cell_id']}.parquet")
    assert t.schema.equals(schema.TRIALS)
    e = pq.read_table(tmp_path / "epochs" / f"{row['cell_id']}.parquet")
    assert e.schema.equals(schema.EPOCHS)
    # no temporary files left behind
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    with pytest.raises(KeyError, match="not in the store schema"):
        store.write_result(make_row({**TRAINED, "bogus": 1}), [])


def test_rewriting_a_cell_replaces_its_row(tmp_path):
    store = Store(tmp_path)
    store.write_result(make_row(failed_result("boom")), [])
    store.write_result(make_row(), [])
    df = store.read_trials()
    assert len(df) == 1 and df["status"].tolist() == ["ok"]


def test_truncated_part_is_reported_and_quarantined(tmp_path):
    store = Store(tmp_path)
    good, bad = make_row(), make_row(config={"layers": 3})
    store.write_result(good, [])
    store.write_result(bad, [])
    part = tmp_path / "trials" / f"{bad['cell_id']}.parquet"
    part.write_bytes(part.read_bytes()[:40])  # a torn write from some other tool
    report = ReadReport()
    df = store.read_trials(report=report)  # readers skip and report, never move
    assert df["cell_id"].tolist() == [good["cell_id"]]
    assert len(report.bad_parts) == 1 and bad["cell_id"] in report.bad_parts[0]
    assert part.exists()
    reader = StoreReader(tmp_path)  # the read-only side, as analysis opens a folder
    report = ReadReport()
    assert reader.read_trials(report=report)["cell_id"].tolist() == [good["cell_id"]]
    assert len(report.bad_parts) == 1 and bad["cell_id"] in report.bad_parts[0]
    with pytest.raises(StoreError, match="only the driver moves"):
        reader.read_trials(quarantine=True)
    assert part.exists()
    df = store.read_trials(quarantine=True, report=ReadReport())
    assert not part.exists()
    moved = list((tmp_path / "quarantine").glob("*.parquet"))
    assert len(moved) == 1 and bad["cell_id"] in moved[0].name
    assert store.read_trials()["cell_id"].tolist() == [good["cell_id"]]


def test_lock_refuses_a_live_driver_and_takes_over_a_dead_one(tmp_path):
    store = Store(tmp_path)
    store.ensure_writable()
    # a live process holds it
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time, sys
from study.store import Store, DriverLock
DriverLock(Store({str(tmp_path)!r})).acquire()
print('held', flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError) as e:
            DriverLock(store).acquire()
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and "host" in msg and "started" in msg
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (SIGKILL: it never released): the lock is stale and taken over
    lock = DriverLock(store)
    stale = lock.acquire()
    assert stale["pid"] == holder.pid
    assert json.loads(store.lock_path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not store.lock_path.exists()


def test_unwritable_folder_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "file-not-folder"
        target.write_text("x")
        store = Store(target / "sub")  # a path under a regular file can never be created
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        store = Store(ro / "sub")
    with pytest.raises(StoreError, match="cannot write"):
        store.ensure_writable()


def test_parts_written_before_the_schema_grew_still_read(tmp_path):
    store = Store(tmp_path)
    row = make_row()
    store.write_result(row, [])
    part = tmp_path / "trials" / f"{row['cell_id']}.parquet"
    t = pq.read_table(part)
    pq.write_table(t.drop(["weights_path", "pruned_branches"]), part)  # an older writer
    df = store.read_trials(report=(rep := ReadReport()))
    assert df["cell_id"].tolist() == [row["cell_id"]] and not rep.bad_parts
    assert df["weights_path"].isna().all()


def test_the_one_atomic_writer_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        atomic_write(path, half_then_fail, fsync=True)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temporary file left
    table = tmp_path / "t.parquet"
    atomic_write_table(table, pa.table({"x": [1, 2]}))
    assert pq.read_table(table).column("x").to_pylist() == [1, 2]


def test_compaction_meeting_a_damaged_trials_part_sets_it_aside_and_merges_the_rest(tmp_path):
    """A torn trials part found by compaction itself (not by a read before it): the part is
    quarantined, taking its epochs part with it, and the rest are merged."""
    store = Store(tmp_path)
    good, bad = make_row(), make_row(config={"layers": 3})
    for row in (good, bad):
        store.write_result(row, [{"cell_id": row["cell_id"], "epoch": 1, "train_loss": 1.0,
                                  "val_loss": 1.1, "train_acc": 0.5, "val_acc": 0.4,
                                  "wall_s": 0.1, "train_s": 0.08}])
    part = tmp_path / "trials" / f"{bad['cell_id']}.parquet"
    part.write_bytes(part.read_bytes()[:40])
    store.compact()
    assert not [p for p in (tmp_path / "trials").glob("*.parquet")
                if not p.name.startswith("merged-")]  # no loose part left
    assert not (tmp_path / "epochs" / f"{bad['cell_id']}.parquet").exists()
    assert store.read_trials()["cell_id"].tolist() == [good["cell_id"]]
    assert store.read_epochs()["cell_id"].tolist() == [good["cell_id"]]
    assert any(bad["cell_id"] in p.name for p in (tmp_path / "quarantine").glob("*.parquet"))
    assert any(bad["cell_id"] in n for n in store.notes)
