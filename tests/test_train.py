"""The trial function on real torch: twins, divergence, retries, checkpoints."""
import gzip
import pickle

import numpy as np
import pytest
import torch

from study import data as datasets
from study.errors import DatasetError
from study.models import build_for_cell, n_params
from study.options import TrialOptions
from study.train import run_cell
from sweep import Cell

BASE = {"dataset": "digits", "layers": 1, "filters": 4, "kernel": 3, "activation": "relu",
        "batch_norm": False, "lr": 3e-3, "weight_decay": 1e-4, "batch_size": 64, "epochs": 2,
        "seed": 0, "val_fraction": 0.1, "max_train_examples": 300}


def cell(**over):
    return Cell.from_config({"architecture": "sequential", **BASE, **over}).to_dict()


def opts(tmp_path, **kw):
    kw.setdefault("checkpoint_every_s", 0)  # every epoch: the resume tests need one
    return TrialOptions(results_dir=str(tmp_path), device="cpu", **kw)


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_twins_have_equal_params_and_identical_initial_weights(layers, batch_norm):
    cfg = {**BASE, "layers": layers, "batch_norm": batch_norm}
    torch.manual_seed(0)
    deep, _ = build_for_cell({**cfg, "architecture": "sequential"}, 1, 10)
    torch.manual_seed(0)
    shallow, _ = build_for_cell({**cfg, "architecture": "parallel"}, 1, 10)
    assert n_params(deep) == n_params(shallow)
    for a, b in zip(deep.state_dict().values(), shallow.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("head", ["flatten", "gap"])
@pytest.mark.parametrize("pool", [1, 2, 4])
def test_layers_1_deep_and_shallow_give_identical_results(tmp_path, head, pool):
    # Same init and same batches, under every stem and head: one network on both sides.
    deep, _ = run_cell(cell(architecture="sequential", head=head, pool=pool), opts(tmp_path))
    shallow, _ = run_cell(cell(architecture="parallel", head=head, pool=pool), opts(tmp_path))
    assert deep["status"] == shallow["status"] == "ok"
    for k in ("train_loss", "val_loss", "test_loss", "train_acc", "val_acc", "test_acc", "n_params"):
        assert deep[k] == shallow[k], k
    assert deep["pair_key"] == shallow["pair_key"] and deep["cell_id"] != shallow["cell_id"]


def test_deeper_twins_differ_but_both_learn(tmp_path):
    # BASE leaves head and pool out: the model takes their defaults (flatten, pool 2).
    # 3 epochs on the 1,294 training digits (~60 steps) beat chance (0.1) clearly.
    kw = dict(layers=3, filters=8, epochs=3, max_train_examples=None)
    deep, _ = run_cell(cell(architecture="sequential", **kw), opts(tmp_path))
    shallow, _ = run_cell(cell(architecture="parallel", **kw), opts(tmp_path))
    assert deep["val_loss"] != shallow["val_loss"]
    assert deep["val_acc"] > 0.8 and shallow["val_acc"] > 0.8, (deep["val_acc"], shallow["val_acc"])


def test_divergence_stops_the_cell_without_retry(tmp_path):
    row, epochs = run_cell(cell(lr=1e6, epochs=5), opts(tmp_path))
    assert row["status"] == "diverged" and "non-finite" in row["error"]
    assert row["attempts"] == 1 and row["epochs_done"] < 5


def test_a_raising_cell_is_retried_and_resumes_from_its_checkpoint(tmp_path):
    c = cell(epochs=3)
    row, epochs = run_cell(c, opts(tmp_path, inject_fault="layers=1@3x1"))
    assert row["status"] == "ok" and row["attempts"] == 2
    assert row["resumed_from_epoch"] == 2  # epochs 1-2 came from the checkpoint
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    # ...and the resumed result equals an uninterrupted run (same batches, same state).
    clean, _ = run_cell(c, opts(tmp_path / "clean"))
    assert clean["val_loss"] == pytest.approx(row["val_loss"], rel=1e-6)


def test_a_cell_that_keeps_raising_is_recorded_as_failed(tmp_path):
    row, _ = run_cell(cell(), opts(tmp_path, max_failures=2, inject_fault="layers=1@1"))
    assert row["status"] == "failed" and row["attempts"] == 3
    assert row["error"] == "study.train.InjectedFault: injected fault at epoch 1 (attempt 3)"


# -- datasets in torchvision's on-disk layouts ----------------------------------------------
def _idx(path, arr, gz=False):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)


def make_mnist(root, folder="MNIST", n_train=120, n_test=40, gz=False):
    rng = np.random.default_rng(0)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        _idx(raw / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, n), gz)


def make_cifar(root, n=20):
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, n).tolist()}, f)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_layout_loads(tmp_path, gz):
    make_mnist(tmp_path, gz=gz)
    d = datasets.load("mnist", tmp_path, val_fraction=0.25)
    assert d.train_x.shape == (90, 1, 28, 28) and d.val_x.shape[0] == 30
    assert d.test_x.shape == (40, 1, 28, 28) and d.n_classes == 10
    assert abs(float(d.train_x.mean())) < 0.2  # normalised


def test_fashion_and_cifar_layouts_load(tmp_path):
    make_mnist(tmp_path, folder="FashionMNIST")
    assert datasets.load("fashion_mnist", tmp_path).train_x.shape[1:] == (1, 28, 28)
    make_cifar(tmp_path)
    d = datasets.load("cifar10", tmp_path, val_fraction=0.1, max_train_examples=50)
    assert d.train_x.shape == (50, 3, 32, 32) and d.test_x.shape == (20, 3, 32, 32)


def test_missing_dataset_names_the_expected_files(tmp_path):
    with pytest.raises(DatasetError) as e:
        datasets.check_available("mnist", tmp_path)
    msg = str(e.value)
    assert "MNIST/raw/train-images-idx3-ubyte" in msg and "--download" in msg and "\n" not in msg
    with pytest.raises(DatasetError, match="needs --data-dir"):
        datasets.check_available("cifar10", None)


def test_datasets_are_one_table_keyed_by_the_grids_names(tmp_path, monkeypatch):
    from sweep.params import DATASETS

    assert tuple(datasets.SOURCES) == DATASETS
    with pytest.raises(DatasetError, match="unknown dataset 'kmnist'; known: digits, mnist"):
        datasets.check_available("kmnist", tmp_path)
    # Data in the MNIST layout is one entry: found, named when missing, read.
    monkeypatch.setitem(datasets.SOURCES, "kmnist", datasets._idx("KMNIST"))
    with pytest.raises(DatasetError, match="KMNIST/raw/train-images-idx3-ubyte"):
        datasets.check_available("kmnist", tmp_path)
    make_mnist(tmp_path, folder="KMNIST", gz=True)
    raw = datasets.load_raw("kmnist", tmp_path)
    assert raw.train_x.shape == (120, 1, 28, 28) and raw.test_x.shape == (40, 1, 28, 28)
    assert raw.n_classes == 10 and raw.scale == 255.0


def test_dataset_is_loaded_once_per_process():
    a = datasets.load("digits", None, 0.1, None)
    b = datasets.load("digits", None, 0.1, None)
    assert a is b


@pytest.mark.parametrize("head", ["flatten", "gap"])
def test_even_kernels_keep_the_shape(head):
    for arch in ("sequential", "parallel"):
        model, _ = build_for_cell({**BASE, "architecture": arch, "kernel": 4, "layers": 2,
                                   "head": head}, 1, 10)
        assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_weights_file_records_the_image_size(tmp_path):
    # ...so that the lesion analysis rebuilds the flattened head at the right size.
    from study.lesion import load_model

    row, _ = run_cell(cell(epochs=1, pool=1), opts(tmp_path, save_weights=True))
    model, saved = load_model(tmp_path / row["weights_path"])
    assert list(saved["image_size"]) == [8, 8]
    assert model.head.in_features == BASE["filters"] * 8 * 8


def test_a_cell_trains_the_same_whatever_strides_its_images_arrived_with(tmp_path, monkeypatch):
    # A one-channel image's layout is told apart only by the stride of its size-1 channel
    # dimension: 1 after a numpy read here, 64/784 after Ray's object store. That stride
    # picked the convolution kernel, so the same cell trained at another speed and with other
    # rounding under Ray than in process. Both must now give the same tensors and results.
    raw = datasets.load_raw("digits")
    shipped = datasets.Raw(**{**raw.__dict__, "train_x": np.array(raw.train_x),
                              "test_x": np.array(raw.test_x)})
    assert shipped.train_x.strides != raw.train_x.strides  # as Ray hands them over
    monkeypatch.setattr(datasets, "_CACHE", {})  # this process's cache stays as it was
    rows = []
    for i, r in enumerate((raw, shipped)):
        datasets._CACHE.clear()
        d = datasets.load("digits", None, 0.1, None, raw=r)
        assert d.train_x.stride() == (64, 1, 8, 1)  # channels-last, stated
        assert d.train_x.is_contiguous(memory_format=torch.channels_last)
        rows.append(run_cell(cell(layers=2), opts(tmp_path / str(i)), raw=r)[0])
    assert rows[0]["status"] == rows[1]["status"] == "ok"
    for k in ("train_loss", "val_loss", "test_loss", "val_acc"):
        assert rows[0][k] == rows[1][k], k
