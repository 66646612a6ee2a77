"""The figures of the statistics: the equivalence forest (each row's ratio, intervals, margin
and verdict), seed noise against the architecture effect, and the training-time ratio."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ._common import PRETTY, Q_LABELS, NothingToPlot, dataset_label, dataset_order
from .draw_base import _empty_panel, _figure, _names, _need_pairs, arch_color
from .stats import TIME_METRIC, noise_of
from .ticks import log_axis


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
