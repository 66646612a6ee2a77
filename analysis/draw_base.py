"""Shared pieces of the figure modules: the axis rule, the style, the colours, and the small
helpers every figure uses (a fresh figure on an Agg canvas, the pair names, an empty panel).

Figures are made with `matplotlib.figure.Figure` on an Agg canvas, never through pyplot: no
global figure registry to leak, no GUI backend needed, and the caller's backend is untouched.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sweep.params import ARCHITECTURES

from ._common import Q_LABELS, NothingToPlot
from .frames import evidence

# The one axis rule of every figure: a loss axis is logarithmic in every panel (losses span
# decades across a grid, and a ratio is a distance on a log axis); an accuracy axis is linear.
AXIS_RULE = "Every loss axis is logarithmic, every accuracy axis linear."

# The look of every figure, applied once by draw_figures and write_outputs (rc_context).
STYLE = {
    "figure.dpi": 100, "savefig.dpi": 150,  # constrained layout: no bbox="tight" redraw
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False,
    "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.5,
    "legend.frameon": False, "pdf.fonttype": 42, "image.cmap": "viridis",
}

Q_COLORS = dict(zip(Q_LABELS, colormaps["viridis"](np.linspace(0.0, 0.9, len(Q_LABELS)))))
NO_Q_COLOR = "0.6"
_TAB = colormaps["tab10"].colors


def arch_color(arch: str):
    i = ARCHITECTURES.index(arch) if arch in ARCHITECTURES else len(ARCHITECTURES)
    return _TAB[i % len(_TAB)]


def dataset_color(i: int):
    return colormaps["Dark2"].colors[i % 8]


def _figure(fig, nrows: int, ncols: int, panel=(3.2, 2.8), **kw):
    """A fresh (or cleared) figure with an nrows x ncols grid of axes (always 2-D)."""
    if fig is None:
        fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
        FigureCanvasAgg(fig)
    else:
        fig.clear()
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _names(pairs_df: pd.DataFrame) -> tuple[str, str]:
    return str(pairs_df["architecture_a"].iloc[0]), str(pairs_df["architecture_b"].iloc[0])


def _unit(pairs_df: pd.DataFrame) -> str:
    """What one row of a pairs-like frame is: a setting (seeds averaged) or a pair of cells."""
    return "settings" if "n_seeds" in pairs_df.columns else "pairs"


def _need_pairs(pairs_df) -> pd.DataFrame:
    """The pairs of two different networks (same-network controls left out), or raise."""
    if pairs_df is not None:
        pairs_df = evidence(pairs_df)
    if pairs_df is None or pairs_df.empty:
        raise NothingToPlot("no complete pairs of two different networks (both twins finished "
                            "with status ok)")
    return pairs_df


def _empty_panel(ax, text="no data"):
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])
