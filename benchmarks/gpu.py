"""The study on one GPU: one cell per trial, K processes sharing it, and K cells fused.

A fixed sample of the `paper` preset's MNIST deep/shallow pairs, from small to large (by
their counted FLOPs, sweep.cost), trains for a few epochs in each mode, at fp32, tf32 and
bf16 (no Ray, no install: run it with PYTHONPATH set to the checkout):
  solo     one process, one cell at a time (study.train.run_cell): one cell per trial;
  procs    K processes sharing the GPU, each running the sample at its own seed offset
           (--gpus-per-trial 1/K), each with its own results folder;
  fused    one process, each pair's cells at K/2 seeds (sequential and parallel) as one
           fused group (study.fused.train.run_group): as many cells as `procs` trains;
  graphed  the same groups with the fused step captured in a CUDA graph
           (study.fused.graphs.GraphedStep), training only (no evaluation), followed by the
           graph's equality check against the eager step (relative norm of the weights after
           3 steps from one state; ~0 expected).
Per mode and precision it prints cells per hour, achieved TFLOPS (counted FLOPs over wall
time; training FLOPs only for `graphed`), that as a fraction of the peak of that precision
(FP32, TF32 and BF16 each their own, sweep.cost.PEAK_FLOPS: the H100 SXM's dense datasheet
figures unless --peak-tflops), the GPU utilisation sampled while it runs (nvidia-smi, else
torch.cuda.utilization), the fused modes' training-only TFLOPS (epoch rows' train_s) and
the projected hours of the whole paper preset at that rate (its counted FLOPs over the
achieved FLOPS: the sample is weighted towards large cells, so small-cell-heavy grids run
slower than that). Then the issue-28 goals: bf16 fused cells per hour >= 5x solo, and the
projected bf16 hours within 2x of the BF16 FLOP floor. --more adds the older settings
(cudnn.benchmark on, the parallel body as one wide conv, K = 2 and 8 processes).

Data: real MNIST from --mnist DIR (torchvision's layout, DIR/MNIST/raw/...), else random
uint8 images of MNIST's shapes (60,000 + 10,000, 1x28x28): the same arithmetic.
Without a CUDA GPU it says so and exits 0. Sized to about 4 minutes on an H100-class GPU
with the defaults (--epochs 1, --max-train-examples 20000, 3 pairs, K = 4 processes and
8 fused); NOT YET RUN ON A GPU (written and checked on a CPU with --device cpu).

    PYTHONPATH=. python benchmarks/gpu.py [--mnist DIR] [--pairs 3] [--epochs 1] [--json F]
"""
from __future__ import annotations

import argparse
import json
import math
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
from sweep.cost import PEAK_FLOPS, cell_flops, examples, forward_flops, grid_cost  # noqa: E402

PRECISIONS = ("fp32", "tf32", "bf16")
GOAL_SPEEDUP, GOAL_FLOOR = 5.0, 2.0  # issue 28: bf16 cells/h vs solo; bf16 hours vs floor


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


def train_flops(config: dict) -> int:
    """The training steps' FLOPs of a cell (3 x forward per example), no evaluation."""
    return 3 * forward_flops(config) * examples(config)[0] * config["epochs"]


def fused_groups(pairs, k: int) -> list[list[dict]]:
    """Per pair, a group of k cells: its two architectures at seeds 0 .. k/2 - 1."""
    return [[{**c, "seed": c["seed"] + s} for s in range(max(1, k // 2)) for c in pair]
            for pair in pairs]


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


def _row(config: dict, status: str, error, epochs: list[dict], flops: int) -> dict:
    return {"architecture": config["architecture"], "pair_key": Cell.from_config(config).pair_key,
            "status": status, "error": error, "flops": flops, "train_flops": train_flops(config),
            "train_s": sum(e["train_s"] for e in epochs)}


def _run_solo(units, opts, raw, prec):
    from study.train import run_cell

    rows = []
    for config in units:
        cell = Cell.from_config({**config, "precision": prec}).to_dict()
        row, epochs = run_cell(cell, opts, raw=raw)
        rows.append(_row(config, row["status"], row.get("error"), epochs, cell_flops(config)))
    return rows, {}


def _run_fused(units, opts, raw, prec):
    from study.fused.train import run_group

    rows, group_train_s = [], 0.0
    for group in units:
        cells = [Cell.from_config({**c, "precision": prec}).to_dict() for c in group]
        out = run_group(cells, opts, raw=raw)
        group_train_s += max(sum(e["train_s"] for e in epochs) for _, epochs in out)
        rows += [_row(c, row["status"], row.get("error"), epochs, cell_flops(c))
                 for c, (row, epochs) in zip(group, out)]
    return rows, {"group_train_s": group_train_s}


def _run_graphed(units, opts, raw, prec):
    """The groups' training with GraphedStep (a CUDA graph; on a CPU the same static-buffer
    step without one). The equality check runs after the clock stops (see worker)."""
    from study.fused import train as ft
    from study.fused.adamw import GroupedAdamW
    from study.fused.graphs import GraphedStep
    from study.fused.net import GroupedNet

    rows, last = [], None
    for group in units:
        cells = [Cell.from_config({**c, "precision": prec}).to_dict() for c in group]
        device, data = ft._setup(cells, opts, raw)
        members = ft._members(cells, data, device)
        net = GroupedNet([m.model for m in members], [m.config["architecture"] for m in members],
                         [m.config["activation"] for m in members])
        opt = GroupedAdamW(net.parameters(), [m.config["lr"] for m in members],
                           [m.config["weight_decay"] for m in members])
        t0 = time.perf_counter()
        step = GraphedStep(net, opt, data.train_x, data.train_y, group[0]["batch_size"], prec,
                           graph=device.type == "cuda")
        n = len(data.train_x)
        for epoch in range(1, group[0]["epochs"] + 1):
            step.train_epoch(ft._permutations(members, n, epoch, device))
        losses, _, active = step.take()
        ok = [bool(a) and math.isfinite(v) for a, v in zip(active.tolist(), losses.tolist())]
        train_s = time.perf_counter() - t0  # .tolist() waited for the GPU
        rows += [{"architecture": c["architecture"], "pair_key": Cell.from_config(c).pair_key,
                  "status": "ok" if good else "diverged", "error": None,
                  "flops": train_flops(c), "train_s": train_s} for c, good in zip(group, ok)]
        last = (step, ft._permutations(members, n, 1, device))
    return rows, {"_check": last}


RUNNERS = {"solo": _run_solo, "procs": _run_solo, "fused": _run_fused, "graphed": _run_graphed}


def worker(mode: str, units: list, setting: dict, results_dir: str, mnist: str | None,
           ready, start, out) -> None:
    """One process of a mode: load the data, warm CUDA up, wait for the others, train."""
    import torch

    from study.options import TrialOptions

    raw = _raw(mnist)
    torch.zeros(1, device=setting["device"]).sum().item()  # CUDA context before the clock
    opts = TrialOptions(results_dir, device=setting["device"], max_failures=0,
                        parallel_body=setting["body"], cudnn_benchmark=setting["cudnn_benchmark"],
                        checkpoint_every_s=1e12)
    ready.wait()
    start.wait()
    t0 = time.time()
    try:
        rows, extra = RUNNERS[mode](units, opts, raw, setting["precision"])
    except Exception as e:  # noqa: BLE001 - reported as the mode's failure, the others go on
        out.put({"rows": [], "t0": t0, "t1": time.time(), "error": f"{type(e).__name__}: {e}"})
        return
    t1 = time.time()
    check = extra.pop("_check", None)
    if check is not None:
        try:
            extra["check"] = check[0].check(check[1], steps=3)
        except Exception as e:  # noqa: BLE001
            extra["check"] = {"error": f"{type(e).__name__}: {e}"}
    out.put({"rows": rows, "t0": t0, "t1": t1, **extra})


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


def run_mode(mode: str, per_proc: list[list], setting: dict, mnist: str | None, tmp: Path) -> dict:
    """One process per entry of per_proc (its units: configs, or groups of configs), started
    together; the wall time runs from their common start to the last one's end."""
    k = len(per_proc)
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    ready, start, out = ctx.Barrier(k + 1), ctx.Barrier(k + 1), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(
        mode, units, setting, str(tmp / f"{setting['name']}-{mode}-k{k}-{i}"), mnist, ready,
        start, out)) for i, units in enumerate(per_proc)]
    for p in procs:
        p.start()
    ready.wait()
    samples, stop = [], threading.Event()
    if setting["device"] == "cuda":
        threading.Thread(target=gpu_utilisation, args=(stop, samples), daemon=True).start()
    start.wait()
    results = [out.get() for _ in procs]
    stop.set()
    for p in procs:
        p.join()
    errors = [r["error"] for r in results if r.get("error")]
    return {"mode": mode, "setting": setting["name"], "precision": setting["precision"],
            "procs": k, "wall_s": max(r["t1"] for r in results) - min(r["t0"] for r in results),
            "rows": [row for r in results for row in r["rows"]], "errors": errors,
            "group_train_s": sum(r.get("group_train_s", 0.0) for r in results) or None,
            "check": next((r["check"] for r in results if r.get("check")), None),
            "utilisation": statistics.mean(samples) if samples else None}


def summarise(res: dict, peak: dict, paper_flops: float) -> dict:
    rows = res["rows"]
    failed = [r for r in rows if r["status"] != "ok"]
    flops = sum(r["flops"] for r in rows)
    achieved = flops / res["wall_s"] if res["wall_s"] > 0 else 0.0
    out = {**{k: v for k, v in res.items() if k != "rows"}, "cells": len(rows),
           "cells_per_hour": len(rows) / res["wall_s"] * 3600 if res["wall_s"] > 0 else 0.0,
           "tflops": achieved / 1e12, "fraction_of_peak": achieved / peak[res["precision"]],
           "paper_hours": paper_flops / achieved / 3600 if achieved else math.inf,
           "failed": len(failed) + len(res["errors"]),
           "first_error": (res["errors"] or [r["error"] for r in failed] or [None])[0]}
    if res.get("group_train_s"):  # training only, comparable with `graphed`
        out["train_tflops"] = sum(r["train_flops"] for r in rows) / res["group_train_s"] / 1e12
    return out


MODES = [("solo", 1), ("procs", 4), ("fused", 8), ("graphed", 8)]
MORE = [  # (name, precision, cudnn.benchmark, parallel body, procs): the older settings
    ("fp32-cudnnbench", "fp32", True, "loop", 4), ("bf16-cudnnbench", "bf16", True, "loop", 4),
    ("fp32-wide", "fp32", False, "wide", 1), ("bf16-wide", "bf16", False, "wide", 1),
    ("fp32", "fp32", False, "loop", 2), ("bf16", "bf16", False, "loop", 8),
]


def per_proc_units(mode: str, k: int, pairs) -> list[list]:
    configs = [c for pair in pairs for c in pair]
    if mode in ("solo", "procs"):
        return [[{**c, "seed": c["seed"] + i} for c in configs] for i in range(k)]
    return [fused_groups(pairs, k)]


def print_row(s: dict) -> None:
    util = f"{s['utilisation']:.0f}%" if s["utilisation"] is not None else "n/a"
    extra = ""
    if s.get("train_tflops"):
        extra += f"  training-only {s['train_tflops']:.3g} TFLOPS"
    if s.get("check"):
        c = s["check"]
        extra += (f"  graph vs eager: weights {c['max_rel']:.1e}, loss {c['loss_rel']:.1e} "
                  f"(rel. norm after {c['steps']} steps)" if "max_rel" in c else f"  check: {c['error']}")
    print(f"  {s['mode']:<8} {s['setting']:<16} K={s['k']:<2} {s['cells']:>3} cells {s['wall_s']:7.1f} s "
          f"{s['cells_per_hour']:8.0f} cells/h {s['tflops']:7.3g} TFLOPS ({s['fraction_of_peak']:6.2%} "
          f"of {s['precision'].upper()} peak)  paper preset {s['paper_hours']:7.1f} h  GPU {util}"
          + extra + (f"  FAILED {s['failed']}: {s['first_error']}" if s["failed"] else ""), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", help="folder holding MNIST in torchvision's layout (DIR/MNIST/raw)")
    ap.add_argument("--pairs", type=int, default=3, help="deep/shallow pairs in the sample")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--max-train-examples", type=int, default=20_000)
    ap.add_argument("--procs", type=int, default=4, help="K of the `procs` mode")
    ap.add_argument("--fuse-k", type=int, default=8, help="K of the fused modes (even)")
    ap.add_argument("--modes", default="solo,procs,fused,graphed")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--more", action="store_true", help="also the older cudnn.benchmark, "
                    "wide-body and K = 2/8 process settings")
    ap.add_argument("--peak-tflops", nargs=3, type=float, metavar=("BF16", "TF32", "FP32"),
                    default=(PEAK_FLOPS["bf16"] / 1e12, PEAK_FLOPS["tf32"] / 1e12,
                             PEAK_FLOPS["fp32"] / 1e12))
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
    peak = dict(zip(("bf16", "tf32", "fp32"), (v * 1e12 for v in args.peak_tflops)))
    pairs = sample_pairs(args.pairs, args.epochs, args.max_train_examples)
    cells = load_spec("paper").cells()
    paper = grid_cost([same_network.trained_cell(g) for g in same_network.groups(cells).values()])
    paper_flops = sum(d.total for d in paper.datasets.values())
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "the CPU (a check, not a measurement)"
    print(f"gpu benchmark on {name}: {len(pairs)} paper MNIST pairs "
          f"({', '.join(f'{cell_flops(s):.2g}' for s, _ in pairs)} FLOPs per sequential cell at "
          f"{args.epochs} epoch(s), {args.max_train_examples} examples), data "
          + (args.mnist or "random MNIST-shaped tensors")
          + f"; paper preset {paper_flops:.2g} FLOPs", flush=True)
    ks = {"solo": 1, "procs": args.procs, "fused": args.fuse_k, "graphed": args.fuse_k}
    # (mode, K, setting name, precision, cudnn.benchmark, parallel body)
    runs = [(m, ks[m], p, p, False, "loop") for p in args.precisions.split(",")
            for m in args.modes.split(",")]
    if args.more:
        runs += [("procs" if k > 1 else "solo", k, n, p, bench, body)
                 for n, p, bench, body, k in MORE]
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        for mode, k, sname, prec, bench, body in runs:
            setting = {"name": sname, "precision": prec, "cudnn_benchmark": bench, "body": body,
                       "device": args.device}
            res = run_mode(mode, per_proc_units(mode, k, pairs), setting, args.mnist, Path(tmp))
            s = summarise({**res, "k": k}, peak, paper_flops)
            results.append(s)
            print_row(s)
    goals(results, paper_flops, peak)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


def goals(results: list[dict], paper_flops: float, peak: dict) -> None:
    """Issue 28's GPU goals, printed: bf16 fused cells/h vs one cell per trial, and the
    projected bf16 hours of the paper preset vs its BF16 FLOP floor."""
    by = {(s["mode"], s["setting"]): s for s in results}
    solo = by.get(("solo", "bf16"))
    floor_h = paper_flops / peak["bf16"] / 3600
    for mode in ("fused", "graphed"):
        s = by.get((mode, "bf16"))
        if not (s and solo and solo["cells_per_hour"]):
            continue
        ratio = s["cells_per_hour"] / solo["cells_per_hour"]
        note = " (training only: no evaluation)" if mode == "graphed" else ""
        print(f"goal ({mode}{note}, bf16): {ratio:.1f}x the cells per hour of one cell per trial "
              f"(goal >= {GOAL_SPEEDUP:g}x: {'met' if ratio >= GOAL_SPEEDUP else 'NOT met'}); "
              f"paper preset {s['paper_hours']:.1f} h against its BF16 floor {floor_h:.1f} h "
              f"= {s['paper_hours'] / floor_h:.1f}x (goal <= {GOAL_FLOOR:g}x: "
              f"{'met' if s['paper_hours'] <= GOAL_FLOOR * floor_h else 'NOT met'})")


if __name__ == "__main__":
    sys.exit(main())
