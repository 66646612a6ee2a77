"""Layer 2: one function per figure. Each takes DataFrames (and `fig=None`), returns the Figure;
`draw_figures` draws every figure of an Analysis (compute.analyse) in memory.

Figures are made with `matplotlib.figure.Figure` on an Agg canvas, never through pyplot: no
global figure registry to leak, no GUI backend needed, and the caller's backend is untouched.
A figure that cannot be drawn from the data raises NothingToPlot with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.colors import LogNorm

from sweep.params import ARCHITECTURES

from ._common import (HIGHER_IS_BETTER, PRETTY, Q_LABELS, NothingToPlot, arch_order,
                      dataset_label, dataset_order, guarded)
from .compute import Analysis
from .frames import evidence, swept_factors
from .lesion_figure import plot_lesions
from .stats import TIME_METRIC, bootstrap_median_ci, noise_of
from .ticks import log_axis, log_colorbar

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


# -- (1) and (6): equivalence scatter --------------------------------------------------------
def plot_equivalence(pairs_df: pd.DataFrame, metrics=("train_loss", "val_loss"),
                     log: bool | None = None, fig=None) -> Figure:
    """b's metric against a's, one panel per dataset (rows) x metric (columns), colour = Q bin,
    y = x line, with the median ratio b/a and the share of pairs b wins annotated.
    Losses default to log-log axes, accuracies to linear ones."""
    pairs_df = _need_pairs(pairs_df)
    metrics = [m for m in metrics if pairs_df[m + "_a"].notna().any()]
    if not metrics:
        raise NothingToPlot("no pair has these metrics recorded")
    datasets = dataset_order(pairs_df["dataset"])
    fig, axes = _figure(fig, len(datasets), len(metrics), panel=(3.3, 3.1))
    for r, ds in enumerate(datasets):
        for c, m in enumerate(metrics):
            use_log = (not HIGHER_IS_BETTER[m]) if log is None else log
            _equivalence_panel(axes[r, c], pairs_df, ds, m, use_log)
    handles = [Line2D([], [], ls="", marker="o", color=Q_COLORS[lbl], label=f"Q∈{lbl}")
               for lbl in Q_LABELS]
    if pairs_df["q_bin"].isna().any():
        handles.append(Line2D([], [], ls="", marker="o", color=NO_Q_COLOR, label="Q unknown"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    return fig


def _equivalence_panel(ax, pairs_df: pd.DataFrame, ds: str, m: str, use_log: bool) -> None:
    """One dataset x metric: a dot per pair (b against a) around y = x, numbers in the title."""
    a, b = _names(pairs_df)
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
        return
    # One call, points in a fixed random order: no Q bin hides the others under it.
    idx = np.flatnonzero(keep.to_numpy())
    idx = idx[np.random.default_rng(0).permutation(idx.size)]
    colors = [Q_COLORS.get(v, NO_Q_COLOR) for v in pairs_df["q_bin"].astype(object).iloc[idx]]
    ax.scatter(x.iloc[idx], y.iloc[idx], s=9, alpha=0.65, linewidths=0, c=colors,
               rasterized=True)
    _diagonal(ax, x[keep], y[keep], use_log)
    xa, yb = x[keep], y[keep]
    wins = int(((yb > xa) if HIGHER_IS_BETTER[m] else (yb < xa)).sum())
    n = int(keep.sum())
    # The numbers go in the title, never over the data.
    text = f"median ratio {pairs_df.loc[keep, m + '_ratio'].median():.3g}; {b} better in {wins}/{n}"
    if hidden:
        text += f"; {hidden} with loss ≤ 0 not shown"
    ax.set_title(f"{dataset_label(ds)} · {PRETTY[m]} (n = {n} {_unit(pairs_df)})\n{text}",
                 fontsize=8)
    ax.set_xlabel(f"{a} {PRETTY[m]}")
    ax.set_ylabel(f"{b} {PRETTY[m]}")


def _diagonal(ax, x: pd.Series, y: pd.Series, use_log: bool) -> None:
    """Equal square limits around the data (padded), the y = x line, log axes if `use_log`."""
    lo = float(min(x.min(), y.min()))
    hi = float(max(x.max(), y.max()))
    pad = (hi / lo) ** 0.05 if use_log and lo > 0 else None
    lo, hi = (lo / pad, hi * pad) if pad else (lo - 0.03 * (hi - lo + 1e-12),
                                                hi + 0.03 * (hi - lo + 1e-12))
    ax.plot([lo, hi], [lo, hi], color="0.2", lw=0.8, ls="--", zorder=0)
    if use_log:
        log_axis(ax, "x", [lo, hi])
        log_axis(ax, "y", [lo, hi])
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal", adjustable="box")


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


# -- (3) distribution of log ratios ----------------------------------------------------------
def plot_ratio_distribution(pairs_df: pd.DataFrame, metrics=("train_loss", "val_loss"),
                            fig=None) -> Figure:
    """Histogram of log10(b/a) per dataset (rows) x metric (cols), with the median and its
    bootstrap 95% interval (fixed seed)."""
    pairs_df = _need_pairs(pairs_df)
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
            ax.axvspan(lo, hi, color="crimson", alpha=0.2, lw=0, zorder=0)  # behind the bars
            ax.axvline(med, color="crimson", lw=1.2, label="median")
            ax.set_title(f"{dataset_label(ds)} · {PRETTY[m]} (n = {lr.size} {_unit(pairs_df)})\n"
                         f"median {b}/{a} {10**med:.3g} [{10**lo:.3g}, {10**hi:.3g}]",
                         fontsize=8)
            ax.set_xlabel(f"log10({b} / {a})")
            ax.set_ylabel(_unit(pairs_df))
    handles = [Line2D([], [], color="crimson", lw=1.2, label="median"),
               Line2D([], [], color="crimson", alpha=0.3, lw=6,
                      label="bootstrap 95% interval of the median"),
               Line2D([], [], color="0.2", lw=0.8, ls="--", label=f"{b} = {a}")]
    fig.legend(handles=handles, loc="outside lower center", ncols=3)
    return fig


# -- (4) factor effects ------------------------------------------------------------------------
def _levels(s: pd.Series) -> list:
    vals = list(pd.unique(s.dropna()))
    return sorted(vals, key=lambda v: (type(v).__name__, v))


def plot_factor_effects(pairs_df: pd.DataFrame, factors=None, metrics=("train_loss", "val_loss"),
                        fig=None) -> Figure:
    """Median log10(b/a) against each swept factor, one panel per factor; colour = dataset,
    solid = validation, dashed = training loss. Error bars: percentile-bootstrap 95% interval
    of the median (fixed seed) over the pairs at that level; n pairs in each panel's title."""
    pairs_df = _need_pairs(pairs_df)
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
                lv, med, lo, hi = [], [], [], []
                for v, g in frame.groupby("f")["y"]:
                    ci = bootstrap_median_ci(g.to_numpy())
                    lv.append(v)
                    med.append(float(np.median(g)))
                    lo.append(ci[0])
                    hi.append(ci[1])
                med, lo, hi = map(np.asarray, (med, lo, hi))
                x = np.array([pos[v] for v in lv]) + off
                ax.errorbar(x, med, yerr=[med - lo, hi - med],
                            color=dataset_color(di), ls=styles.get(m, "-"), marker="o", ms=3,
                            lw=1, capsize=2, label=f"{dataset_label(ds)} {PRETTY[m]}")
        ax.axhline(0, color="0.2", lw=0.8, ls="--", zorder=0)
        ax.ticklabel_format(axis="y", useOffset=False)  # an offset label sits above the panel
        ax.set_xticks(range(len(levels)), [str(v) for v in levels])
        name = f[:-2] + f" ({a if f.endswith('_a') else b})" if f[-2:] in ("_a", "_b") else f
        n = int(pairs_df[f].notna().sum())
        ax.set_title(f"{name} (n = {n} {_unit(pairs_df)})")
        ax.set_xlabel(name)
        # Two lines: one would run past the top of a 2.6-inch panel (test_analysis checks).
        ax.set_ylabel(f"median log10\n({b}/{a})")
    for ax in list(axes.flat)[len(factors):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    # as many columns as fit the figure's width (about 2 inches a label)
    fit = max(1, int(fig.get_figwidth() // 2.0))
    fig.legend(handles, labels, loc="outside lower center", ncols=min(4, fit, max(1, len(labels))))
    return fig


# -- (5) learning curves ----------------------------------------------------------------------
def plot_learning_curves(pairs_df: pd.DataFrame, epochs_df: pd.DataFrame, rows=None,
                         fig=None) -> Figure:
    """Train (dashed) and validation (solid) loss per epoch of both twins of each chosen pair
    (`rows`: index labels of pairs_df; default all rows), one panel per pair."""
    pairs_df = _need_pairs(pairs_df)
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
    # Title each panel by the settings that tell the pairs apart (never by a hash).
    factors = [f for f in swept_factors(pairs_df) if f in chosen.columns]
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
        ax.set_title(f"{dataset_label(p['dataset'])} · {_settings(p, factors)}\n"
                     f"val loss {b}/{a} = {ratio:.3g}", fontsize=8)
        if not drawn:
            _empty_panel(ax, "no epoch records")
            continue
        log_axis(ax, "y", np.concatenate([ln.get_ydata() for ln in ax.get_lines()]))
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
    for ax in list(axes.flat)[len(chosen):]:
        ax.set_visible(False)
    _one_legend(fig, axes)
    return fig


def _one_legend(fig, axes) -> None:
    """One legend under the panels, each label once: nothing drawn over the curves."""
    seen: dict[str, object] = {}
    for ax in axes.flat:
        for h, lbl in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lbl, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside lower center",
                   ncols=min(4, len(seen)))


def _settings(p: pd.Series, factors: list[str]) -> str:
    """'layers 2, filters 8, kernel 5' from a pair row (variant columns named plainly)."""
    parts = []
    for f in factors[:5]:
        name = f[:-2] if f[-2:] in ("_a", "_b") else f
        v = p.get(f)
        if v is None or (isinstance(v, float) and np.isnan(v)):
            continue
        parts.append(f"{name} {v:g}" if isinstance(v, float) else f"{name} {v}")
    return ", ".join(parts) or "single setting"


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


# -- (8) the equivalence forest ----------------------------------------------------------------
VERDICT_COLORS = {"equivalent": "#1b7837", "equivalent but different": "#5aae61",
                  "different": "#b2182b", "inconclusive": "#8a5a00",
                  "too few settings": "0.45"}


def plot_forest(stats_df: pd.DataFrame, noise: pd.DataFrame | None = None,
                metrics=("train_loss", "val_loss"), fig=None) -> Figure:
    """One row per dataset x loss x Q bin ('all' first): the settings' mean ratio b/a with its
    t interval at the level its verdict used (thick: the Bonferroni interval of its Holm family,
    1 - 2 alpha / m; a dagger on the verdict where Holm decides and that interval does not) and
    the unadjusted 90% interval's ends (ticks), the margin band [1/(1+delta), 1+delta] (green), the
    seed-noise band exp(+-median seed-to-seed |log ratio|) of that row (hatched grey, where the
    study has repeats), and the verdict at the row's end. Log-ratio axis, ratio tick labels."""
    s = _forest_rows(stats_df, metrics)
    a, b = str(s["a"].iloc[0]), str(s["b"].iloc[0])
    n_rows = len(s)
    fig, axes = _figure(fig, 1, 1, panel=(6.4, 0.6 + 0.27 * n_rows))
    ax = axes[0, 0]
    ys = np.arange(n_rows)[::-1].astype(float)
    values = [1.0]  # every x drawn: the axis spans them all
    labels = []
    last_group = None
    for y, r in zip(ys, s.itertuples(index=False)):
        if last_group is not None and (r.dataset, r.metric) != last_group:
            ax.axhline(y + 0.5, color="0.75", lw=0.6)
        last_group = (r.dataset, r.metric)
        values += _forest_row(ax, y, r, noise)
        q = "all Q" if r.q_bin == "all" else f"Q∈{r.q_bin}"
        level = getattr(r, "ci_family_level", np.nan)
        labels.append(f"{dataset_label(r.dataset)} · {PRETTY.get(r.metric, r.metric)} · {q} "
                      f"(n = {r.n}" + (f", {100 * level:.3g} %)" if np.isfinite(level) else ")"))
    ax.axvline(1.0, color="0.2", lw=0.8, ls="--", zorder=0)
    v = np.asarray(values, float)
    v = v[np.isfinite(v) & (v > 0)]
    lo, hi = float(v.min()), float(v.max())
    pad = (hi / lo) ** 0.06
    log_axis(ax, "x", [lo / pad, hi * pad])
    ax.set_xlim(lo / pad, hi * pad)
    ax.set_ylim(-0.6, n_rows - 0.4)
    ax.set_yticks(ys, labels)
    ax.grid(False, axis="y")
    ax.tick_params(axis="y", length=0)
    holm = s["holm_only"].eq(True) if "holm_only" in s.columns else pd.Series(False, s.index)
    _verdict_labels(ax, ys, list(s["verdict"]), [v + (" †" if h else "")
                                                  for v, h in zip(s["verdict"], holm)])
    ax.set_xlabel(f"ratio {b}/{a} of the loss\n(settings' mean log ratio; log axis)")
    family = "ci_family_level" in s.columns
    handles = [Line2D([], [], color="0.2", lw=3.2, label="interval at the verdict's level"
                      if family else "90% interval"),
               Line2D([], [], color="0.2", lw=0, marker="|", ms=9, mew=1.2,
                      label="90% interval (unadjusted)") if family else
               Line2D([], [], color="0.2", lw=1.0, label="95% interval"),
               Patch(color="#1b7837", alpha=0.25, label="margin"),
               Patch(facecolor="none", edgecolor="0.45", hatch="////",
                     label="seed noise (median)")]
    if holm.any():
        handles.append(Line2D([], [], lw=0, label="† Holm decides, Bonferroni does not"))
    fig.legend(handles=handles, loc="outside lower center", ncols=2)
    return fig


def _forest_rows(stats_df: pd.DataFrame, metrics) -> pd.DataFrame:
    """The stats rows of these losses with settings, by dataset, loss, then Q bin ('all'
    first); NothingToPlot when there are none."""
    if stats_df is None or stats_df.empty:
        raise NothingToPlot("no statistics (no complete pairs of two different networks)")
    s = stats_df[stats_df["metric"].isin(metrics) & (stats_df["n"] > 0)].copy()
    if s.empty:
        raise NothingToPlot("no statistics of these losses")
    order_q = {q: i for i, q in enumerate(("all", *Q_LABELS))}
    order_d = {d: i for i, d in enumerate(dataset_order(s["dataset"]))}
    order_m = {m: i for i, m in enumerate(metrics)}
    return s.assign(_d=s["dataset"].map(order_d), _m=s["metric"].map(order_m),
                    _q=s["q_bin"].map(order_q)).sort_values(["_d", "_m", "_q"], kind="stable")


def _forest_row(ax, y: float, r, noise: pd.DataFrame | None) -> list[float]:
    """One stats row at height y: margin band, seed-noise band, intervals and the ratio; the
    x values it drew."""
    lo_m, hi_m = 1 / (1 + r.margin), 1 + r.margin
    ax.fill_betweenx([y - 0.42, y + 0.42], lo_m, hi_m, color="#1b7837", alpha=0.13, lw=0)
    values = [lo_m, hi_m]
    med = noise_of(noise, r.dataset, r.q_bin, r.metric)
    if np.isfinite(med) and med > 0:
        ax.fill_betweenx([y - 0.22, y + 0.22], np.exp(-med), np.exp(med), facecolor="none",
                         edgecolor="0.45", hatch="////", lw=0.0)
        values += [np.exp(-med), np.exp(med)]
    if np.isfinite(r.ratio):
        color = VERDICT_COLORS.get(r.verdict, "0.2")
        lo, hi = (getattr(r, "ratio_ci_family_low", np.nan),
                  getattr(r, "ratio_ci_family_high", np.nan))
        if np.isfinite(lo) and np.isfinite(r.ratio_ci90_low):
            ax.plot([lo, hi], [y, y], color=color, lw=3.2, solid_capstyle="butt")
            ax.plot([r.ratio_ci90_low, r.ratio_ci90_high], [y, y], "|", color="0.15", ms=9,
                    mew=1.2, zorder=3)
            values += [lo, hi]
        elif np.isfinite(r.ratio_ci95_low):  # a stats table from before the families
            ax.plot([r.ratio_ci95_low, r.ratio_ci95_high], [y, y], color=color, lw=1.0)
            ax.plot([r.ratio_ci90_low, r.ratio_ci90_high], [y, y], color=color, lw=3.2,
                    solid_capstyle="butt")
            values += [r.ratio_ci95_low, r.ratio_ci95_high]
        ax.plot([r.ratio], [y], "o", color=color, ms=4.5, mec="white", mew=0.6, zorder=3)
        values.append(r.ratio)
    return values


def _verdict_labels(ax, ys, verdicts: list[str], labels: list[str] | None = None) -> None:
    """The verdicts as right-hand tick labels (`labels`, default the verdicts) in their
    verdicts' colours: the layout makes room."""
    right = ax.twinx()
    right.set_ylim(ax.get_ylim())
    right.set_yticks(ys, labels or verdicts)
    right.tick_params(axis="y", length=0)
    for t, vd in zip(right.get_yticklabels(), verdicts):
        t.set_color(VERDICT_COLORS.get(vd, "0.2"))
    right.grid(False)
    for sp in right.spines.values():
        sp.set_visible(False)


# -- (9) seed noise against the architecture effect ------------------------------------------
def plot_seed_noise(seed_pairs_df: pd.DataFrame, pairs_df: pd.DataFrame,
                    metrics=("train_loss", "val_loss"), fig=None) -> Figure:
    """Per dataset (rows) x loss (columns), on one log-ratio axis: the ratio exp(|log r|) between
    two seeds of one network (each architecture), and between the two architectures at one
    setting and seed (the architecture effect measured the same way). Boxes: quartiles and
    median; whiskers: 5th-95th percentile."""
    if seed_pairs_df is None or seed_pairs_df.empty:
        raise NothingToPlot("one seed per setting: no seed noise to measure (add "
                            "seed = [0, 1] to [grid])")
    pairs_df = _need_pairs(pairs_df)
    a, b = _names(pairs_df)
    datasets = dataset_order(seed_pairs_df["dataset"])
    fig, axes = _figure(fig, len(datasets), len(metrics), panel=(3.6, 2.2))
    for r, ds in enumerate(datasets):
        for c, m in enumerate(metrics):
            ax = axes[r, c]
            rows, names = [], []
            for arch in (a, b):
                g = seed_pairs_df[(seed_pairs_df["dataset"] == ds) & (seed_pairs_df["metric"] == m)
                                  & (seed_pairs_df["architecture"] == arch)]
                rows.append(np.exp(g["abs_log_ratio"].to_numpy(float)))
                names.append(f"re-seeding {arch}\n(n = {len(g)} seed pairs)")
            ratio = pairs_df.loc[pairs_df["dataset"] == ds, m + "_ratio"].to_numpy(float)
            ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
            rows.append(np.exp(np.abs(np.log(ratio))))
            names.append(f"{a} → {b}\n(n = {ratio.size} pairs)")
            keep = [i for i, x in enumerate(rows) if x.size]
            ax.set_title(f"{dataset_label(ds)} · {PRETTY[m]}")
            if not keep:
                _empty_panel(ax)
                continue
            colors = [arch_color(a), arch_color(b), "0.3"]
            bp = ax.boxplot([rows[i] for i in keep], orientation="horizontal", whis=(5, 95),
                            showfliers=False, widths=0.55, patch_artist=True,
                            medianprops={"color": "black", "lw": 1.2})
            for patch, i in zip(bp["boxes"], keep):
                patch.set_facecolor(colors[i])
                patch.set_alpha(0.45)
            ax.set_yticks(range(1, len(keep) + 1), [names[i] for i in keep], fontsize=7)
            allv = np.concatenate([rows[i] for i in keep])
            hi = float(np.percentile(allv, 99)) if allv.size else 1.1
            hi = max(hi, 1.01)
            log_axis(ax, "x", [1.0, hi * 1.05])
            ax.set_xlim(1.0, hi * 1.05)
            ax.set_xlabel("loss ratio, larger / smaller (log axis)")
            ax.grid(False, axis="y")
    return fig


# -- (10) training time ------------------------------------------------------------------------
def plot_time_ratio(stats_df: pd.DataFrame, fig=None) -> Figure:
    """Per dataset and Q bin ('all' first): the median over settings of the ratio b/a of
    training time per epoch, with its percentile-bootstrap 95% interval; log-ratio axis."""
    s = stats_df[stats_df["metric"] == TIME_METRIC] if stats_df is not None and len(stats_df) else None
    if s is None or s.empty:
        raise NothingToPlot("no epoch recorded its training time (train_s): a store from "
                            "before it, or no complete pairs")
    a, b = str(s["a"].iloc[0]), str(s["b"].iloc[0])
    order_q = {q: i for i, q in enumerate(("all", *Q_LABELS))}
    order_d = {d: i for i, d in enumerate(dataset_order(s["dataset"]))}
    s = s.assign(_d=s["dataset"].map(order_d), _q=s["q_bin"].map(order_q)).sort_values(
        ["_d", "_q"], kind="stable")
    fig, axes = _figure(fig, 1, 1, panel=(5.2, 0.7 + 0.27 * len(s)))
    ax = axes[0, 0]
    ys = np.arange(len(s))[::-1].astype(float)
    vals = [1.0]
    labels = []
    for y, r in zip(ys, s.itertuples(index=False)):
        ax.plot([r.ratio_ci_low, r.ratio_ci_high], [y, y], color=arch_color(b), lw=2.4,
                solid_capstyle="butt")
        ax.plot([r.median_ratio], [y], "o", color=arch_color(b), ms=4.5, mec="white", mew=0.6)
        vals += [r.ratio_ci_low, r.ratio_ci_high, r.median_ratio]
        q = "all Q" if r.q_bin == "all" else f"Q∈{r.q_bin}"
        labels.append(f"{dataset_label(r.dataset)} · {q} (n = {r.n})")
    ax.axvline(1.0, color="0.2", lw=0.8, ls="--", zorder=0)
    v = np.asarray(vals, float)
    v = v[np.isfinite(v) & (v > 0)]
    pad = (v.max() / v.min()) ** 0.08 if v.max() > v.min() else 1.1
    log_axis(ax, "x", [v.min() / pad, v.max() * pad])
    ax.set_xlim(v.min() / pad, v.max() * pad)
    ax.set_ylim(-0.6, len(s) - 0.4)
    ax.set_yticks(ys, labels)
    ax.grid(False, axis="y")
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel(f"training time per epoch, {b}/{a}\n(median over settings; log axis)")
    return fig


# -- every figure of an analysis -------------------------------------------------------------


@dataclass
class Drawn:
    """The figures drawn from one Analysis, in memory (nothing saved yet)."""
    figures: dict[str, Figure] = field(default_factory=dict)  # stem -> figure, in FIGURES order
    notes: list[str] = field(default_factory=list)  # why any figure was skipped, in that order
    skipped: list[str] = field(default_factory=list)  # stems tried and not drawn


def draw_figures(res: Analysis) -> Drawn:
    """Draw every figure `res` wants (in the report's style; the lesion figure styles itself)."""
    drawers = {
        "forest": lambda: plot_forest(res.stats, res.noise),
        "seed_noise": lambda: plot_seed_noise(res.seed_pairs, res.pairs),
        "train_time": lambda: plot_time_ratio(res.stats),
        "equivalence_loss": lambda: plot_equivalence(res.settings, ("train_loss", "val_loss")),
        "table2": lambda: plot_table2(res.table2),
        "ratio_distribution": lambda: plot_ratio_distribution(res.settings),
        "factor_effects": lambda: plot_factor_effects(res.settings),
        "learning_curves": lambda: plot_learning_curves(res.pairs, res.curves.epochs,
                                                        res.curves.rows),
        "equivalence_accuracy": lambda: plot_equivalence(res.settings, ("val_acc", "test_acc")),
        "zoo": lambda: plot_zoo(res.trials),
    }
    drawn = Drawn()
    with mpl.rc_context(STYLE):
        for stem, draw in drawers.items():
            if stem == "train_time" and not (res.stats["metric"] == TIME_METRIC).any():
                continue  # a store from before epochs timed their training pass: no note
            _draw(drawn, res, stem, draw)
    if "lesions" in res.figure_notes:  # a lesions table was there to read
        _draw(drawn, res, "lesions", lambda: draw_lesions(res.lesions))
    return drawn


# The figures whose input analyse read from the store apart (None: it could not, see notes).
_READ_APART = {"learning_curves": lambda res: res.curves, "lesions": lambda res: res.lesions}


def _draw(drawn: Drawn, res: Analysis, stem: str, draw) -> None:
    """One figure, if wanted: its input's notes first, then the figure or why it is skipped."""
    if stem not in res.wanted:
        return
    drawn.notes += res.figure_notes.get(stem, [])
    unread = stem in _READ_APART and _READ_APART[stem](res) is None
    fig = None if unread else guarded(stem, drawn.notes, draw)
    if fig is None:
        drawn.skipped.append(stem)
    else:
        drawn.figures[stem] = fig


def draw_lesions(table: pd.DataFrame) -> Figure:
    """The lesion figure of a lesions table; NothingToPlot when it holds no lesion rows."""
    try:
        return plot_lesions(table)
    except ValueError as e:  # only intact rows, or an empty table
        raise NothingToPlot(str(e)) from None
