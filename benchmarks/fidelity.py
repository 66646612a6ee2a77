"""Do the networks a study trains learn like the paper's? Per-epoch validation accuracy on
real MNIST images.

Data: the official 10,000-image MNIST test split (../shared/data/mnist), cut into 8,000
training and 2,000 test images in torchvision's layout (benchmarks/overhead.py's
make_mnist_folder, in a temporary folder); the tool holds out 10 % of training for
validation, so the cells train on 7,200 images and validate on 800.

Cells: sequential and parallel at layers 2 and 4 (default: filters 16, kernel 3, AdamW lr 1e-3,
batch 128, 5 epochs, the parameter table's default head and pool), trained by the tool's own
trial function (study.train.train_cell), one after another in this process.
Goal (issue 8): every cell reaches >= 97 % validation accuracy within 5 epochs.

    python benchmarks/fidelity.py [--epochs 5] [--head flatten|gap] [--pool 1|2|4] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import overhead  # noqa: E402  (make_mnist_folder)
from study.options import TrialOptions  # noqa: E402
from study.train import train_cell  # noqa: E402
from sweep import Cell  # noqa: E402
from sweep.params import PARAMS  # noqa: E402

GOAL = 0.97


def find_mnist() -> Path:
    # The worktree may sit one level deeper than the main checkout: look upwards.
    for parent in ROOT.parents:
        if (parent / "shared" / "data" / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
            return parent / "shared" / "data" / "mnist"
    sys.exit("fidelity: cannot find shared/data/mnist/t10k-images-idx3-ubyte.gz above " + str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--filters", type=int, default=16)
    ap.add_argument("--kernel", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--head", default=PARAMS["head"].default, choices=PARAMS["head"].choices)
    ap.add_argument("--pool", type=int, default=PARAMS["pool"].default, choices=PARAMS["pool"].choices)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    overhead.MNIST = find_mnist()
    with tempfile.TemporaryDirectory(prefix="fidelity-") as tmp:
        data_dir = Path(tmp) / "data"
        overhead.make_mnist_folder(data_dir)
        opts = TrialOptions(results_dir=str(Path(tmp) / "results"), data_dir=str(data_dir),
                            threads=args.threads, device="auto")
        print(f"MNIST 8,000/2,000 (7,200 train, 800 val); head {args.head}, pool {args.pool}, "
              f"filters {args.filters}, kernel {args.kernel}, lr {args.lr}, batch {args.batch_size}, "
              f"{args.threads} threads")
        rows = []
        for layers in args.layers:
            for arch in ("sequential", "parallel"):
                c = Cell.from_config({
                    "dataset": "mnist", "architecture": arch, "layers": layers,
                    "filters": args.filters, "kernel": args.kernel, "activation": "relu",
                    "batch_norm": False, "head": args.head, "pool": args.pool, "lr": args.lr,
                    "weight_decay": 1e-4, "batch_size": args.batch_size, "epochs": args.epochs,
                    "seed": 0, "val_fraction": 0.1, "max_train_examples": None})
                t0 = time.perf_counter()
                result, epochs = train_cell(c.config, c.cell_id, opts)
                accs = [e["val_acc"] for e in epochs]
                rows.append((arch, layers, result["n_params"], accs, time.perf_counter() - t0))
                print(f"  {arch:<10} layers {layers}  n_params {result['n_params']:>7,}  val_acc "
                      + " ".join(f"{a:.4f}" for a in accs)
                      + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        ok = all(max(accs) >= GOAL for *_, accs, _ in rows)
        first = [next((i + 1 for i, a in enumerate(accs) if a >= GOAL), None) for *_, accs, _ in rows]
        print(f"goal: every cell >= {GOAL:.0%} val acc within {args.epochs} epochs: "
              f"{'MET' if ok else 'NOT MET'} (first epoch at goal per cell: "
              + ", ".join(str(f) if f else "-" for f in first) + ")")


if __name__ == "__main__":
    main()
