"""The study on one GPU: throughput of the paper preset's MNIST cells packed K to a GPU.

A fixed sample of the `paper` preset's MNIST deep/shallow pairs, from small to large (by
their counted FLOPs, sweep.cost), trains for a few epochs per setting: K = 1, 2, 4, 8 cells
sharing the GPU (K processes, each running `study.train.run_cell` directly on the whole
sample, each with its own results folder; no Ray, no install: run it with PYTHONPATH set to
the checkout), at fp32 and bf16, with cudnn.benchmark off and (at K = 1 and 4) on, and the
parallel body as today's branch loop and (at K = 1) as the wide single conv. Prints per
setting: cells per hour, achieved TFLOPS (counted FLOPs over wall time), that as a fraction of
the GPU's peak (--peak-tflops, default the H100 SXM's dense BF16/TF32 datasheet figures; FP32
cells are set against the TF32 peak), the GPU utilisation sampled while it runs (nvidia-smi,
else torch.cuda.utilization), the training-time ratio parallel / sequential per epoch
(median over the sample's pairs, epoch rows' train_s) for the loop and the wide body, and the
projected hours of the whole paper preset at the best setting (its counted FLOPs over the
best achieved FLOPS: the sample is weighted towards large cells, so small-cell-heavy grids
run slower than that).

Data: real MNIST from --mnist DIR (torchvision's layout, DIR/MNIST/raw/...), else random
uint8 images of MNIST's shapes (60,000 + 10,000, 1x28x28): the same arithmetic.
Without a CUDA GPU it says so and exits 0. Sized to about 4 minutes on an H100-class GPU
with the defaults (--epochs 1, --max-train-examples 20000, 3 pairs); untested on a GPU yet.

    PYTHONPATH=. python benchmarks/gpu.py [--mnist DIR] [--pairs 3] [--epochs 1]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sweep import Cell, load_spec, same_network  # noqa: E402
from sweep.cost import PEAK_FLOPS, cell_flops, grid_cost  # noqa: E402


def sample_pairs(n_pairs: int, epochs: int, max_train: int | None) -> list[tuple[dict, dict]]:
    """(sequential, parallel) configs of n_pairs paper MNIST pairs at FLOP quantiles, layers > 1
    (at layers 1 the two are one network), with the benchmark's epochs and example cap."""
    cells = [c for c in load_spec("paper").cells()
             if c["dataset"] == "mnist" and c["seed"] == 0 and c["layers"] > 1]
    seq = sorted((c for c in cells if c["architecture"] == "sequential"),
                 key=lambda c: cell_flops(c.config))
    par = {c.pair_key: c for c in cells if c["architecture"] == "parallel"}
    picks = [seq[round(q * (len(seq) - 1))] for q in
             ([0.5] if n_pairs == 1 else [i / (n_pairs - 1) for i in range(n_pairs)])]
    over = {"epochs": epochs, "max_train_examples": max_train}
    return [({**s.config, **over}, {**par[s.pair_key].config, **over}) for s in picks]


def _raw(mnist: str | None):
    from study import data as datasets

    if mnist:
        return datasets.load_raw("mnist", mnist)
    import numpy as np

    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (60_000, 1, 28, 28), dtype=np.uint8)
    x_te = rng.integers(0, 256, (10_000, 1, 28, 28), dtype=np.uint8)
    y_tr, y_te = rng.integers(0, 10, 60_000), rng.integers(0, 10, 10_000)
    mean, std = np.full(1, 0.5, np.float32), np.full(1, 0.29, np.float32)
    return datasets.Raw("mnist", x_tr, y_tr, x_te, y_te, 10, 255.0, mean, std)


def worker(configs: list[dict], setting: dict, results_dir: str, mnist: str | None,
           ready, start, out) -> None:
    """One of the K processes: load the data, warm CUDA up, wait for the others, train."""
    import torch

    from study.options import TrialOptions
    from study.train import run_cell

    raw = _raw(mnist)
    torch.zeros(1, device=setting["device"]).sum().item()  # CUDA context before the clock
    opts = TrialOptions(results_dir, device=setting["device"], max_failures=0,
                        parallel_body=setting["body"], cudnn_benchmark=setting["cudnn_benchmark"])
    ready.wait()
    start.wait()
    rows = []
    for config in configs:
        cell = Cell.from_config({**config, "precision": setting["precision"]}).to_dict()
        row, epochs = run_cell(cell, opts, raw=raw)
        rows.append({"architecture": config["architecture"], "pair_key": cell["pair_key"],
                     "status": row["status"], "error": row.get("error"),
                     "train_s": sum(e["train_s"] for e in epochs), "flops": cell_flops(config)})
    out.put(rows)


def gpu_utilisation(stop: threading.Event, samples: list) -> None:
    """Sample the GPU's utilisation (%) every 0.5 s until stop is set."""
    smi = shutil.which("nvidia-smi")
    while not stop.wait(0.5):
        try:
            if smi:
                r = subprocess.run([smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                    "-i", "0"], capture_output=True, text=True, timeout=5)
                samples.append(float(r.stdout.strip().splitlines()[0]))
            else:
                import torch

                samples.append(float(torch.cuda.utilization(0)))
        except Exception:  # noqa: BLE001 - no sampler: utilisation reads n/a
            return


def run_setting(pairs, setting: dict, k: int, mnist: str | None, tmp: Path) -> dict:
    """K processes train the sample under one setting; returns the setting's measurements."""
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    ready, start, out = ctx.Barrier(k + 1), ctx.Barrier(k + 1), ctx.Queue()
    configs = [c for pair in pairs for c in pair]
    procs = [ctx.Process(target=worker, args=(
        [{**c, "seed": c["seed"] + i} for c in configs], setting,
        str(tmp / f"{setting['name']}-k{k}-{i}"), mnist, ready, start, out)) for i in range(k)]
    for p in procs:
        p.start()
    ready.wait()
    samples, stop = [], threading.Event()
    if setting["device"] == "cuda":
        threading.Thread(target=gpu_utilisation, args=(stop, samples), daemon=True).start()
    t0 = time.perf_counter()
    start.wait()
    rows = [r for _ in procs for r in out.get()]
    wall = time.perf_counter() - t0
    stop.set()
    for p in procs:
        p.join()
    return {"setting": setting["name"], "k": k, "wall_s": wall, "rows": rows,
            "utilisation": statistics.mean(samples) if samples else None}


def summarise(res: dict, peak: dict) -> dict:
    rows = res["rows"]
    failed = [r for r in rows if r["status"] != "ok"]
    flops = sum(r["flops"] for r in rows)
    ratio = {}
    for pk in {r["pair_key"] for r in rows}:
        t = {r["architecture"]: r["train_s"] for r in rows if r["pair_key"] == pk}
        if "sequential" in t and "parallel" in t:
            ratio.setdefault(pk, []).append(t["parallel"] / t["sequential"])
    prec = res["precision"]
    achieved = flops / res["wall_s"]
    return {**{k: v for k, v in res.items() if k != "rows"},
            "cells_per_hour": len(rows) / res["wall_s"] * 3600, "tflops": achieved / 1e12,
            "fraction_of_peak": achieved / peak["bf16" if prec == "bf16" else "tf32"],
            "time_ratio_b_over_a": statistics.median(x for v in ratio.values() for x in v)
            if ratio else None, "failed": len(failed),
            "first_error": failed[0]["error"] if failed else None}


SETTINGS = [  # (precision, cudnn.benchmark, parallel body, packings K)
    ("fp32", False, "loop", (1, 2, 4, 8)), ("bf16", False, "loop", (1, 2, 4, 8)),
    ("fp32", True, "loop", (1, 4)), ("bf16", True, "loop", (1, 4)),
    ("fp32", False, "wide", (1,)), ("bf16", False, "wide", (1,)),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", help="folder holding MNIST in torchvision's layout (DIR/MNIST/raw)")
    ap.add_argument("--pairs", type=int, default=3, help="deep/shallow pairs in the sample")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-train-examples", type=int, default=20_000)
    ap.add_argument("--packs", default=None, help="comma-separated K to run (default: all)")
    ap.add_argument("--peak-tflops", nargs=2, type=float, metavar=("BF16", "TF32"),
                    default=(PEAK_FLOPS["bf16"] / 1e12, PEAK_FLOPS["tf32"] / 1e12))
    ap.add_argument("--json", help="also write the measurements to this file")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: run the benchmark's code on a CPU (a check of the script, "
                         "not a measurement)")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu benchmark: torch is not installed; nothing to measure")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu benchmark: no CUDA GPU on this machine (torch.cuda.is_available() is False); "
              "nothing to measure. Run it on a GPU node.")
        return 0
    peak = {"bf16": args.peak_tflops[0] * 1e12, "tf32": args.peak_tflops[1] * 1e12}
    packs = {int(k) for k in args.packs.split(",")} if args.packs else None
    pairs = sample_pairs(args.pairs, args.epochs, args.max_train_examples)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "the CPU (a check, not a measurement)"
    print(f"gpu benchmark on {name}: {len(pairs)} paper MNIST pairs "
          f"({', '.join(f'{cell_flops(s):.2g}' for s, _ in pairs)} FLOPs per sequential cell at "
          f"{args.epochs} epoch(s), {args.max_train_examples} examples), data "
          + (args.mnist or "random MNIST-shaped tensors"), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        for prec, bench, body, ks in SETTINGS:
            setting = {"name": f"{prec}{'-cudnnbench' if bench else ''}{'-wide' if body == 'wide' else ''}",
                       "precision": prec, "cudnn_benchmark": bench, "body": body,
                       "device": args.device}
            for k in ks:
                if packs and k not in packs:
                    continue
                res = run_setting(pairs, setting, k, args.mnist, Path(tmp))
                s = summarise({**res, "precision": prec}, peak)
                results.append(s)
                util = f"{s['utilisation']:.0f}%" if s["utilisation"] is not None else "n/a"
                ratio = f"{s['time_ratio_b_over_a']:.2f}" if s["time_ratio_b_over_a"] else "n/a"
                print(f"  {s['setting']:<22} K={k}  {s['wall_s']:7.1f} s  "
                      f"{s['cells_per_hour']:8.0f} cells/h  {s['tflops']:6.3g} TFLOPS "
                      f"({s['fraction_of_peak']:.1%} of peak)  GPU {util}  "
                      f"parallel/sequential train time {ratio}"
                      + (f"  FAILED {s['failed']}: {s['first_error']}" if s["failed"] else ""),
                      flush=True)
    best = max(results, key=lambda s: s["tflops"])
    cells = load_spec("paper").cells()
    paper = grid_cost([same_network.trained_cell(g) for g in same_network.groups(cells).values()])
    total = sum(d.total for d in paper.datasets.values())
    print(f"best: {best['setting']} K={best['k']}, {best['tflops']:.1f} TFLOPS: the paper preset "
          f"({total:.2g} FLOPs) would take {total / (best['tflops'] * 1e12) / 3600:.1f} h on this GPU")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
