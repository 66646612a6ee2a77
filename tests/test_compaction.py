"""Compaction keeps the store's promises: nothing landed is lost at a SIGKILL mid-merge, each
cell is seen once (by our reader and by DuckDB reading the documented glob), a damaged merged
file is quarantined and only its cells run again, a re-landed cell replaces its row."""
import signal
import subprocess
import sys

import duckdb
import pytest

import study.store.compact as compaction
from study.options import TrialOptions
from study.rows import cell_row, failed_result, now
from study.runner import RunOptions, run_study
from study.store import Store
from sweep import Cell, load_spec

from conftest import run_cli

# A writer that lands three cells, compacts, re-lands one of them (a retry: failed -> ok),
# then compacts again and stops dead in the middle of that merge, at `window`:
#   before_rename:  the merged file is written to its temporary name, not yet renamed;
#   before_removal: the merged file is in place, the parts and old merged file not removed.
WRITER = r'''
import os, pathlib, sys, time
import study.store as st
from study.rows import cell_row, failed_result, now
from sweep import parse_spec

out, spec_path, window = sys.argv[1], sys.argv[2], sys.argv[3]
text = open(spec_path).read()
cells = parse_spec(text).cells()[:3]
store = st.Store(out)
store.ensure_writable()
store.save_spec(text, "tiny", spec_path)

def land(c, status):  # a cell's row and epochs as the trial builds them
    result = failed_result("boom") if status == "failed" else {
        "status": "ok", "n_params": 100, "epochs_done": 2, "train_loss": 0.5, "val_loss": 0.6,
        "wall_s": 1.0, "device": "cpu"}
    epochs = [] if status == "failed" else [
        {"cell_id": c.cell_id, "epoch": e, "train_loss": 1.0 / e, "val_loss": 1.1 / e,
         "train_acc": 0.5, "val_acc": 0.4, "wall_s": 0.1 * e, "train_s": 0.08} for e in (1, 2)]
    row = cell_row(c.to_dict(), result, study="tiny", attempts=1, started_at=now(), host="test")
    store.write_result(row, epochs)

land(cells[0], "ok"); land(cells[1], "ok"); land(cells[2], "failed")
store.compact()
land(cells[2], "ok")  # the retry: its part supersedes its row in merged-00000001

def stop(*a, **k):
    print("ready", flush=True)
    time.sleep(120)

if window == "before_rename":
    real = os.replace
    def replace(src, dst):
        if os.path.basename(str(dst)).startswith("merged-"):
            stop()
        return real(src, dst)
    os.replace = replace
else:
    pathlib.Path.unlink = lambda self, *a, **k: stop()
store.compact()
print("not killed", flush=True)
'''


def _duck(sql: str):
    return duckdb.connect().execute(sql).fetchall()


def _glob_counts(out):
    """cell_id -> (trial rows, status) and cell_id -> epoch rows, as DuckDB reads the glob."""
    trials = _duck(f"select cell_id, count(*), min(status) from read_parquet("
                   f"'{out}/trials/*.parquet', union_by_name=true) group by cell_id")
    epochs = _duck(f"select cell_id, epoch, count(*) from read_parquet("
                   f"'{out}/epochs/*.parquet', union_by_name=true) group by cell_id, epoch")
    return {c: (n, s) for c, n, s in trials}, epochs


@pytest.mark.parametrize("window", ["before_rename", "before_removal"])
def test_sigkill_mid_merge_loses_nothing_and_a_resume_leaves_each_cell_once(tmp_path, tiny_spec,
                                                                            window):
    out = tmp_path / "res"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(tiny_spec), window],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        proc.kill()
    cells = load_spec(tiny_spec).cells()
    landed = sorted(c.cell_id for c in cells[:3])
    store = Store(out)
    # What the killed merge left: our reader sees every landed row once, the retry's row.
    df = store.read_trials()
    assert sorted(df["cell_id"]) == landed
    assert (df["status"] == "ok").all()
    ep = store.read_epochs()
    assert len(ep) == 6 and not ep.duplicated(["cell_id", "epoch"]).any()
    if window == "before_rename":
        assert list(out.glob("*/.merged-*.tmp"))  # the half-written merged file
    else:
        assert len(list((out / "trials").glob("merged-*.parquet"))) == 2  # old and new

    # A resume (the real CLI) runs the one missing cell and compacts: any reader of the glob
    # now sees each cell exactly once, with its newest row.
    r = run_cli("run", tiny_spec, "--results", out, "--executor", "local", "--no-figures")
    assert r.returncode == 0, r.stderr
    assert "ran 1 cells (1 ok" in r.stdout
    trials, epochs = _glob_counts(out)
    assert sorted(trials) == sorted(c.cell_id for c in cells)
    assert all(n == 1 and s == "ok" for n, s in trials.values())
    assert len(epochs) == 8 and all(n == 1 for _, _, n in epochs)
    leftovers = [p.name for d in ("trials", "epochs") for p in (out / d).iterdir()
                 if not p.name.startswith("merged-")]
    assert leftovers == []  # no part, no temporary file
    assert sorted(Store(out).read_trials()["cell_id"]) == sorted(trials)


def test_damaged_merged_file_is_quarantined_and_only_its_cells_rerun(tmp_path, tiny_spec,
                                                                       monkeypatch):
    monkeypatch.setattr(compaction, "MERGED_MAX_CELLS", 2)  # 4 cells -> 2 merged files
    spec = load_spec(tiny_spec)
    out = tmp_path / "res"
    opts = RunOptions(TrialOptions(str(out)), executor="local", quiet=True)
    first = run_study(spec, opts)
    assert first.ran + first.copied == 4  # the layers-1 copy is recorded, not trained
    merged = sorted((out / "trials").glob("merged-*.parquet"))
    assert len(merged) == 2 and not [p for p in (out / "trials").iterdir() if p not in merged]
    store = Store(out)
    before = store.read_trials().set_index("cell_id")
    import pyarrow.parquet as pq
    victim_cells = set(pq.read_table(merged[0], columns=["cell_id"])["cell_id"].to_pylist())
    data = merged[0].read_bytes()
    merged[0].write_bytes(data[: len(data) // 2])

    summary = run_study(spec, opts)
    # the lost cells come back: trained again, or recorded from a same-network copy that survived
    assert summary.ran + summary.copied == 2 and summary.failed == summary.diverged == 0
    assert len(summary.quarantined) == 1 and merged[0].name in summary.quarantined[0]
    moved = sorted(p.name.split("-2")[0] for p in (out / "quarantine").glob("*.parquet"))
    assert moved == [f"epochs-{merged[0].stem}", f"trials-{merged[0].stem}"]
    after = store.read_trials().set_index("cell_id")
    kept = sorted(set(before.index) - victim_cells)
    assert len(kept) == 2
    # the other file's cells were not run again: their rows are exactly as before
    assert after.loc[kept, "finished_at"].equals(before.loc[kept, "finished_at"])
    assert (after.loc[sorted(victim_cells), "status"] == "ok").all()
    trials, epochs = _glob_counts(out)
    assert sorted(trials) == sorted(before.index) and all(n == 1 for n, _ in trials.values())
    assert len(epochs) == 8 and all(n == 1 for _, _, n in epochs)


CONFIG = {"dataset": "digits", "architecture": "sequential", "layers": 2, "filters": 4,
          "kernel": 3, "epochs": 2, "seed": 0}


def _row(layers: int, status: str = "ok", val_loss: float = 0.6):
    """A cell's row and its two epochs as the trial builds them (study.rows.cell_row); a failed
    cell keeps the epochs it finished, as run_cell does."""
    cell = Cell.from_config({**CONFIG, "layers": layers})
    epochs = [{"cell_id": cell.cell_id, "epoch": e, "train_loss": 1.0 / e, "val_loss": val_loss * e,
               "train_acc": 0.5, "val_acc": 0.4, "wall_s": 0.1 * e, "train_s": 0.08}
              for e in (1, 2)]
    result = failed_result("boom", len(epochs)) if status == "failed" else {
        "status": status, "n_params": 100, "epochs_done": len(epochs), "train_loss": 0.5,
        "val_loss": val_loss, "wall_s": 0.2, "device": "cpu"}
    row = cell_row(cell.to_dict(), result, study="tests", attempts=1, started_at=now(),
                   host="test")
    return row, epochs


def test_a_relanded_cell_replaces_its_merged_row_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(compaction, "COMPACT_EVERY_PARTS", 3)
    store = Store(tmp_path)
    compacted = []
    for layers in (1, 2, 3):
        store.write_result(*_row(layers, "failed"))
        compacted.append(store.maybe_compact(_row(layers)[0]["cell_id"]))
    assert compacted == [False, False, True]  # the third part made the batch
    assert [p.name for p in store.trials_dir.iterdir()] == ["merged-00000001.parquet"]
    row, epochs = _row(2, "ok", val_loss=0.25)  # --retry-failed lands cell 2 again
    store.write_result(row, epochs)
    assert store.maybe_compact(row["cell_id"])  # its old row sits in a merged file: now
    trials, ep = _glob_counts(tmp_path)
    assert len(trials) == 3 and all(n == 1 for n, _ in trials.values())
    assert trials[row["cell_id"]][1] == "ok"
    assert len(ep) == 6 and all(n == 1 for _, _, n in ep)
    assert _duck(f"select val_loss from read_parquet('{tmp_path}/epochs/*.parquet') "
                 f"where cell_id = '{row['cell_id']}' order by epoch") == [(0.25,), (0.5,)]
    assert [p.name for p in store.trials_dir.iterdir()] == ["merged-00000002.parquet"]


def test_bulk_writes_and_reads_of_chosen_cells(tmp_path, monkeypatch):
    monkeypatch.setattr(compaction, "MERGED_MAX_CELLS", 4)
    monkeypatch.setattr(compaction, "EPOCHS_ROW_GROUP", 2)  # one cell per row group
    store = Store(tmp_path)
    store.write_results([_row(n) for n in range(1, 10)])  # 9 cells -> files of 4, 4, 1
    assert len(list(store.trials_dir.glob("merged-*.parquet"))) == 3
    store.write_result(*_row(1, val_loss=0.1))  # a part
    # cell 1 has a part: it lands as a part again (a part is never older than a merged copy);
    # cell 2 lives in a merged file: its new row goes to a newer merged file
    store.write_results([_row(1, val_loss=0.2), _row(2, val_loss=0.3)])
    df = store.read_trials(columns=["cell_id", "val_loss"]).set_index("cell_id")["val_loss"]
    c1, c2 = _row(1)[0]["cell_id"], _row(2)[0]["cell_id"]
    assert len(df) == 9 and df[c1] == 0.2 and df[c2] == 0.3
    # the bulk write's merge took in c1's part and the merged files holding c1 and c2
    trials, ep = _glob_counts(tmp_path)
    assert len(trials) == 9 and all(n == 1 for n, _ in trials.values())
    assert len(ep) == 18 and all(n == 1 for _, _, n in ep)
    # the curves of chosen cells: only those cells, newest rows
    chosen = store.read_epochs(cell_ids=[c2, _row(7)[0]["cell_id"]])
    assert sorted(set(chosen["cell_id"])) == sorted([c2, _row(7)[0]["cell_id"]])
    assert chosen[chosen["cell_id"] == c2]["val_loss"].tolist() == [0.3, 0.6]
    assert len(store.read_epochs(cell_ids=[])) == 0
