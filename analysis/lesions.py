"""The lesion figure (Greff et al.'s iterative-estimation experiments): how much the validation
loss rises when one block is removed, or two adjacent blocks are swapped, by block position.

Plotting only: the table comes from `study.lesion.run_lesion` (columns cell_id, variant,
architecture, n_blocks, lesion, position, loss_increase, ...). No torch, no ray; drawn on a
`matplotlib.figure.Figure` with an Agg canvas, never through pyplot.
"""
from __future__ import annotations

import matplotlib as mpl
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from sweep.params import ARCHITECTURES

PANELS = (("remove", "remove one block"), ("swap", "swap blocks i and i+1"))
_STYLE = {"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 7,
          "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
          "grid.alpha": 0.3, "legend.frameon": False, "pdf.fonttype": 42}
_DEPTH_STYLES = ("-", "--", ":", "-.")
_MARKERS = "osD^v<>ph*"


def _variants(df: pd.DataFrame) -> list[str]:
    """Variants ordered by architecture (ARCHITECTURES order), then by name."""
    col = "variant" if "variant" in df else "architecture"
    first = df.groupby(col)["architecture"].first()
    rank = {a: i for i, a in enumerate(ARCHITECTURES)}
    return sorted(first.index, key=lambda v: (rank.get(first[v], len(rank)), str(v)))


def plot_lesions(df: pd.DataFrame, ax=None) -> Figure:
    """Loss increase against block position, one colour per variant (architecture, or
    architecture plus the option that varies, e.g. the highway gate) and one line style per
    net depth in blocks; mean over the cells (datasets, widths, kernels) of that variant.

    `ax`: None for a new figure, or two Axes (remove, swap) to draw into.
    The y axis is symmetric-log: removal in a plain net costs orders of magnitude more than
    in a residual one, and a parallel net's swap costs exactly nothing.
    """
    if df is None or df.empty or not df["lesion"].isin([p for p, _ in PANELS]).any():
        raise ValueError("no lesion rows to plot (only intact evaluations, or an empty table)")
    if "variant" not in df:
        df = df.assign(variant=df["architecture"])
    if "n_blocks" not in df:
        df = df.assign(n_blocks=df.groupby("cell_id")["position"].transform("max") + 1)
    variants = _variants(df)
    cmap = colormaps["tab10" if len(variants) <= 10 else "tab20"]
    colors = {v: cmap(i % cmap.N) for i, v in enumerate(variants)}
    depths = sorted(int(d) for d in df["n_blocks"].dropna().unique())
    depth_style = {d: _DEPTH_STYLES[i % len(_DEPTH_STYLES)] for i, d in enumerate(depths)}

    with mpl.rc_context(_STYLE):
        if ax is None:
            fig = Figure(figsize=(10, 4), layout="constrained")
            FigureCanvasAgg(fig)
            axes = fig.subplots(1, 2, sharey=True)
        else:
            axes = list(ax)
            if len(axes) != 2:
                raise ValueError("plot_lesions draws two panels: pass two Axes (remove, swap)")
            fig = axes[0].figure
        for a, (lesion, title) in zip(axes, PANELS):
            sub = df[df["lesion"] == lesion]
            if sub.empty:
                a.text(0.5, 0.5, "no nets with two or more blocks" if lesion == "swap"
                       else "no data", transform=a.transAxes, ha="center", color="0.4")
            means = (sub.groupby(["variant", "n_blocks", "position"])["loss_increase"]
                     .mean().reset_index())
            for (variant, depth), line in means.groupby(["variant", "n_blocks"]):
                i = variants.index(variant)
                a.plot(line["position"], line["loss_increase"], color=colors[variant],
                       linestyle=depth_style[int(depth)], marker=_MARKERS[i % len(_MARKERS)],
                       markersize=4, linewidth=1.2)
            a.axhline(0.0, color="0.3", linewidth=0.8)
            a.set_yscale("symlog", linthresh=1e-2)
            a.set_title(title)
            a.set_xlabel("block position i (0 = next to the stem)")
            positions = sorted(sub["position"].dropna().astype(int).unique()) if not sub.empty else []
            if positions:
                a.set_xticks(positions)
        axes[0].set_ylabel("validation loss increase over intact net")
        handles = [Line2D([], [], color=colors[v], marker=_MARKERS[i % len(_MARKERS)],
                          markersize=4, label=str(v)) for i, v in enumerate(variants)]
        if len(depths) > 1:
            handles += [Line2D([], [], color="0.3", linestyle=depth_style[d], label=f"{d} blocks")
                        for d in depths]
        axes[-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return fig
