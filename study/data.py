"""Datasets as whole tensors, loaded once per worker process and reused by every cell.

The driver reads each dataset once (`load_raw`: uint8, numpy, no torch) and ships it to the
trials through Ray's object store, so the files need exist only on the driver's machine.

Readers parse torchvision's on-disk layouts directly into tensors (no PIL per item, no
DataLoader workers); torchvision itself is used only to download when asked:
    mnist          DATA_DIR/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    fashion_mnist  DATA_DIR/FashionMNIST/raw/  (same file names)
    cifar10        DATA_DIR/cifar-10-batches-py/{data_batch_1..5,test_batch}
    digits         scikit-learn's bundled copy (offline, 8x8); no folder needed
Each is one entry of the table SOURCES (files, reader, download), keyed by the names of
sweep.params.DATASETS. Adding data in the MNIST layout (Fashion-MNIST-like) is one entry,
`"kmnist": _idx("KMNIST")`, plus its name and sizes in sweep/params.py.
"""
from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sweep.params import DATASETS, split_sizes

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

    def splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{"train": (x, y), "val": ..., "test": ...}, in that order."""
        return {"train": (self.train_x, self.train_y), "val": (self.val_x, self.val_y),
                "test": (self.test_x, self.test_y)}

    def to(self, device) -> "Data":
        return Data(self.name, *(t.to(device) for t in (
            self.train_x, self.train_y, self.val_x, self.val_y, self.test_x, self.test_y)),
            self.n_classes)


def _idx_files(folder: str) -> Callable[[Path], list[Path]]:
    return lambda root: [root / folder / "raw" / f"{s}-{k}-ubyte" for s in ("train", "t10k")
                         for k in ("images-idx3", "labels-idx1")]


_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _exists(p: Path) -> bool:
    return p.is_file() or p.with_name(p.name + ".gz").is_file()


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


def _load_idx(folder: str) -> Callable[[Path], tuple]:
    def read(data_dir) -> tuple:
        raw = Path(data_dir) / folder / "raw"
        out = []
        for split in ("train", "t10k"):
            x = _read_idx(raw / f"{split}-images-idx3-ubyte")[:, None]
            y = _read_idx(raw / f"{split}-labels-idx1-ubyte").astype(np.int64)
            if len(x) != len(y):
                raise DatasetError(f"{raw}: {split} images and labels differ in count")
            out += [x, y]
        return (*out, 10, 255.0)
    return read


# What a CIFAR-10 batch file holds: a dict of bytes keys, lists of ints and bytes, and numpy
# arrays; the arrays pickle as these calls (numpy.core in the original Python 2 files,
# numpy._core from numpy 2, _codecs.encode for bytes pickled by Python 3 at protocol 2).
# Anything else in the file (os.system, builtins.eval, ...) is refused before it runs.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(
                f"it asks for {module}.{name}, which a CIFAR-10 batch never holds (refused "
                "unread); replace the file with the dataset's own copy")
        return super().find_class(module, name)


def _load_cifar(data_dir) -> tuple:
    folder = Path(data_dir) / "cifar-10-batches-py"
    parts = {}
    for fname in _CIFAR_FILES:
        try:
            with open(folder / fname, "rb") as f:
                d = _CifarUnpickler(f, encoding="bytes").load()
            if not isinstance(d, dict):
                raise ValueError(f"it holds a {type(d).__name__}, not a dict")
            x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(d[b"labels"], dtype=np.int64)
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as e:
            raise DatasetError(f"cannot read CIFAR-10 batch {folder / fname}: {e}") from None
        parts[fname] = (x, y)
    train = [parts[f] for f in _CIFAR_FILES[:-1]]
    return (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]),
            *parts["test_batch"], 10, 255.0)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits file, read directly: importing sklearn.datasets costs
    seconds of every command's start-up (scipy and more) for a 1,797-row CSV."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" \
        if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():  # a layout we do not know: ask sklearn
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target
    data = np.loadtxt(path, delimiter=",")  # 64 pixel columns, then the label
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1]


def _load_digits(data_dir=None) -> tuple:
    images, target = _digits_arrays()
    x = images.astype(np.uint8)[:, None]  # values 0..16
    y = target.astype(np.int64)
    # digits has no official test split: hold out a fixed 20 %.
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test], 10, 16.0


@dataclass(frozen=True)
class Source:
    """Where a dataset lives under --data-dir, how it is read, and how it is fetched."""
    files: Callable[[Path], list[Path]] | None  # the files under DATA_DIR; None: bundled, no folder
    read: Callable[[Path | None], tuple]  # DATA_DIR -> (train_x, train_y, test_x, test_y,
    #                                        n_classes, pixel value of 1.0), uint8 (N, C, H, W)
    download: str | None = None  # the torchvision.datasets class that downloads it


def _idx(folder: str) -> Source:
    """A dataset in torchvision's MNIST layout: DATA_DIR/<folder>/raw/*-ubyte[.gz], where
    <folder> is also the name of torchvision's class for it."""
    return Source(files=_idx_files(folder), read=_load_idx(folder), download=folder)


# One entry per dataset, keyed by the names of sweep.params.DATASETS (a test checks they are
# equal). Data in the MNIST layout (Fashion-MNIST-like, e.g. torchvision's KMNIST) is one more
# entry here, `"kmnist": _idx("KMNIST")`, plus its name and sizes in sweep/params.py (DATASETS,
# DATASET_SIZES), where the grid and `study plan` learn of it.
SOURCES: dict[str, Source] = {
    "digits": Source(files=None, read=_load_digits),
    "mnist": _idx("MNIST"),
    "fashion_mnist": _idx("FashionMNIST"),
    "cifar10": Source(files=lambda root: [root / "cifar-10-batches-py" / f for f in _CIFAR_FILES],
                      read=_load_cifar, download="CIFAR10"),
}


def expected_files(name: str, data_dir: str | Path | None) -> list[Path]:
    files = SOURCES[name].files if name in SOURCES else None
    return files(Path(data_dir or ".")) if files else []


def check_available(name: str, data_dir: str | Path | None, download: bool = False) -> None:
    """Raise DatasetError (one line) unless the dataset can be loaded; download if asked."""
    if name not in SOURCES:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if SOURCES[name].files is None:
        return
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

    cls = getattr(tvd, SOURCES[name].download)
    try:
        for train in (True, False):
            cls(root=str(data_dir), train=train, download=True)
    except Exception as e:  # network errors come in many types
        raise DatasetError(f"could not download {name} into {data_dir}: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


@dataclass
class Raw:
    """A dataset as it is stored: uint8 images (N, C, H, W) and int64 labels, in numpy, plus
    the training split's per-channel statistics. This is what the driver puts in Ray's object
    store (55 MB for MNIST, 184 MB for CIFAR-10): a quarter of the float32 size, shared by
    every trial on a node, converted to float only on the trial's device."""
    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    n_classes: int
    scale: float  # pixel value of 1.0
    mean: np.ndarray  # (C,) float32, of x / scale over the training split
    std: np.ndarray


def load_raw(name: str, data_dir: str | Path | None = None, download: bool = False) -> Raw:
    """Read a dataset from disk as uint8 (no torch): on the driver, once per study."""
    check_available(name, data_dir, download)
    x_tr, y_tr, x_te, y_te, n_classes, scale = SOURCES[name].read(data_dir)
    xf = x_tr.astype(np.float64) / scale
    mean = xf.mean(axis=(0, 2, 3)).astype(np.float32)
    std = (xf.std(axis=(0, 2, 3)) + 1e-6).astype(np.float32)
    return Raw(name, x_tr, y_tr, x_te, y_te, n_classes, scale, mean, std)


_CACHE: dict[tuple, Data] = {}


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """Images stored channels-last (NHWC strides), whatever layout they arrived in.

    The convolutions follow their input's layout. With one channel both layouts count as
    contiguous, and only the stride of the size-1 channel dimension tells them apart: it is
    1 after a numpy read here but 784 after a trip through Ray's object store. The layout
    picks the kernel (oneDNN's NHWC convolution was ~20% faster on this project's CPU
    machine), so the same cell trained at different speeds, with different rounding, in
    process and under Ray. Stating the layout makes every executor run the same kernels."""
    import torch

    _, c, h, w = x.shape
    return torch.empty_strided(x.shape, (c * h * w, 1, w * c, c), dtype=x.dtype,
                               device=x.device).copy_(x)


def load(name: str, data_dir: str | Path | None = None, val_fraction: float = 0.1,
         max_train_examples: int | None = None, device: str | torch.device = "cpu",
         download: bool = False, raw: Raw | None = None) -> Data:
    """The dataset as float tensors on `device`, split into train/validation/test.

    `raw`: the arrays the driver shipped through Ray (the files need not exist on this node);
    without it the files are read here. Cached per process: a Ray actor reused across cells
    converts the data once.
    """
    import torch

    key = (name, str(data_dir), float(val_fraction), max_train_examples, str(device))
    if key in _CACHE:
        return _CACHE[key]
    if raw is None:
        base_key = ("raw", name, str(data_dir))
        if base_key not in _CACHE:
            _CACHE[base_key] = load_raw(name, data_dir, download)
        raw = _CACHE[base_key]
    n = len(raw.train_x)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED)).numpy()
    n_val, n_train = split_sizes(n, val_fraction, max_train_examples)
    val_idx, train_idx = perm[:n_val], perm[n_val:n_val + n_train]
    device = torch.device(device)
    mean = torch.as_tensor(raw.mean, device=device).view(1, -1, 1, 1)
    std = torch.as_tensor(raw.std, device=device).view(1, -1, 1, 1)

    def tensor(arr: np.ndarray) -> torch.Tensor:
        # arrays from Ray's object store (or np.frombuffer) are read-only: copy those
        ok = arr.flags.writeable and arr.flags.c_contiguous
        return torch.from_numpy(arr if ok else np.array(arr)).to(device)

    def images(arr: np.ndarray) -> torch.Tensor:
        # uint8 travels to the device (a quarter of the bytes); float only there
        return channels_last((tensor(arr).float() / raw.scale - mean) / std)

    labels = tensor

    data = Data(name, images(raw.train_x[train_idx]), labels(raw.train_y[train_idx]),
                images(raw.train_x[val_idx]), labels(raw.train_y[val_idx]),
                images(raw.test_x), labels(raw.test_y), raw.n_classes)
    _CACHE[key] = data
    return data
