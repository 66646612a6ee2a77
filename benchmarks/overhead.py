"""What the tool adds on top of training: `study run` against a bare PyTorch loop.

Both train the same cells on the same data with the same threads, one cell at a time:
  bare  - a hand-written loop in one process: tensors in memory, AdamW, the same
          evaluations the tool records (validation after each epoch; train, validation and
          test at the end), and nothing else: no Ray, no store, no checkpoints;
  tool  - `study run --executor ray --max-concurrent 1` (Ray Tune with actor reuse, the
          Parquet store, per-epoch checkpoints and validation, the progress line), and
          `--executor local`.
Prints wall times, the ratio tool/bare over the cells (first cell start to last cell end, from
the store's started_at/finished_at), the overhead per cell, and the fixed start-up (Ray).

Data: real MNIST images from ../shared/data/mnist (the official 10,000-image test split,
split here into 8,000 training and 2,000 test images in torchvision's layout, in a temporary
folder), or digits with --dataset digits.

    python benchmarks/overhead.py [--cells 16] [--epochs 2] [--dataset mnist|digits]
"""
from __future__ import annotations

import argparse
import gzip
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# next to the checkout, or next to the folder of its git worktree
MNIST = next((m for m in (ROOT.parent / "shared" / "data" / "mnist",
                          ROOT.parents[1] / "shared" / "data" / "mnist") if m.is_dir()),
             ROOT.parent / "shared" / "data" / "mnist")


def make_mnist_folder(dest: Path) -> None:
    """The 10k official test split -> 8k train / 2k test IDX files in torchvision's layout."""
    def read(name):
        raw = gzip.open(MNIST / name).read()
        ndim = raw[3]
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)

    def write(path, arr):
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        path.write_bytes(header + arr.astype(np.uint8).tobytes())

    x, y = read("t10k-images-idx3-ubyte.gz"), read("t10k-labels-idx1-ubyte.gz")
    raw = dest / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write(raw / "train-images-idx3-ubyte", x[:8000])
    write(raw / "train-labels-idx1-ubyte", y[:8000])
    write(raw / "t10k-images-idx3-ubyte", x[8000:])
    write(raw / "t10k-labels-idx1-ubyte", y[8000:])


def spec_text(dataset: str, cells: int, epochs: int) -> str:
    # From 2 layers: at 1 the parallel cell is the sequential network, which `study run`
    # records without training it, so the tool would do less work than the bare loop.
    layers = [2, 3, 4, 5, 6, 7, 8, 9][: max(1, cells // 2)]
    return f"""
[study]
name = "bench"
[grid]
dataset = "{dataset}"
architecture = ["sequential", "parallel"]
layers = {layers}
filters = 8
kernel = 3
epochs = {epochs}
batch_size = 128
lr = 1e-3
"""


def bare(spec_path: Path, data_dir: str | None, threads: int) -> float:
    """The baseline: the cells' training and nothing else, in this process."""
    import torch
    import torch.nn.functional as F

    from study import data as datasets
    from study.models import build_for_cell
    from study.train import evaluate  # the tool's own evaluation: the same batches, same cost
    from sweep import load_spec

    torch.set_num_threads(threads)
    cells = load_spec(spec_path).cells()
    t0 = time.perf_counter()
    for c in cells:
        cfg = c.config
        d = datasets.load(cfg["dataset"], data_dir, cfg["val_fraction"], None)
        torch.manual_seed(cfg["seed"])
        model, _ = build_for_cell(cfg, d.in_channels, d.n_classes)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        n, bs = len(d.train_x), cfg["batch_size"]
        for _ in range(cfg["epochs"]):
            model.train()
            perm = torch.randperm(n)
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                loss = F.cross_entropy(model(d.train_x[idx]), d.train_y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            evaluate(model, d.val_x, d.val_y)
        for x, y in ((d.train_x, d.train_y), (d.val_x, d.val_y), (d.test_x, d.test_y)):
            evaluate(model, x, y)
    return time.perf_counter() - t0


def tool(spec_path: Path, data_dir: str | None, executor: str, out: Path) -> tuple[float, float]:
    """Wall time of the whole command, and the span from the first cell's start to the last
    cell's end (what the cells cost, without the command's fixed start-up)."""
    from study.store import Store

    cmd = [sys.executable, "-m", "study.cli", "run", str(spec_path), "--results", str(out),
           "--executor", executor, "--max-concurrent", "1", "--cpus-per-trial", "1",
           "--no-figures", "--quiet"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    t0 = time.perf_counter()
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    df = Store(out).read_trials()
    return wall, (df["finished_at"].max() - df["started_at"].min()).total_seconds()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--dataset", choices=["mnist", "digits"], default="mnist")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        data_dir = None
        if args.dataset == "mnist":
            make_mnist_folder(tmp / "data")
            data_dir = str(tmp / "data")
        spec_path = tmp / "bench.toml"
        spec_path.write_text(spec_text(args.dataset, args.cells, args.epochs))
        n = 2 * max(1, args.cells // 2)
        t_bare = bare(spec_path, data_dir, threads=1)
        t_local, c_local = tool(spec_path, data_dir, "local", tmp / "res-local")
        t_ray, c_ray = tool(spec_path, data_dir, "ray", tmp / "res-ray")
        print(f"{n} cells x {args.epochs} epochs on {args.dataset}, 1 thread, one cell at a time")
        print(f"bare loop                 {t_bare:8.1f} s")
        for name, (t, c) in (("local", (t_local, c_local)), ("ray", (t_ray, c_ray))):
            print(f"study --executor {name:<6} cells {c:6.1f} s  ratio {c / t_bare:.3f}  "
                  f"overhead {(c - t_bare) / n * 1000:+5.0f} ms/cell  "
                  f"(whole command {t:.1f} s: fixed start-up {t - c:.1f} s)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
