"""Q coverage of a grid before it runs: how its cells fall into the paper's bins of the
determination ratio Q = training examples x outputs / parameters.

Parameters are counted on the meta device (shapes only) from each cell's config; training
examples come from the dataset's known size (sweep.params.DATASET_SIZES), the cell's
val_fraction and max_train_examples, so no dataset file is needed. Many cells share one
network shape (they differ in lr, seed, activation, ...), so counts are cached per shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from sweep.params import DATASET_SIZES, n_train_examples

# The paper's bins of Q, left-closed: [0,1), [1,3), [3,10), [10,inf). Their one home: the
# plan's coverage counts cells into them here, and analysis bins the results with them.
Q_EDGES = (0.0, 1.0, 3.0, 10.0, float("inf"))
Q_LABELS = ("[0,1)", "[1,3)", "[3,10)", "[10,inf)")


@dataclass
class DatasetCoverage:
    dataset: str
    n_cells: int = 0
    n_train: set = field(default_factory=set)  # training examples (one value unless capped)
    n_classes: int = 0
    bins: list = field(default_factory=lambda: [0] * len(Q_LABELS))
    min_params: int | None = None
    max_params: int | None = None


def q_bin(q: float) -> int:
    """Index into Q_LABELS of the bin holding one Q (analysis._common.q_bin bins a column)."""
    for i in range(len(Q_LABELS)):
        if Q_EDGES[i] <= q < Q_EDGES[i + 1]:
            return i
    return len(Q_LABELS) - 1


def cell_n_params(config: dict) -> int:
    """n_params of a cell's model, counted on the meta device (cached per shape)."""
    from .models import count_params, image_size_for, match_width, model_kwargs

    ds = DATASET_SIZES[config["dataset"]]
    kw = model_kwargs(config)
    # Activations hold no parameters: count every activation as relu, so cells that differ
    # only there share one cached count.
    kw["activation"] = "relu"
    kw["image_size"] = image_size_for(config)
    arch = config["architecture"]
    if config.get("match_params"):
        kw["filters"] = match_width(arch, kw, ds.channels, ds.classes)
    return count_params(arch, kw, ds.channels, ds.classes)


def q_coverage(cells) -> list[DatasetCoverage]:
    """Per dataset (in order of first appearance): cells per Q bin and the n_params range."""
    out: dict[str, DatasetCoverage] = {}
    for c in cells:
        config = c.config if hasattr(c, "config") else c
        name = config["dataset"]
        cov = out.setdefault(name, DatasetCoverage(name, n_classes=DATASET_SIZES[name].classes))
        n_train = n_train_examples(name, config["val_fraction"], config.get("max_train_examples"))
        p = cell_n_params(config)
        cov.n_cells += 1
        cov.n_train.add(n_train)
        cov.bins[q_bin(n_train * cov.n_classes / p)] += 1
        cov.min_params = p if cov.min_params is None else min(cov.min_params, p)
        cov.max_params = p if cov.max_params is None else max(cov.max_params, p)
    return list(out.values())


def format_coverage(coverage: list[DatasetCoverage]) -> list[str]:
    lines = ["Q coverage (Q = training examples x classes / n_params; the paper's bins):"]
    for cov in coverage:
        n_train = (f"{min(cov.n_train):,}" if len(cov.n_train) == 1
                   else f"{min(cov.n_train):,}-{max(cov.n_train):,}")
        bins = "  ".join(f"{label} {n} ({n / cov.n_cells:.0%})"
                         for label, n in zip(Q_LABELS, cov.bins))
        lines.append(f"  {cov.dataset:<13} {cov.n_cells:>5} cells, {n_train} train x "
                     f"{cov.n_classes} classes: {bins};  n_params {cov.min_params:,}-{cov.max_params:,}")
    return lines
