"""The parameters a study cell can have: one declarative table, no torch.

Every parameter has a type, a default (None = required) and optionally the allowed values.
Architecture-specific parameters list the architectures that use them; a cell of any other
architecture never carries them, so they never multiply its cells.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")
ARCHITECTURES = (
    "sequential",
    "parallel",
    "plain",
    "highway",
    "merge_and_run",
    "deeply_fused",
    "learned_connectivity",
)
ACTIVATIONS = ("relu", "tanh", "gelu", "sigmoid")
HEADS = ("flatten", "gap")
POOLS = (1, 2, 4)
# fp32: true FP32 (TF32 off for cuDNN and matmul); tf32: TF32 tensor cores (CUDA only);
# bf16: bfloat16 autocast of the training forward and loss, FP32 weights and optimizer state.
PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass(frozen=True)
class DatasetSize:
    """What is known of a dataset without its files: the sizes `study plan` needs for Q."""
    train: int  # full training split, before the validation split
    test: int
    classes: int
    channels: int
    height: int
    width: int


# digits has no official split: study/data.py holds out 1797 // 5 = 359 images for test.
DATASET_SIZES: dict[str, DatasetSize] = {
    "digits": DatasetSize(train=1438, test=359, classes=10, channels=1, height=8, width=8),
    "mnist": DatasetSize(train=60_000, test=10_000, classes=10, channels=1, height=28, width=28),
    "fashion_mnist": DatasetSize(train=60_000, test=10_000, classes=10, channels=1, height=28,
                                 width=28),
    "cifar10": DatasetSize(train=50_000, test=10_000, classes=10, channels=3, height=32, width=32),
}


def split_sizes(n: int, val_fraction: float, max_train_examples: int | None) -> tuple[int, int]:
    """(validation, training) examples of a training split of n: round(n * val_fraction)
    held out for validation, the rest capped at max_train_examples. study/data.py splits the
    data by these sizes, and `study plan` counts with them before any file is read."""
    n_val = int(round(n * val_fraction))
    n_train = n - n_val
    return n_val, (n_train if max_train_examples is None else min(n_train, max_train_examples))


def n_train_examples(dataset: str, val_fraction: float, max_train_examples: int | None) -> int:
    """Training examples a cell of this dataset gets (see split_sizes)."""
    return split_sizes(DATASET_SIZES[dataset].train, val_fraction, max_train_examples)[1]


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    default: Any = None  # None: required (must be in [grid])
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    # Architectures that use this parameter; None = every architecture.
    architectures: tuple[str, ...] | None = None
    # Per-architecture defaults where they differ (e.g. branches).
    arch_defaults: dict = field(default_factory=dict)
    optional: bool = False  # may be absent (None) in a cell
    # True: the default value is left out of cell_id and pair_key, so a parameter added
    # after studies ran keeps their ids (and their stores do not re-run).
    hash_default: bool = True
    help: str = ""

    def applies_to(self, architecture: str) -> bool:
        return self.architectures is None or architecture in self.architectures

    def default_for(self, architecture: str) -> Any:
        return self.arch_defaults.get(architecture, self.default)


PARAMS: dict[str, Param] = {
    p.name: p
    for p in [
        Param("dataset", str, choices=DATASETS, help="dataset to train on"),
        Param("architecture", str, choices=ARCHITECTURES, help="model family"),
        Param("layers", int, minimum=1, help="conv layers inside the residual branches"),
        Param("filters", int, minimum=1, help="channels of every conv"),
        Param("kernel", int, minimum=1, help="conv kernel size ('same' padding, odd or even)"),
        Param("activation", str, default="relu", choices=ACTIVATIONS),
        Param("batch_norm", bool, default=False),
        Param("head", str, default="flatten", choices=HEADS,
              help="classifier: flatten (conv features flattened into the linear layer) or "
                   "gap (global average pool, then the linear layer)"),
        Param("pool", int, default=2, choices=POOLS,
              help="max-pool window (and stride) between the stem and the body; 1 = none"),
        Param("lr", float, default=1e-3, minimum=0.0),
        Param("weight_decay", float, default=1e-4, minimum=0.0),
        Param("batch_size", int, default=256, minimum=1),
        Param("epochs", int, default=10, minimum=1),
        Param("seed", int, default=0, minimum=0),
        Param("max_train_examples", int, default=None, minimum=1, optional=True,
              help="cap on training examples (after the validation split)"),
        Param("val_fraction", float, default=0.1, minimum=0.0, maximum=0.9),
        Param("precision", str, default="fp32", choices=PRECISIONS, hash_default=False,
              help="training arithmetic: fp32 (true FP32, TF32 off), tf32 (CUDA only) or "
                   "bf16 (autocast, FP32 weights); evaluation is always FP32"),
        Param("match_params", bool, default=False,
              architectures=tuple(a for a in ARCHITECTURES if a not in ("sequential",)),
              help="search the width so n_params is within 1% of the sequential twin"),
        # -- architecture-specific (zoo) parameters --
        Param("gate", str, default="coupled", choices=("full", "coupled", "c_only", "t_only", "residual"),
              architectures=("highway",)),
        Param("gate_bias", float, default=-2.0, architectures=("highway",)),
        Param("gate_kernel", int, default=1, minimum=1, architectures=("highway",)),
        Param("branches", int, default=2, minimum=1,
              architectures=("merge_and_run", "learned_connectivity"),
              arch_defaults={"learned_connectivity": 4}),
        Param("active_inputs", int, default=None, minimum=1, optional=True,
              architectures=("learned_connectivity",),
              help="K inputs per branch; default branches // 2"),
        Param("fuse_every", int, default=2, minimum=1, architectures=("deeply_fused",)),
        Param("shallow", str, default="conv", choices=("conv", "identity"),
              architectures=("deeply_fused",)),
    ]
}

# Parameters that say *which* architecture variant a cell is; left out of pair_key so a
# sequential cell pairs with every variant of another architecture at the same settings.
ARCH_SPECIFIC = tuple(n for n, p in PARAMS.items() if p.architectures is not None)
# Parameter -> its default, for those whose default is not hashed (see Param.hash_default).
UNHASHED_DEFAULTS = {n: p.default for n, p in PARAMS.items() if not p.hash_default}
REQUIRED = tuple(n for n, p in PARAMS.items() if p.default is None and not p.optional)
