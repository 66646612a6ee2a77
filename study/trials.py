"""Views of a trials frame that the runner, the lesion study and analysis all take: the cells
that were trained, which architecture variant each row is, and how they trained (solo or in
a fused group: study.fused) with the compute time that counts a group once.

pandas only, no torch or ray: analysis imports this module.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from sweep.params import ARCH_SPECIFIC


def trained_cells(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of cells that were trained: a same-network copy's row (same_network_as set)
    copies another cell's result and time, so it is left out. A frame from before the column
    existed is all trained cells."""
    if "same_network_as" not in df.columns:
        return df
    return df[df["same_network_as"].isna()]


def variant_labels(rows: pd.DataFrame, sep: str = ", ") -> pd.Series:
    """Per row, the architecture-specific options that take more than one value among the rows
    of its architecture (a missing value counts as one), as "gate=full, branches=4" joined by
    `sep` (a missing value names nothing); '' where none varies: one variant needs no name."""
    out = np.full(len(rows), "", dtype=object)
    cols = [c for c in ARCH_SPECIFIC if c in rows.columns]
    for at in rows.groupby("architecture", sort=False).indices.values():
        grp = rows.iloc[at]
        for c in cols:
            v = grp[c]
            if v.nunique(dropna=False) <= 1:
                continue
            part = np.where(v.notna(), c + "=" + v.astype(str), "")
            cur = out[at]
            out[at] = np.where((cur != "") & (part != ""), cur + sep + part, cur + part)
    return pd.Series(out, index=rows.index, dtype=object)


def fused(df: pd.DataFrame) -> pd.Series:
    """Per row, whether the cell trained in a fused group of two or more (its times are then
    its group's). A frame from before the columns existed is all solo."""
    if "group_size" not in df.columns:
        return pd.Series(False, index=df.index)
    return pd.to_numeric(df["group_size"], errors="coerce").fillna(1) > 1


def compute_seconds(trained: pd.DataFrame) -> float:
    """Device time the trained cells took: a solo cell's wall_s, and each fused group's once
    (its members all carry the group's time)."""
    wall = pd.to_numeric(trained["wall_s"], errors="coerce").fillna(0.0)
    if "fused_group" not in trained.columns:
        return float(wall.sum())
    in_group = fused(trained) & trained["fused_group"].notna()
    groups = wall[in_group].groupby(trained.loc[in_group, "fused_group"]).max()
    return float(wall[~in_group].sum() + groups.sum())


def training_modes(trained: pd.DataFrame) -> dict[str, int]:
    """Trained cells by how they trained: {"solo": n, "fused": n}."""
    f = fused(trained)
    return {"solo": int((~f).sum()), "fused": int(f.sum())}
