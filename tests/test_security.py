"""Files that cannot run code, a grid that cannot eat the machine, hostile text kept inert."""
from __future__ import annotations

import io
import pickle
import time

import numpy as np
import pytest
import torch

from study import data as datasets
from study import train
from study.errors import DatasetError
from study.options import TrialOptions
from study.runner import RunOptions, run_study
from study.store import Store
from sweep import load_spec

from conftest import run_cli

ONE_CELL = """
[study]
name = "one"

[grid]
dataset = "digits"
architecture = "sequential"
layers = 2
filters = 4
kernel = 3
epochs = 2
batch_size = 64
max_train_examples = 200
"""


class _CreatesFile:
    """Unpickling this opens (creates) a file: any code could run in its place."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# -- checkpoints -----------------------------------------------------------------------------
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_code_running_checkpoint_is_refused_quarantined_and_the_cell_reruns(
        executor, tmp_path, request):
    if executor == "ray":
        request.getfixturevalue("ray_session")  # the driver-side files actor quarantines it
    spec_path = tmp_path / "one.toml"
    spec_path.write_text(ONE_CELL)
    (cell,) = load_spec(spec_path).cells()
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"cell_id": cell.cell_id, "epoch": 1, "payload": _CreatesFile(marker)}, buf)
    # the crafted file is hostile for real: the old loader would have created the file
    torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert marker.exists()
    marker.unlink()

    out = tmp_path / "res"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / f"{cell.cell_id}.pt").write_bytes(buf.getvalue())
    summary = run_study(load_spec(spec_path), RunOptions(TrialOptions(str(out)), executor=executor,
                                                         quiet=True))
    assert not marker.exists()
    assert (summary.ran, summary.ok) == (1, 1)
    store = Store(out)
    (row,) = store.read_trials().to_dict("records")
    assert row["status"] == "ok" and row["epochs_done"] == 2
    assert sorted(store.read_epochs()["epoch"]) == [1, 2]  # trained from its first epoch
    moved = sorted(p.name for p in (out / "quarantine").iterdir())
    assert [n.endswith(".pt") for n in moved].count(True) == 1, moved
    note = next((out / "quarantine").glob("*.reason.txt")).read_text()
    assert "weights_only=True" in note and "\n" not in note.strip()
    assert not list((out / "checkpoints").glob("*.pt"))


def test_zero_byte_in_flight_marker_is_left_as_it_is(tmp_path):
    store = Store(tmp_path / "res")
    store.checkpoints_dir.mkdir(parents=True)
    store.checkpoint_path("abc").touch()
    assert train._load_checkpoint(store, "abc", mark_in_flight=True) is None
    assert store.checkpoint_path("abc").stat().st_size == 0
    assert not store.quarantine_dir.exists()


def test_unreadable_checkpoint_is_quarantined_and_its_marker_kept(tmp_path):
    store = Store(tmp_path / "res")
    store.save_checkpoint("abc", b"not a checkpoint")
    assert train._load_checkpoint(store, "abc", mark_in_flight=True) is None
    assert store.checkpoint_path("abc").stat().st_size == 0  # still counted in flight
    assert len(list(store.quarantine_dir.glob("checkpoints-abc-*.pt"))) == 1


# -- CIFAR-10 batch files --------------------------------------------------------------------
def _cifar(root, payload=None, protocol=pickle.DEFAULT_PROTOCOL):
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in datasets._CIFAR_FILES:
        d = {b"batch_label": b"x", b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
             b"labels": rng.integers(0, 10, 10).tolist(), b"filenames": [b"a.png"] * 10}
        if payload is not None and name == "data_batch_3":
            d[b"extra"] = payload
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_cifar_layout_reads_through_the_restricted_unpickler(tmp_path, protocol):
    _cifar(tmp_path, protocol=protocol)
    d = datasets.load("cifar10", tmp_path, val_fraction=0.1)
    assert d.train_x.shape == (45, 3, 32, 32) and d.test_x.shape == (10, 3, 32, 32)


def test_cifar_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _cifar(tmp_path, payload=_CreatesFile(marker))
    with pytest.raises(DatasetError) as e:
        datasets.load("cifar10", tmp_path)
    msg = str(e.value)
    print(msg)
    assert not marker.exists()
    assert "data_batch_3" in msg and "io.open" in msg and "\n" not in msg


# -- grid size -------------------------------------------------------------------------------
HUGE = """
[study]
name = "huge"
description = "10^8 cells"

[grid]
dataset = "digits"
architecture = "sequential"
layers = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
filters = [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
kernel = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19]
lr = [0.1, 0.01, 0.001, 0.0001, 0.00001, 0.2, 0.02, 0.002, 0.0002, 0.00002]
weight_decay = [0.1, 0.01, 0.001, 0.0001, 0.00001, 0.2, 0.02, 0.002, 0.0002, 0.00002]
seed = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
batch_size = [8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
epochs = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
pool = 1
"""


def test_a_hundred_million_cell_grid_is_refused_at_once(tmp_path):
    spec = tmp_path / "huge.toml"
    spec.write_text(HUGE)
    assert load_spec(spec).max_cells() == 10**8
    resumable = tmp_path / "old"  # a study folder holding the same spec
    resumable.mkdir()
    (resumable / "spec.toml").write_text(HUGE)
    for args in (["plan", spec, "--results", tmp_path / "res"],
                 ["run", spec, "--results", tmp_path / "res", "--executor", "local"],
                 ["resume", resumable, "--executor", "local"]):
        t0 = time.perf_counter()
        r = run_cli(*args, timeout=60)
        took = time.perf_counter() - t0
        print(f"{args[0]}: {took:.2f} s (with Python's start-up): {r.stderr.strip()}")
        assert r.returncode == 2, r.stderr
        assert "up to 100,000,000 cells" in r.stderr and "--max-cells 100000000" in r.stderr
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert took < 20  # seconds, not the minutes (and gigabytes) of enumerating it
    assert not (tmp_path / "res").exists()
    assert sorted(p.name for p in resumable.iterdir()) == ["spec.toml"]


def test_max_cells_is_remembered_for_resume_and_status_keeps_working(tmp_path):
    spec = tmp_path / "one.toml"
    spec.write_text(ONE_CELL.replace("layers = 2", "layers = [1, 2]").replace("epochs = 2", "epochs = 1"))
    out = tmp_path / "res"
    r = run_cli("run", spec, "--results", out, "--executor", "local", "--max-cells", "1")
    assert r.returncode == 2 and "up to 2 cells" in r.stderr and "limit of 1" in r.stderr
    r = run_cli("run", spec, "--results", out, "--executor", "local", "--no-figures",
                "--max-cells", "2")
    assert r.returncode == 0, r.stderr
    assert (out / "max_cells.txt").read_text().strip() == "2"
    r = run_cli("resume", out, "--executor", "local", "--no-figures")
    assert r.returncode == 0 and "nothing to run" in r.stderr, r.stderr
    (out / "max_cells.txt").write_text("1\n")  # as if the run had said --max-cells 1
    r = run_cli("resume", out, "--executor", "local", "--no-figures")
    assert r.returncode == 2 and "limit of 1" in r.stderr
    r = run_cli("status", out)
    assert r.returncode == 0 and "2 done" in r.stdout.replace("2/2", "2 done"), r.stdout


# -- hostile text in the report --------------------------------------------------------------
def test_hostile_description_error_and_spec_path_are_escaped_in_the_report(tmp_path):
    evil = "<script>alert('x')</script>\"q'"
    folder = tmp_path / "<script>alert('p')<"  # with the file name below: ...</script>.toml
    folder.mkdir()
    spec = folder / "script>'\".toml"
    spec.write_text(ONE_CELL.replace('name = "one"', f'name = "one"\ndescription = """{evil}"""'))
    out = tmp_path / "res"
    r = run_cli("run", spec, "--results", out, "--executor", "local", "--no-figures",
                env={"STUDY_INJECT_FAULT": "layers=2@1"})
    assert r.returncode == 1, r.stderr  # the cell failed, as injected
    store = Store(out)
    (row,) = store.read_trials().to_dict("records")
    assert row["status"] == "failed"
    row = {k: None if isinstance(v, float) and v != v else v for k, v in row.items()}  # NaN: null
    store.write_result({**row, "error": f"RuntimeError: {evil}"}, [])
    store.compact()  # the re-landed row replaces the old one for live readers, as a run's would
    r = run_cli("report", out)
    assert r.returncode == 0, r.stderr
    page = (out / "report.html").read_text()
    assert "<script" not in page.lower()
    esc = "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&quot;q&#x27;"
    assert page.count(esc) >= 2  # the description and the cell's error
    assert "&lt;script&gt;alert(&#x27;p&#x27;)&lt;/script&gt;&#x27;&quot;.toml" in page  # spec path
