"""The figures of single cells (no pairing): Table 2 as heat maps, and the zoo of every
finished cell's loss against its parameter count."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ._common import PRETTY, Q_LABELS, NothingToPlot, arch_order, dataset_label, dataset_order
from .draw_base import _figure, arch_color
from .ticks import log_axis, log_colorbar


# -- (2) Table 2 as a figure -----------------------------------------------------------------
def plot_table2(t2: pd.DataFrame, fig=None) -> Figure:
    """Table 2 as a table-figure: per dataset (rows of panels) a heat map of mean train loss
    and one of mean validation loss side by side (rows = architectures, columns = Q bins), each
    cell printed with its value and n (cells averaged); one logarithmic colour scale per
    dataset, shared by its train and validation panels; a bin without cells is grey, '–'."""
    if t2 is None or t2.empty:
        raise NothingToPlot("no finished (status ok) cell with a known Q")
    metrics = [c for c in t2.columns if c not in ("dataset", "architecture", "q_bin", "n")][:2]
    datasets = dataset_order(t2["dataset"])
    n_arch = max(len(t2.loc[t2["dataset"] == d, "architecture"].unique()) for d in datasets)
    fig, axes = _figure(fig, len(datasets), len(metrics),
                        panel=(3.9, 0.75 + 0.42 * n_arch))
    cmap = colormaps["viridis_r"].with_extremes(bad="0.92")
    for r, ds in enumerate(datasets):
        sub = t2[t2["dataset"] == ds]
        archs = arch_order(sub["architecture"])
        vals = sub[metrics].to_numpy(float)
        vals = vals[np.isfinite(vals) & (vals > 0)]
        lo, hi = (vals.min(), vals.max()) if vals.size else (1e-3, 1.0)
        if hi <= lo * 1.0001:
            lo, hi = lo / 1.5, hi * 1.5
        norm = LogNorm(lo, hi)  # one scale for the dataset's train and validation panels
        im = None
        for c, m in enumerate(metrics):
            ax = axes[r, c]
            grid = np.full((len(archs), len(Q_LABELS)), np.nan)
            ns = np.zeros_like(grid, dtype=int)
            for row in sub.itertuples(index=False):
                i, j = archs.index(row.architecture), Q_LABELS.index(row.q_bin)
                grid[i, j], ns[i, j] = getattr(row, m), row.n
            im = _heat_map(ax, grid, ns, cmap, norm)
            ax.set_xticks(range(len(Q_LABELS)), [f"Q∈{x}" for x in Q_LABELS])
            ax.set_yticks(range(len(archs)), archs)
            ax.tick_params(length=0)
            ax.grid(False)
            for sp in ax.spines.values():
                sp.set_visible(False)
            ax.set_title(f"{dataset_label(ds)} · mean {PRETTY.get(m, m)}")
        if im is not None:
            cb = fig.colorbar(im, ax=list(axes[r]), shrink=0.9, pad=0.02)
            cb.set_label(f"{dataset_label(ds)} mean {'loss' if metrics[0].endswith('loss') else 'value'}",
                         fontsize=7.5)
            log_colorbar(cb, lo, hi)
    return fig


def _heat_map(ax, grid: np.ndarray, ns: np.ndarray, cmap, norm):
    """One Table 2 panel: the coloured cells, each printed with its value and n ('–': none)."""
    shown = np.ma.masked_invalid(np.where(grid > 0, grid, np.nan))
    im = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid[i, j]
            if not np.isfinite(v):
                ax.text(j, i, "–", ha="center", va="center", fontsize=8, color="0.4")
                continue
            rgba = cmap(norm(v)) if v > 0 else (1, 1, 1, 1)
            dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
            ax.text(j, i, f"{_cell(v)}\nn={ns[i, j]}", ha="center", va="center",
                    fontsize=7, color="white" if dark else "black", linespacing=1.1)
    return im


def _cell(v: float) -> str:
    return f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}" if abs(v) < 10 else f"{v:.3g}"


# -- (7) the zoo --------------------------------------------------------------------------------
def plot_zoo(df: pd.DataFrame, metric: str = "val_loss", fig=None) -> Figure:
    """Final `metric` of every 'ok' cell against its parameter count, colour = architecture,
    one panel per dataset, log x."""
    ok = df[(df["status"] == "ok")]
    ok = ok[pd.to_numeric(ok["n_params"], errors="coerce").gt(0) & ok[metric].notna()]
    if ok.empty:
        raise NothingToPlot(f"no finished (status ok) cell with n_params and {metric}")
    datasets = dataset_order(ok["dataset"])
    fig, axes = _figure(fig, 1, len(datasets), panel=(3.6, 3.0))
    archs = arch_order(ok["architecture"])
    for ax, ds in zip(axes[0], datasets):
        sub = ok[ok["dataset"] == ds]
        for arch in archs:
            s = sub[sub["architecture"] == arch]
            ax.scatter(s["n_params"].astype(float), s[metric].astype(float), s=10, alpha=0.6,
                       linewidths=0, color=arch_color(arch), rasterized=True)
        log_axis(ax, "x", sub["n_params"].astype(float))
        log_axis(ax, "y", sub[metric])
        ax.set_title(f"{dataset_label(ds)} (n = {len(sub)} cells)")
        ax.set_xlabel("parameters")
        ax.set_ylabel(f"final {PRETTY[metric]}")
    counts = ok["architecture"].value_counts()
    handles = [Line2D([], [], ls="", marker="o", color=arch_color(x), label=f"{x} ({counts[x]})")
               for x in archs]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)))
    return fig
