"""The lesion figure (Greff et al.'s iterative-estimation experiments): how much the validation
loss rises when one block is removed, or two adjacent blocks are swapped, by block position.

Plotting only: the table is DIR/lesions/lesions.parquet, computed by `study lesion`
(`study.lesion.run_lesion`; columns cell_id, variant, architecture, n_blocks, lesion, position,
loss_increase, ...); `analysis.write` saves the figure with the others. No torch, no ray;
drawn on a `matplotlib.figure.Figure` with an Agg canvas, never through pyplot.
"""
from __future__ import annotations

import matplotlib as mpl
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from sweep.params import ARCHITECTURES

PANELS = (("remove", "remove block i"), ("swap", "swap blocks i and i+1"))
_STYLE = {"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 7,
          "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
          "grid.alpha": 0.3, "legend.frameon": False, "pdf.fonttype": 42}
_DEPTH_STYLES = ("-", "--", ":", "-.")
_MARKERS = "osD^v<>ph*"


def _variants(df: pd.DataFrame) -> list[str]:
    """Variants ordered by architecture (ARCHITECTURES order), then by name."""
    first = df.groupby("variant")["architecture"].first()
    rank = {a: i for i, a in enumerate(ARCHITECTURES)}
    return sorted(first.index, key=lambda v: (rank.get(first[v], len(rank)), str(v)))


def _panel(a, sub: pd.DataFrame, lesion: str, style: dict, depth_style: dict | None) -> None:
    if sub.empty:
        a.text(0.5, 0.5, "a single block: nothing to swap" if lesion == "swap" else "no data",
               transform=a.transAxes, ha="center", va="center", color="0.4")
    means = sub.groupby(["variant", "n_blocks", "position"])["loss_increase"].mean().reset_index()
    for (variant, depth), line in means.groupby(["variant", "n_blocks"]):
        a.plot(line["position"], line["loss_increase"], markersize=4, linewidth=1.2,
               linestyle=depth_style[int(depth)] if depth_style else "-", **style[variant])
    a.axhline(0.0, color="0.3", linewidth=0.8)
    # Symmetric log: removal in a plain net costs orders of magnitude more than in a residual
    # one, a parallel net's swap costs exactly nothing, and some lesions even help.
    a.set_yscale("symlog", linthresh=1e-2)
    if not sub.empty:
        a.set_xticks(sorted(sub["position"].dropna().astype(int).unique()))


def plot_lesions(df: pd.DataFrame, ax=None) -> Figure:
    """Validation-loss increase against block position; one colour and marker per variant
    (the architecture, or the architecture plus the option that varies in the study, e.g. the
    highway gate), each point the mean over that variant's cells (datasets, widths, ...).

    ax=None: a new figure with one row per net depth (in blocks) and the panels remove | swap.
    ax = two Axes (remove, swap): every depth drawn into them, one line style per depth.
    """
    if df is None or df.empty or not df["lesion"].isin([p for p, _ in PANELS]).any():
        raise ValueError("no lesion rows to plot (only intact evaluations, or an empty table)")
    if "variant" not in df:
        df = df.assign(variant=df["architecture"])
    if "n_blocks" not in df:
        df = df.assign(n_blocks=df.groupby("cell_id")["position"].transform("max") + 1)
    df = df[df["lesion"] != "intact"]
    variants = _variants(df)
    cmap = colormaps["tab10" if len(variants) <= 10 else "tab20"]
    style = {v: {"color": cmap(i % cmap.N), "marker": _MARKERS[i % len(_MARKERS)]}
             for i, v in enumerate(variants)}
    depths = sorted(int(d) for d in df["n_blocks"].unique())

    with mpl.rc_context(_STYLE):
        if ax is None:
            fig = Figure(figsize=(9.5, 2.6 * len(depths) + 0.6), layout="constrained")
            FigureCanvasAgg(fig)
            grid = fig.subplots(len(depths), 2, squeeze=False, sharey=True)
            for row, depth in zip(grid, depths):
                for a, (lesion, title) in zip(row, PANELS):
                    sub = df[(df["n_blocks"] == depth) & (df["lesion"] == lesion)]
                    _panel(a, sub, lesion, style, None)
                    a.set_xticks(range(depth))  # both panels of a row on the same positions
                    a.set_xlim(-0.4, depth - 0.6)
                    a.set_title(f"{title} — nets of {depth} block{'s' if depth > 1 else ''}")
            bottom, legend_ax = grid[-1], grid[0][-1]
            depth_handles = []
        else:
            bottom = list(ax)
            if len(bottom) != 2:
                raise ValueError("plot_lesions draws two panels: pass two Axes (remove, swap)")
            fig, legend_ax = bottom[0].figure, bottom[-1]
            depth_style = {d: _DEPTH_STYLES[i % len(_DEPTH_STYLES)] for i, d in enumerate(depths)}
            for a, (lesion, title) in zip(bottom, PANELS):
                _panel(a, df[df["lesion"] == lesion], lesion, style, depth_style)
                a.set_title(title)
            depth_handles = [Line2D([], [], color="0.3", linestyle=depth_style[d],
                                    label=f"{d} blocks") for d in depths] if len(depths) > 1 else []
        for a in bottom:
            a.set_xlabel("block position i (0 = next to the stem)")
        for a in (fig.axes if ax is None else bottom[:1]):
            if a.get_subplotspec() is None or a.get_subplotspec().is_first_col():
                a.set_ylabel("val loss increase")
        handles = [Line2D([], [], markersize=4, label=str(v), **style[v]) for v in variants]
        legend_ax.legend(handles=handles + depth_handles, loc="upper left",
                         bbox_to_anchor=(1.02, 1.0))
    return fig
