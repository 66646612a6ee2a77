"""Shared names and small helpers of the analysis package (no torch, no ray)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd

from study.coverage import Q_EDGES, Q_LABELS  # the paper's bins of Q (their one home)
from sweep.params import ARCHITECTURES, DATASETS

LOSSES = ("train_loss", "val_loss", "test_loss")
ACCURACIES = ("train_acc", "val_acc", "test_acc")
METRICS = LOSSES + ACCURACIES
HIGHER_IS_BETTER = {m: m.endswith("_acc") for m in METRICS}

PRETTY = {"train_loss": "train loss", "val_loss": "validation loss", "test_loss": "test loss",
          "train_acc": "train accuracy", "val_acc": "validation accuracy",
          "test_acc": "test accuracy"}


class AnalysisError(RuntimeError):
    """A user-facing problem (not a results store, unknown architecture): one-line message."""


class NothingToPlot(AnalysisError):
    """A figure cannot be drawn from these results; the message says why (it becomes a note)."""


def guarded(stem: str, notes: list[str], make: Callable[[], object]):
    """make() for one figure (its input or the figure itself), or None with a line on `notes`:
    a figure that cannot be drawn is a note, never a crash (an AnalysisError other than
    NothingToPlot is the user's to see)."""
    try:
        return make()
    except AnalysisError as e:
        if not isinstance(e, NothingToPlot):
            raise
        notes.append(f"{stem}: skipped, {e}")
    except Exception as e:  # a bug in one figure must not cost the others
        notes.append(f"{stem}: could not be drawn ({type(e).__name__}: {e})")
    return None


def check_store(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise AnalysisError(f"{root} is not a folder; give the results folder of a study "
                            "(the one holding trials/ and spec.toml)")
    if not (root / "trials").is_dir() and not (root / "spec.toml").is_file():
        raise AnalysisError(f"{root} is not a results store (it has neither trials/ nor "
                            "spec.toml); give the folder a `study run` wrote to")
    return root


def check_compare(a: str, b: str) -> None:
    for name in (a, b):
        if name not in ARCHITECTURES:
            raise AnalysisError(f"unknown architecture {name!r} to compare; known: "
                                + ", ".join(ARCHITECTURES))
    if a == b:
        raise AnalysisError(f"compare needs two different architectures, got {a!r} twice")


def _ordered(values, canon) -> list:
    """Known names in their canonical order first, unknown ones after, sorted."""
    vals = [v for v in pd.unique(pd.Series(values).dropna())]
    known = [v for v in canon if v in vals]
    return known + sorted(v for v in vals if v not in canon)


def dataset_order(values) -> list[str]:
    return _ordered(values, DATASETS)


def arch_order(values) -> list[str]:
    return _ordered(values, ARCHITECTURES)


def dataset_label(name: str) -> str:
    return str(name).upper()


def q_bin(q: pd.Series) -> pd.Series:
    """Ordered categorical of the paper's Q bins (left-closed); NaN where Q is unknown."""
    return pd.cut(q, bins=list(Q_EDGES), right=False, labels=list(Q_LABELS))


def add_q(df: pd.DataFrame) -> pd.DataFrame:
    """Add `q` and `q_bin` (a copy); Q is NaN where n_params is missing or zero."""
    df = df.copy()
    n_params = pd.to_numeric(df["n_params"], errors="coerce").astype(float)
    num = (pd.to_numeric(df["n_train"], errors="coerce").astype(float)
           * pd.to_numeric(df["n_classes"], errors="coerce").astype(float))
    df["q"] = num / n_params.where(n_params > 0)
    df["q_bin"] = q_bin(df["q"])
    return df
