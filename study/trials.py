"""Views of a trials frame that the runner, the lesion study and analysis all take: the cells
that were trained, and which architecture variant each row is.

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
