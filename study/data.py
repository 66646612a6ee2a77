"""Datasets as whole tensors, loaded once per worker process and reused by every cell.

Readers parse torchvision's on-disk layouts directly into tensors (no PIL per item, no
DataLoader workers); torchvision itself is used only to download when asked:
    mnist          DATA_DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    fashion_mnist  DATA_DIR/FashionMNIST/raw/  (same file names)
    cifar10        DATA_DIR/cifar-10-batches-py/{data_batch_1..5,test_batch}
    digits         scikit-learn's bundled copy (offline, 8x8); no folder needed
"""
from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetError

SPLIT_SEED = 0  # fixed: every cell of a study sees the same train/validation split


@dataclass
class Data:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    n_classes: int

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    def to(self, device) -> "Data":
        return Data(self.name, *(t.to(device) for t in (
            self.train_x, self.train_y, self.val_x, self.val_y, self.test_x, self.test_y)),
            self.n_classes)


_IDX = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def expected_files(name: str, data_dir: str | Path | None) -> list[Path]:
    root = Path(data_dir or ".")
    if name in _IDX:
        raw = root / _IDX[name] / "raw"
        return [raw / f"{s}-{k}-ubyte" for s in ("train", "t10k")
                for k in ("images-idx3", "labels-idx1")]
    if name == "cifar10":
        return [root / "cifar-10-batches-py" / f for f in _CIFAR_FILES]
    return []


def _exists(p: Path) -> bool:
    return p.is_file() or p.with_name(p.name + ".gz").is_file()


def check_available(name: str, data_dir: str | Path | None, download: bool = False) -> None:
    """Raise DatasetError (one line) unless the dataset can be loaded; download if asked."""
    if name == "digits":
        return
    if name not in _IDX and name != "cifar10":
        raise DatasetError(f"unknown dataset {name!r}; known: digits, mnist, fashion_mnist, cifar10")
    if data_dir is None:
        raise DatasetError(f"dataset {name} needs --data-dir (a folder in torchvision's layout); "
                           "add --download to fetch it there")
    files = expected_files(name, data_dir)
    if all(_exists(f) for f in files):
        return
    if download:
        _download(name, data_dir)
        return
    missing = [str(f) for f in files if not _exists(f)]
    raise DatasetError(f"dataset {name} not found: expected {', '.join(missing)} "
                       f"(torchvision's layout under --data-dir {data_dir}); "
                       "add --download to fetch it, or point --data-dir at the folder that holds it")


def _download(name: str, data_dir: str | Path) -> None:
    import torchvision.datasets as tvd

    cls = {"mnist": tvd.MNIST, "fashion_mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10}[name]
    try:
        for train in (True, False):
            cls(root=str(data_dir), train=train, download=True)
    except Exception as e:  # network errors come in many types
        raise DatasetError(f"could not download {name} into {data_dir}: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _read_idx(path: Path) -> np.ndarray:
    """IDX format (MNIST family): magic (dtype, ndim), dims as big-endian int32, then data."""
    if not path.is_file():
        path = path.with_name(path.name + ".gz")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(tuple(int(d) for d in dims))


def _load_idx(name: str, data_dir) -> tuple:
    raw = Path(data_dir) / _IDX[name] / "raw"
    out = []
    for split in ("train", "t10k"):
        x = _read_idx(raw / f"{split}-images-idx3-ubyte").astype(np.float32)[:, None] / 255.0
        y = _read_idx(raw / f"{split}-labels-idx1-ubyte").astype(np.int64)
        if len(x) != len(y):
            raise DatasetError(f"{raw}: {split} images and labels differ in count")
        out += [x, y]
    return (*out, 10)


def _load_cifar(data_dir) -> tuple:
    folder = Path(data_dir) / "cifar-10-batches-py"
    parts = {}
    for fname in _CIFAR_FILES:
        try:
            with open(folder / fname, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(d[b"labels"], dtype=np.int64)
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
            raise DatasetError(f"cannot read CIFAR-10 batch {folder / fname}: {e}") from None
        parts[fname] = (x.astype(np.float32) / 255.0, y)
    train = [parts[f] for f in _CIFAR_FILES[:-1]]
    return (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]),
            *parts["test_batch"], 10)


def _load_digits() -> tuple:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    # digits has no official test split: hold out a fixed 20 %.
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test], 10


_CACHE: dict[tuple, Data] = {}


def load(name: str, data_dir: str | Path | None = None, val_fraction: float = 0.1,
         max_train_examples: int | None = None, device: str | torch.device = "cpu",
         download: bool = False) -> Data:
    """The dataset as tensors on `device`, split into train/validation/test.

    Cached per process: a Ray actor reused across cells reads the files once.
    """
    key = (name, str(data_dir), float(val_fraction), max_train_examples, str(device))
    if key in _CACHE:
        return _CACHE[key]
    base_key = (name, str(data_dir))
    if base_key not in _CACHE:
        check_available(name, data_dir, download)
        if name == "digits":
            arrays = _load_digits()
        elif name == "cifar10":
            arrays = _load_cifar(data_dir)
        else:
            arrays = _load_idx(name, data_dir)
        x_tr, y_tr, x_te, y_te, n_classes = arrays
        # Normalise with the training split's per-channel statistics.
        mean = x_tr.mean(axis=(0, 2, 3), keepdims=True)
        std = x_tr.std(axis=(0, 2, 3), keepdims=True) + 1e-6
        _CACHE[base_key] = Data(name, torch.from_numpy((x_tr - mean) / std), torch.from_numpy(y_tr),
                                torch.empty(0), torch.empty(0),
                                torch.from_numpy((x_te - mean) / std), torch.from_numpy(y_te),
                                n_classes)
    full = _CACHE[base_key]
    n = len(full.train_x)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = int(round(n * val_fraction))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    if max_train_examples is not None:
        train_idx = train_idx[:max_train_examples]
    data = Data(name, full.train_x[train_idx], full.train_y[train_idx],
                full.train_x[val_idx], full.train_y[val_idx], full.test_x, full.test_y,
                full.n_classes).to(device)
    _CACHE[key] = data
    return data
