"""What a grid costs before it runs: training FLOPs per cell, counted analytically (no torch).

Convention (torch.utils.flop_counter.FlopCounterMode's, which tests/test_cost.py checks the
forward count against): a multiply-add is 2 FLOPs; a convolution costs
2 x output elements x in_channels x kernel area, the linear head 2 x inputs x outputs;
biases, activations, batch norm, pooling, sums and the loss are not counted (they are a few
per cent of a conv's work at these widths). The backward pass is counted as twice the
forward (gradients of the inputs and of the weights), so a training step costs 3 x forward.
learned_connectivity's small mask products are left out.

A cell's FLOPs = epochs x (3 x forward x n_train + forward x n_val)   (training + validation)
              + forward x (n_train + n_val + n_test)                  (the final evaluation)
with the example counts of sweep.params (the validation split, max_train_examples).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from .params import DATASET_SIZES, PARAMS, split_sizes

# The reference GPU: NVIDIA H100 SXM, dense (no sparsity) peaks from NVIDIA's H100
# datasheet: 989 TFLOPS BF16 and 495 TFLOPS TF32 (tensor cores), 67 TFLOPS FP32 (without).
REFERENCE_GPU = "H100 SXM"
PEAK_FLOPS = {"bf16": 989e12, "tf32": 495e12, "fp32": 67e12}

# Families whose width match_params leaves at `filters` (built from the sequential modules).
_SAME_WIDTH = ("sequential", "parallel", "plain")


def _get(config: dict, name: str):
    value = config.get(name)
    return PARAMS[name].default_for(config["architecture"]) if value is None else value


def body_convs(config: dict) -> list[int]:
    """Kernel sizes of the body's filters -> filters convolutions, one entry per conv."""
    arch, layers, k = config["architecture"], config["layers"], config["kernel"]
    if arch in ("sequential", "parallel", "plain", "merge_and_run"):
        return [k] * layers
    if arch == "highway":
        gate = _get(config, "gate")
        n_gates = (gate in ("full", "coupled", "t_only")) + (gate in ("full", "c_only"))
        return ([k] + [_get(config, "gate_kernel")] * n_gates) * layers
    if arch == "deeply_fused":
        shallow = _get(config, "shallow") == "conv"
        return [k] * (layers + shallow * math.ceil(layers / _get(config, "fuse_every")))
    if arch == "learned_connectivity":
        return [k] * (layers * _get(config, "branches"))
    raise ValueError(f"no FLOP count for architecture {arch!r}")


def forward_flops(config: dict, filters: int | None = None) -> int:
    """FLOPs of one example's forward pass (stem, body convs, linear head).

    `filters` overrides the config's width (e.g. the width match_params chose)."""
    ds = DATASET_SIZES[config["dataset"]]
    f = config["filters"] if filters is None else filters
    k, pool = config["kernel"], _get(config, "pool")
    stem = 2 * ds.height * ds.width * f * ds.channels * k * k
    h, w = ds.height // pool, ds.width // pool
    body = sum(2 * h * w * f * f * kk * kk for kk in body_convs(config))
    features = f * h * w if _get(config, "head") == "flatten" else f
    return stem + body + 2 * features * ds.classes


def examples(config: dict) -> tuple[int, int, int]:
    """(n_train, n_val, n_test) of a cell, as study/data.py splits the dataset."""
    ds = DATASET_SIZES[config["dataset"]]
    n_val, n_train = split_sizes(ds.train, _get(config, "val_fraction"),
                                 config.get("max_train_examples"))
    return n_train, n_val, ds.test


def cell_flops(config: dict, filters: int | None = None) -> int:
    """A cell's training FLOPs by the convention above."""
    fwd = forward_flops(config, filters)
    n_train, n_val, n_test = examples(config)
    return _get(config, "epochs") * fwd * (3 * n_train + n_val) + fwd * (n_train + n_val + n_test)


@dataclass
class DatasetCost:
    dataset: str
    n_cells: int = 0
    flops: list = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.flops)

    def hours(self, precision: str) -> float:
        return self.total / PEAK_FLOPS[precision] / 3600

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "networks": self.n_cells, "total_flops": self.total,
                "min_cell_flops": min(self.flops), "median_cell_flops": statistics.median(self.flops),
                "max_cell_flops": max(self.flops),
                **{f"hours_at_{p}_peak": self.hours(p) for p in PEAK_FLOPS}}


@dataclass
class GridCost:
    datasets: dict[str, DatasetCost]
    approximate: int = 0  # match_params cells of families whose width is counted at `filters`

    def to_dict(self) -> dict:
        total = sum(d.total for d in self.datasets.values())
        return {"reference_gpu": REFERENCE_GPU, "peak_flops": PEAK_FLOPS,
                "convention": "multiply-add = 2 FLOPs; training step = 3 x forward; "
                              "per epoch: training + validation forward; final evaluation of "
                              "every split once",
                "total_flops": total,
                **{f"hours_at_{p}_peak": total / v / 3600 for p, v in PEAK_FLOPS.items()},
                "approximate_cells": self.approximate,
                "datasets": [d.to_dict() for d in self.datasets.values()]}


def grid_cost(cells) -> GridCost:
    """The cost of training `cells` (give the cells that train: one per same-network group)."""
    out: dict[str, DatasetCost] = {}
    approx = 0
    for c in cells:
        config = c.config if hasattr(c, "config") else c
        d = out.setdefault(config["dataset"], DatasetCost(config["dataset"]))
        d.n_cells += 1
        d.flops.append(cell_flops(config))
        approx += bool(config.get("match_params")) and config["architecture"] not in _SAME_WIDTH
    return GridCost(out, approx)


def _fmt_h(h: float) -> str:
    """Hours as hours, minutes or seconds, whichever reads best."""
    if h >= 1:
        return f"{h:.2g} h" if h < 10 else f"{h:,.0f} h"
    return f"{h * 60:.2g} min" if h * 60 >= 1 else f"{h * 3600:.2g} s"


def format_cost(cost: GridCost) -> list[str]:
    """The lines `study plan` prints."""
    lines = [f"cost (training FLOPs; hours at one {REFERENCE_GPU}'s dense peak, "
             f"{PEAK_FLOPS['bf16'] / 1e12:.0f} TFLOPS BF16 / {PEAK_FLOPS['tf32'] / 1e12:.0f} "
             "TFLOPS TF32; a step = 3 x forward, + validation each epoch):"]
    total = 0
    for d in cost.datasets.values():
        total += d.total
        lines.append(f"  {d.dataset:<8} {d.n_cells} networks  {d.total:.2g} FLOPs  per cell "
                     f"{min(d.flops):.2g}-{max(d.flops):.2g} (median "
                     f"{statistics.median(d.flops):.2g})  {_fmt_h(d.hours('bf16'))} BF16, "
                     f"{_fmt_h(d.hours('tf32'))} TF32")
    if len(cost.datasets) > 1:
        lines.append(f"  total    {sum(d.n_cells for d in cost.datasets.values())} networks  {total:.2g} FLOPs  {_fmt_h(total / PEAK_FLOPS['bf16'] / 3600)} "
                     f"BF16, {_fmt_h(total / PEAK_FLOPS['tf32'] / 3600)} TF32 (at peak: real "
                     "runs of such small nets reach a fraction of it)")
    if cost.approximate:
        lines.append(f"  ({cost.approximate} match_params cells counted at their nominal "
                     "filters; their matched width is known only when they run)")
    return lines


__all__ = ["REFERENCE_GPU", "PEAK_FLOPS", "body_convs", "forward_flops", "examples",
           "cell_flops", "grid_cost", "format_cost", "GridCost", "DatasetCost"]
