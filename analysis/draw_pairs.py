"""The figures of twin pairs (or settings): b against a (equivalence scatter), the distribution
of log ratios, the ratio against each swept factor, and both twins' learning curves."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ._common import HIGHER_IS_BETTER, PRETTY, Q_LABELS, NothingToPlot, dataset_label, dataset_order
from .draw_base import (NO_Q_COLOR, Q_COLORS, _empty_panel, _figure, _names, _need_pairs, _unit,
                        arch_color, dataset_color)
from .frames import swept_factors
from .stats import bootstrap_median_ci
from .ticks import log_axis


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
