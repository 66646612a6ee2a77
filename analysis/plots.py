"""Layer 2: one function per figure. Each takes DataFrames (and `fig=None`), returns the Figure.

Figures are made with `matplotlib.figure.Figure` on an Agg canvas, never through pyplot: no
global figure registry to leak, no GUI backend needed, and the caller's backend is untouched.
A figure that cannot be drawn from the data raises NothingToPlot with the reason.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from sweep.params import ARCHITECTURES

from ._common import (HIGHER_IS_BETTER, PRETTY, Q_LABELS, NothingToPlot, arch_order,
                      dataset_label, dataset_order)
from .data import swept_factors
from .stats import bootstrap_median_ci

# The look of every figure, applied once by the report layer (matplotlib.rc_context).
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


def _need_pairs(pairs_df):
    if pairs_df is None or pairs_df.empty:
        raise NothingToPlot("no complete pairs (both twins finished with status ok)")


def _auto_log(ax, values) -> None:
    """Log y only where the values span more than a decade: below that, a log axis just
    prints awkward labels like 5.3x10^-1."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size and v.min() > 0 and v.max() / v.min() > 10:
        ax.set_yscale("log")


def _empty_panel(ax, text="no data"):
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


# -- (1) and (6): equivalence scatter --------------------------------------------------------
def plot_equivalence(pairs_df: pd.DataFrame, metrics=("train_loss", "val_loss"),
                     log: bool | None = None, fig=None) -> Figure:
    """b's metric against a's, one panel per dataset (rows) x metric (columns), colour = Q bin,
    y = x line, with the median ratio b/a and the share of pairs b wins annotated.
    Losses default to log-log axes, accuracies to linear ones."""
    _need_pairs(pairs_df)
    metrics = [m for m in metrics if pairs_df[m + "_a"].notna().any()]
    if not metrics:
        raise NothingToPlot("no pair has these metrics recorded")
    a, b = _names(pairs_df)
    datasets = dataset_order(pairs_df["dataset"])
    fig, axes = _figure(fig, len(datasets), len(metrics), panel=(3.3, 3.1))
    q = pairs_df["q_bin"].astype(object)
    for r, ds in enumerate(datasets):
        for c, m in enumerate(metrics):
            ax = axes[r, c]
            use_log = (not HIGHER_IS_BETTER[m]) if log is None else log
            x = pd.to_numeric(pairs_df[m + "_a"], errors="coerce")
            y = pd.to_numeric(pairs_df[m + "_b"], errors="coerce")
            keep = (pairs_df["dataset"] == ds) & x.notna() & y.notna()
            hidden = 0
            if use_log:
                pos = (x > 0) & (y > 0)
                hidden = int((keep & ~pos).sum())
                keep &= pos
            if not keep.any():
                _empty_panel(ax, "no pairs")
                ax.set_title(f"{dataset_label(ds)} · {PRETTY[m]}")
                continue
            # One call, points in a fixed random order: no Q bin hides the others under it.
            idx = np.flatnonzero(keep.to_numpy())
            idx = idx[np.random.default_rng(0).permutation(idx.size)]
            colors = [Q_COLORS.get(v, NO_Q_COLOR) for v in q.iloc[idx]]
            ax.scatter(x.iloc[idx], y.iloc[idx], s=9, alpha=0.65, linewidths=0, c=colors,
                       rasterized=True)
            lo = float(min(x[keep].min(), y[keep].min()))
            hi = float(max(x[keep].max(), y[keep].max()))
            pad = (hi / lo) ** 0.05 if use_log and lo > 0 else None
            lo, hi = (lo / pad, hi * pad) if pad else (lo - 0.03 * (hi - lo + 1e-12),
                                                        hi + 0.03 * (hi - lo + 1e-12))
            ax.plot([lo, hi], [lo, hi], color="0.2", lw=0.8, ls="--", zorder=0)
            if use_log:
                ax.set_xscale("log")
                ax.set_yscale("log")
                # Minor labels on a short log range collide; the major ones suffice.
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_aspect("equal", adjustable="box")
            ratio = pairs_df.loc[keep, m + "_ratio"]
            xa, yb = x[keep], y[keep]
            wins = int(((yb > xa) if HIGHER_IS_BETTER[m] else (yb < xa)).sum())
            n = int(keep.sum())
            text = (f"median {b}/{a} = {ratio.median():.3g}\n"
                    f"{b} better in {wins / n:.0%} ({wins}/{n})")
            if hidden:
                text += f"\n{hidden} pair(s) with loss ≤ 0 not shown"
            # In the corner where b does worse, so the box covers the fewer points.
            corner = (0.97, 0.03, "right", "bottom") if HIGHER_IS_BETTER[m] else (0.03, 0.97, "left", "top")
            ax.text(corner[0], corner[1], text, transform=ax.transAxes, ha=corner[2],
                    va=corner[3], fontsize=7.5, zorder=5,
                    bbox=dict(boxstyle="round,pad=0.3", fc="white", ec="0.8", alpha=0.9))
            ax.set_title(f"{dataset_label(ds)} · {PRETTY[m]}")
            ax.set_xlabel(f"{a} {PRETTY[m]}")
            ax.set_ylabel(f"{b} {PRETTY[m]}")
    handles = [Line2D([], [], ls="", marker="o", color=Q_COLORS[lbl], label=f"Q∈{lbl}")
               for lbl in Q_LABELS]
    if q.isna().any():
        handles.append(Line2D([], [], ls="", marker="o", color=NO_Q_COLOR, label="Q unknown"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    return fig


# -- (2) Table 2 as a figure -----------------------------------------------------------------
def plot_table2(t2: pd.DataFrame, fig=None) -> Figure:
    """Mean loss against Q bin, one line per architecture; rows = datasets, cols = train/val."""
    if t2 is None or t2.empty:
        raise NothingToPlot("no finished (status ok) cell with a known Q")
    datasets = dataset_order(t2["dataset"])
    fig, axes = _figure(fig, len(datasets), 2, panel=(3.4, 2.7))
    xs = {lbl: i for i, lbl in enumerate(Q_LABELS)}
    for r, ds in enumerate(datasets):
        sub = t2[t2["dataset"] == ds]
        for c, m in enumerate(("train_loss", "val_loss")):
            ax = axes[r, c]
            for arch in arch_order(sub["architecture"]):
                s = sub[sub["architecture"] == arch]
                full = pd.Series(np.nan, index=list(Q_LABELS))
                full[s["q_bin"].to_list()] = s[m].to_numpy(float)
                ax.plot([xs[k] for k in full.index], full.to_numpy(), marker="o", ms=4,
                        color=arch_color(arch), label=arch)
            _auto_log(ax, sub[m])
            ax.set_xticks(range(len(Q_LABELS)), [f"Q∈{x}" for x in Q_LABELS])
            ax.set_title(f"{dataset_label(ds)} · mean {PRETTY[m]}")
            ax.set_xlabel("determination ratio Q")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=max(1, len(labels)))
    return fig


# -- (3) distribution of log ratios ----------------------------------------------------------
def plot_ratio_distribution(pairs_df: pd.DataFrame, metrics=("train_loss", "val_loss"),
                            fig=None) -> Figure:
    """Histogram of log10(b/a) per dataset (rows) x metric (cols), with the median and its
    bootstrap 95% interval (fixed seed)."""
    _need_pairs(pairs_df)
    a, b = _names(pairs_df)
    datasets = dataset_order(pairs_df["dataset"])
    fig, axes = _figure(fig, len(datasets), len(metrics), panel=(3.4, 2.5))
    for r, ds in enumerate(datasets):
        for c, m in enumerate(metrics):
            ax = axes[r, c]
            ratio = pairs_df.loc[pairs_df["dataset"] == ds, m + "_ratio"].to_numpy(float)
            lr = np.log10(ratio[np.isfinite(ratio) & (ratio > 0)])
            ax.set_title(f"{dataset_label(ds)} · {PRETTY[m]}")
            if lr.size == 0:
                _empty_panel(ax, "no pairs")
                continue
            bins = int(np.clip(np.sqrt(lr.size) * 2, 10, 60))
            span = None if np.ptp(lr) > 1e-9 else (lr[0] - 0.05, lr[0] + 0.05)  # all equal
            ax.hist(lr, bins=bins, range=span, color=arch_color(b), alpha=0.75)
            med = float(np.median(lr))
            lo, hi = bootstrap_median_ci(lr)
            ax.axvline(0, color="0.2", lw=0.8, ls="--")
            ax.axvspan(lo, hi, color="crimson", alpha=0.2, lw=0)
            ax.axvline(med, color="crimson", lw=1.2)
            ax.text(0.97, 0.95, f"median {b}/{a} = {10**med:.3g}\n95% CI [{10**lo:.3g}, {10**hi:.3g}]"
                    f"\nn = {lr.size}", transform=ax.transAxes, ha="right", va="top", fontsize=7.5)
            ax.set_xlabel(f"log10({b} / {a})")
            ax.set_ylabel("pairs")
    return fig


# -- (4) factor effects ------------------------------------------------------------------------
def _levels(s: pd.Series) -> list:
    vals = list(pd.unique(s.dropna()))
    return sorted(vals, key=lambda v: (type(v).__name__, v))


def plot_factor_effects(pairs_df: pd.DataFrame, factors=None, metrics=("train_loss", "val_loss"),
                        fig=None) -> Figure:
    """Median log10(b/a) (bars: interquartile range) against each swept factor, one panel per
    factor; colour = dataset, solid = validation, dashed = training loss."""
    _need_pairs(pairs_df)
    a, b = _names(pairs_df)
    factors = swept_factors(pairs_df) if factors is None else list(factors)
    if not factors:
        raise NothingToPlot("no grid axis varies across the pairs")
    ncols = min(4, len(factors))
    nrows = -(-len(factors) // ncols)
    fig, axes = _figure(fig, nrows, ncols, panel=(3.0, 2.6))
    datasets = dataset_order(pairs_df["dataset"])
    styles = {"val_loss": "-", "train_loss": "--", "test_loss": ":"}
    logs = {m: np.log10(pairs_df[m + "_ratio"].where(pairs_df[m + "_ratio"] > 0)) for m in metrics}
    n_lines = len(datasets) * len(metrics)
    for k, f in enumerate(factors):
        ax = axes.flat[k]
        levels = _levels(pairs_df[f])
        pos = {v: i for i, v in enumerate(levels)}
        line = 0
        for di, ds in enumerate(datasets):
            in_ds = pairs_df["dataset"] == ds
            for m in metrics:
                frame = pd.DataFrame({"f": pairs_df.loc[in_ds, f], "y": logs[m][in_ds]}).dropna()
                off = (line - (n_lines - 1) / 2) * 0.08
                line += 1
                if frame.empty:
                    continue
                qs = frame.groupby("f")["y"].quantile([0.25, 0.5, 0.75]).unstack()
                x = np.array([pos[v] for v in qs.index]) + off
                ax.errorbar(x, qs[0.5], yerr=[qs[0.5] - qs[0.25], qs[0.75] - qs[0.5]],
                            color=dataset_color(di), ls=styles.get(m, "-"), marker="o", ms=3,
                            lw=1, capsize=2, label=f"{dataset_label(ds)} {PRETTY[m]}")
        ax.axhline(0, color="0.2", lw=0.8, ls="--", zorder=0)
        ax.set_xticks(range(len(levels)), [str(v) for v in levels])
        name = f[:-2] + f" ({a if f.endswith('_a') else b})" if f[-2:] in ("_a", "_b") else f
        ax.set_title(name)
        ax.set_ylabel(f"log10({b}/{a})")
    for ax in list(axes.flat)[len(factors):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, max(1, len(labels))))
    return fig


# -- (5) learning curves ----------------------------------------------------------------------
def plot_learning_curves(pairs_df: pd.DataFrame, epochs_df: pd.DataFrame, rows=None,
                         fig=None) -> Figure:
    """Train (dashed) and validation (solid) loss per epoch of both twins of each chosen pair
    (`rows`: index labels of pairs_df; default all rows), one panel per pair."""
    _need_pairs(pairs_df)
    a, b = _names(pairs_df)
    chosen = pairs_df if rows is None else pairs_df.loc[list(rows)]
    if chosen.empty:
        raise NothingToPlot("no pair chosen for learning curves")
    if epochs_df is None or epochs_df.empty:
        raise NothingToPlot("no epoch records for the chosen pairs")
    by_cell = {cid: g.sort_values("epoch") for cid, g in
               epochs_df[epochs_df["cell_id"].isin(set(chosen["cell_id_a"]) | set(chosen["cell_id_b"]))]
               .groupby("cell_id")}
    if not by_cell:
        raise NothingToPlot("no epoch records for the chosen pairs")
    ncols = min(3, len(chosen))
    nrows = -(-len(chosen) // ncols)
    fig, axes = _figure(fig, nrows, ncols, panel=(3.4, 2.7))
    for ax, (_, p) in zip(axes.flat, chosen.iterrows()):
        drawn = 0
        for side, arch in (("a", a), ("b", b)):
            g = by_cell.get(p["cell_id_" + side])
            if g is None:
                continue
            tag = arch + (f" [{p['variant_b']}]" if side == "b" and p.get("variant_b") else "")
            for m, ls in (("train_loss", "--"), ("val_loss", "-")):
                y = g[m].to_numpy(float)
                if np.isfinite(y).any():
                    ax.plot(g["epoch"], y, ls=ls, color=arch_color(arch), lw=1.2,
                            label=f"{tag} {'train' if m == 'train_loss' else 'val'}")
                    drawn += 1
        ratio = p.get("val_loss_ratio", np.nan)
        ax.set_title(f"{dataset_label(p['dataset'])} · layers {p.get('layers')}, filters "
                     f"{p.get('filters')}, kernel {p.get('kernel')}\npair {str(p['pair_key'])[:8]}"
                     f" · val loss ratio {ratio:.3g}")
        if not drawn:
            _empty_panel(ax, "no epoch records")
            continue
        _auto_log(ax, np.concatenate([ln.get_ydata() for ln in ax.get_lines()]))
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend(fontsize=6.5)
    for ax in list(axes.flat)[len(chosen):]:
        ax.set_visible(False)
    return fig


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
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        _auto_log(ax, sub[metric])
        ax.set_title(dataset_label(ds))
        ax.set_xlabel("parameters")
        ax.set_ylabel(f"final {PRETTY[metric]}")
    counts = ok["architecture"].value_counts()
    handles = [Line2D([], [], ls="", marker="o", color=arch_color(x), label=f"{x} ({counts[x]})")
               for x in archs]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(4, len(handles)))
    return fig
