"""Fused training on the CPU: the same cells solo and fused at K = 1, 2, 4, 8, 16, in one run.

Throughput (one thread, in this process, no Ray):
  digits  a demo setting (default layers 4, filters 8: the issue's prototype) as K cells that
          fuse into one group: sequential and parallel at seeds 0, 1, ... (members may differ
          in architecture and seed). Whole cells (the demo's 15 epochs, final evaluation
          included): cells per hour, each cell solo (study.train.run_cell, one after the
          other) against the K cells as one group (study.fused.train.run_group).
  mnist   the `paper` preset's median MNIST cell (layers > 1) by counted FLOPs, cut to a few
          optimizer steps (--mnist-steps batches of its 256 examples, one epoch): cell-steps
          per second of training time (the epoch rows' train_s; evaluation left out, it
          would dominate a cell this short). Data: the official 10,000-image MNIST test split
          from ../shared/data/mnist (8,000 train / 2,000 test here), else random uint8 images
          of MNIST's shapes (the same arithmetic).
The solo side of every K is the sum of the same K cells' solo times, measured in this run
(with --pairs N: measured again beside each of N fused runs, in turn; medians printed).

Equality (study.fused.drift; median |log ratio| of final validation loss over the demo's
cells): fused (`study run demo --fuse 4`) against solo (`--fuse off`), the one-ulp floor (each
cell solo with every initial weight one ulp up, against solo) and seed-to-seed (seed 0
against seed 1 of one setting, solo). The two study runs are subprocesses
(`--executor local --no-figures --quiet`, each its own temporary results folder) and also
give the demo's wall time with --fuse 4 against --fuse off. Their solo rows are the baseline
of the floor once one cell retrained in this process is seen to equal its row bit for bit
(else every cell is retrained here for it).

Goal, printed, not asserted: fused digits cells reach >= 2x the solo cells per hour at K = 8.

    PYTHONPATH=. python benchmarks/fuse.py [--ks 1,2,4,8,16] [--pairs N] [--json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sweep import Cell, load_spec  # noqa: E402
from sweep.cost import cell_flops  # noqa: E402
from sweep.fusion import pack  # noqa: E402

MNIST = next((m for m in (ROOT.parent / "shared" / "data" / "mnist",
                          ROOT.parents[1] / "shared" / "data" / "mnist") if m.is_dir()),
             ROOT.parent / "shared" / "data" / "mnist")
GOAL_K, GOAL_RATIO = 8, 2.0


def group_cells(base: dict, k: int) -> list[Cell]:
    """k cells of one group key: sequential and parallel (where layers > 1) at seeds 0, 1, ..."""
    archs = ("sequential", "parallel") if base["layers"] > 1 else ("sequential",)
    out = []
    for i in range(k):
        config = {**base, "architecture": archs[i % len(archs)], "seed": i // len(archs)}
        if config["architecture"] == "parallel":
            config["match_params"] = False
        else:
            config.pop("match_params", None)
        out.append(Cell.from_config(config))
    assert len(pack(out, k)) == 1, "the benchmark's cells must fuse into one group"
    return out


def mnist_raw(folder: Path | None):
    """MNIST as study.data.Raw: the official test split's 10,000 images (8,000 train, 2,000
    test) from IDX files in `folder` (flat or torchvision's MNIST/raw layout), else random
    uint8 images of the same shapes."""
    from study import data as datasets

    rng = np.random.default_rng(0)
    x = y = None
    for d in ([folder, folder / "MNIST" / "raw"] if folder else []):
        if (d / "t10k-images-idx3-ubyte.gz").is_file() or (d / "t10k-images-idx3-ubyte").is_file():
            x = datasets._read_idx(d / "t10k-images-idx3-ubyte")[:, None]
            y = datasets._read_idx(d / "t10k-labels-idx1-ubyte").astype(np.int64)
            break
    source = "MNIST's official test split (10,000 images)" if x is not None else "random MNIST-shaped images"
    if x is None:
        x, y = rng.integers(0, 256, (10_000, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, 10_000)
    xf = x[:8000].astype(np.float64) / 255.0
    mean, std = np.full(1, xf.mean(), np.float32), np.full(1, xf.std() + 1e-6, np.float32)
    return datasets.Raw("mnist", x[:8000], y[:8000], x[8000:], y[8000:], 10, 255.0, mean, std), source


def paper_mnist_base() -> dict:
    """The paper preset's median MNIST cell (sequential, seed 0, layers > 1 where sequential
    and parallel differ) by counted FLOPs, as benchmarks/gpu.py samples them."""
    cells = sorted((c for c in load_spec("paper").cells() if c["dataset"] == "mnist"
                    and c["seed"] == 0 and c["architecture"] == "sequential"
                    and c["layers"] > 1),
                   key=lambda c: cell_flops(c.config))
    return dict(cells[len(cells) // 2].config)


def throughput(base: dict, ks: list[int], opts, raw, measure: str, say=print,
               pairs: int = 1) -> list[dict]:
    """Solo and fused times of the same cells at each K. measure: "wall" (whole cells, the
    trial function's own clock around it) or "train" (the epoch rows' train_s). `say`
    prints each K's line as it is measured. pairs > 1: at each K, the K cells solo then
    fused, `pairs` times in turn; times and ratio are the medians over the pairs (a machine
    whose speed drifts within a minute moves both sides of a pair alike)."""
    from study.fused.train import run_group
    from study.train import run_cell

    cells = group_cells(base, max(ks))
    warm = Cell.from_config({**cells[0].config, "epochs": 1})
    run_cell(warm.to_dict(), opts, raw=raw)  # the data's conversion and first-call costs
    run_group([c.to_dict() for c in group_cells(warm.config, 2)], opts, raw=raw)

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        wall = time.perf_counter() - t0
        rows = out if isinstance(out, list) else [out]
        bad = [r for r, _ in rows if r["status"] != "ok"]
        assert not bad, bad[0].get("error")
        train = max(sum(e["train_s"] for e in epochs) for _, epochs in rows)
        return wall if measure == "wall" else train

    def solo_each(k: int) -> list[float]:
        return [timed(lambda c=c: run_cell(c.to_dict(), opts, raw=raw)) for c in cells[:k]]

    def fused_s(k: int) -> float:
        return timed(lambda: run_group([c.to_dict() for c in cells[:k]], opts, raw=raw))

    solo = solo_each(len(cells)) if pairs == 1 else None  # each cell once: K's sum of the first K
    steps = math.ceil(min(base.get("max_train_examples") or 10**9, 10**9) / base["batch_size"])
    out = []
    for k in ks:
        if pairs == 1:
            times = [(sum(solo[:k]), fused_s(k))]
        else:
            times = [(sum(solo_each(k)), fused_s(k)) for _ in range(pairs)]
        s = statistics.median(a for a, _ in times)
        fused = statistics.median(b for _, b in times)
        ratios = [a / b for a, b in times]
        rec = {"dataset": base["dataset"], "k": k, "layers": base["layers"],
               "filters": base["filters"], "batch_size": base["batch_size"],
               "epochs": base["epochs"], "measure": measure, "solo_s": s, "fused_s": fused,
               "ratio": statistics.median(ratios), "pair_ratios": ratios}
        if measure == "wall":
            rec.update(solo_cells_per_hour=k / s * 3600, fused_cells_per_hour=k / fused * 3600)
        else:
            rec.update(steps_per_cell=steps * base["epochs"],
                       solo_cell_steps_per_s=k * steps * base["epochs"] / s,
                       fused_cell_steps_per_s=k * steps * base["epochs"] / fused)
        out.append(rec)
        say(f"  measured {rec['dataset']} K={k}: solo {s:.1f} s, fused {fused:.1f} s "
            f"({rec['ratio']:.2f}x" + (f", median of pairs {', '.join(f'{r:.2f}' for r in ratios)}"
                                       if pairs > 1 else "") + ")", flush=True)
    return out


def study_run(spec: str, fuse: str, results: Path) -> tuple[float, list[dict]]:
    """`study run SPEC --fuse FUSE` in a subprocess; (wall seconds, its trial rows)."""
    from study.store.read import StoreReader

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "study", "run", spec, "--executor", "local", "--results",
           str(results), "--fuse", fuse, "--no-figures", "--quiet"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed ({r.returncode}): {r.stderr[-2000:]}")
    return wall, StoreReader(results).read_trials().to_dict("records")


def quick_spec(folder: Path) -> str:
    """The demo cut down for --quick: 4 cells (layers 2, filters 4, 2 epochs, 2 seeds)."""
    text = (ROOT / "sweep" / "presets" / "demo.toml").read_text()
    for old, new in (("layers = [1, 2, 3, 4, 6, 8]", "layers = [2]"),
                     ("filters = [4, 8, 16]", "filters = [4]"), ("epochs = 15", "epochs = 2"),
                     ('name = "demo"', 'name = "demo-quick"')):
        assert old in text, f"demo.toml no longer holds {old!r}"
        text = text.replace(old, new)
    path = folder / "demo-quick.toml"
    path.write_text(text)
    return str(path)


def equality(spec: str, opts, tmp: Path, say=print) -> dict:
    """The demo's wall times with --fuse 4 and off, and the drift figures over its cells."""
    from study.fused import drift
    from study.train import run_cell

    fused_s, fused_rows = study_run(spec, "4", tmp / "fused")
    say(f"  measured study run {spec} --fuse 4: {fused_s:.1f} s", flush=True)
    solo_s, solo_rows = study_run(spec, "off", tmp / "solo")
    say(f"  measured study run {spec} --fuse off: {solo_s:.1f} s; now the one-ulp runs", flush=True)
    loss = lambda rows: {r["cell_id"]: (r["val_loss"] if r["status"] == "ok" else math.nan)  # noqa: E731
                         for r in rows}
    solo, fused = loss(solo_rows), loss(fused_rows)
    cells = load_spec(spec).cells()
    first = cells[0].to_dict()
    same = run_cell(first, opts)[0]["val_loss"] == solo[first["cell_id"]]
    if not same:  # the floor must be measured against solo runs of this process's kind
        solo_here = drift.final_val_losses(cells, opts)
    floor, _ = drift.ulp_floor(cells, opts, solo=solo if same else solo_here)
    return {"cells": len(cells), "groups": len({r["fused_group"] for r in fused_rows
                                                if r.get("fused_group")}),
            "fused_drift": drift.median_abs_log_ratio(fused, solo), "ulp_floor": floor,
            "seed_median": drift.seed_median(cells, solo), "in_process_equals_rows": same,
            "wall_s_fuse4": fused_s, "wall_s_fuse_off": solo_s,
            "wall_ratio_off_over_fuse4": solo_s / fused_s}


def print_table(records: list[dict], eq: dict | None, goal: dict | None) -> None:
    print(f"{'dataset':<7} {'K':>3}  {'solo':>12} {'fused':>12}  {'fused/solo':>10}   unit")
    for r in records:
        if r["measure"] == "wall":
            a, b, unit = r["solo_cells_per_hour"], r["fused_cells_per_hour"], "cells/hour (whole cells)"
        else:
            a, b, unit = (r["solo_cell_steps_per_s"], r["fused_cell_steps_per_s"],
                          f"cell-steps/s (training time, {r['steps_per_cell']} steps a cell)")
        print(f"{r['dataset']:<7} {r['k']:>3}  {a:12.1f} {b:12.1f}  {r['ratio']:9.2f}x   {unit}")
    if eq:
        print(f"equality over the demo's {eq['cells']} cells (median |log ratio| of final val loss):")
        print(f"  fused (--fuse 4) vs solo {eq['fused_drift']:.4f}   one-ulp floor {eq['ulp_floor']:.4f}"
              f"   fused/floor {eq['fused_drift'] / eq['ulp_floor']:.2f}   seed-to-seed {eq['seed_median']:.4f}")
        print(f"  (in-process solo equals the study's row bit for bit: {eq['in_process_equals_rows']})")
        print(f"demo wall time: --fuse 4 {eq['wall_s_fuse4']:.1f} s, --fuse off {eq['wall_s_fuse_off']:.1f} s"
              f" (off / fuse 4 = {eq['wall_ratio_off_over_fuse4']:.2f}x)")
    if goal:
        print(f"goal: fused digits cells >= {GOAL_RATIO:g}x the solo cells per hour at K = {GOAL_K}: "
              f"{goal['ratio']:.2f}x, {'met' if goal['met'] else 'NOT met'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="1,2,4,8,16", help="comma-separated K")
    ap.add_argument("--digits", default="4x8", help="the demo setting LAYERSxFILTERS")
    ap.add_argument("--digits-epochs", type=int, default=None, help="default: the demo's")
    ap.add_argument("--mnist", default=str(MNIST), help="folder with MNIST's t10k IDX files")
    ap.add_argument("--mnist-steps", type=int, default=4, help="optimizer steps per MNIST cell")
    ap.add_argument("--no-equality", action="store_true", help="skip the study runs and drift")
    ap.add_argument("--pairs", type=int, default=1,
                    help="at each K: solo then fused this many times in turn, medians printed")
    ap.add_argument("--quick", action="store_true",
                    help="a check of the script: K = 1, 2, 4; digits 2x4 at 1 epoch; one MNIST "
                         "step at 8 filters; the demo cut to 4 cells of 2 epochs")
    ap.add_argument("--json", action="store_true", help="print the table as JSON")
    args = ap.parse_args(argv)

    import torch

    from study.options import TrialOptions

    torch.set_num_threads(1)
    if args.quick and args.ks == ap.get_default("ks"):
        args.ks = "1,2,4"
    ks = [int(k) for k in args.ks.split(",")]
    layers, filters = (int(v) for v in ("2x4" if args.quick else args.digits).split("x"))
    demo = next(c.config for c in load_spec("demo").cells()
                if c["layers"] == layers and c["filters"] == filters and c["seed"] == 0
                and c["architecture"] == "sequential")
    digits = {**demo, "epochs": args.digits_epochs or (1 if args.quick else demo["epochs"])}
    mnist = paper_mnist_base()
    steps = 1 if args.quick else args.mnist_steps
    mnist.update(epochs=1, max_train_examples=steps * mnist["batch_size"],
                 **({"filters": 8} if args.quick else {}))
    raw, source = mnist_raw(Path(args.mnist) if args.mnist else None)
    say = (lambda *a, **k: None) if args.json else print
    say(f"fused-training benchmark, one thread, {torch.__version__}; K = {ks}; digits: demo "
        f"layers {layers}, filters {filters}, {digits['epochs']} epochs; mnist: the paper's median "
        f"MNIST cell (layers {mnist['layers']}, filters {mnist['filters']}, batch "
        f"{mnist['batch_size']}), {steps} step(s), on {source}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fuse-bench-") as tmp:
        tmp = Path(tmp)
        opts = TrialOptions(str(tmp / "trials"), max_failures=0, checkpoint_every_s=1e12)
        records = throughput(digits, ks, opts, None, "wall", say, args.pairs)
        records += throughput(mnist, ks, opts, raw, "train", say, args.pairs)
        eq = None
        if not args.no_equality:
            spec = quick_spec(tmp) if args.quick else "demo"
            eq = equality(spec, opts, tmp, say)
    at = [r for r in records if r["dataset"] == "digits" and r["k"] == GOAL_K]
    goal = {"k": GOAL_K, "ratio": at[0]["ratio"], "met": at[0]["ratio"] >= GOAL_RATIO} if at else None
    if args.json:
        print(json.dumps({"records": records, "equality": eq, "goal": goal,
                          "torch": torch.__version__}, indent=1))
    else:
        print_table(records, eq, goal)
    return 0


if __name__ == "__main__":
    sys.exit(main())
