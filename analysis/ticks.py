"""Labelled ticks on a log axis: at least two readable values on any range, labels that never
repeat or overlap, unlabelled minor ticks between (`log_axis`; `log_colorbar` for a colour
scale). Matplotlib's own log ticks label only decades, so a loss range of a few per cent
would carry no label at all.
"""
from __future__ import annotations

import matplotlib as mpl
import numpy as np
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import FixedFormatter, FixedLocator, LogLocator, NullFormatter


def log_axis(ax, which: str = "y", values=None) -> None:
    """Make an axis logarithmic with labelled ticks taken from `values` (the data or the
    limits), unlabelled minor ticks between."""
    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    v = np.asarray([] if values is None else values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo * 1.000001:
        lo, hi = lo / 1.05, hi * 1.05
    ticks = _ticks(lo, hi, fits=_labels_fit(ax, lo, hi) if which == "x" else None)
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FixedFormatter(_labels(ticks)))
    axis.set_minor_locator(LogLocator(base=10, subs=tuple(np.arange(2, 10.0)), numticks=12))
    axis.set_minor_formatter(NullFormatter())


def log_colorbar(cb, lo: float, hi: float) -> None:
    """The same labelled ticks on a colour bar's log scale [lo, hi], without minor ticks."""
    ticks = _ticks(lo, hi)
    cb.set_ticks(ticks, labels=_labels(ticks))
    cb.ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(), numticks=1))
    cb.ax.yaxis.set_minor_formatter(NullFormatter())


def _labels(ticks) -> list[str]:
    """Plain labels with just enough significant digits that no two are equal (1k, 20k, 1M
    for counts)."""
    if len(ticks) and min(ticks) >= 1000 and all(float(t).is_integer() for t in ticks):
        labels = [_si(t) for t in ticks]
        if len(set(labels)) == len(labels):
            return labels
    for d in range(2, 8):
        labels = [f"{t:.{d}g}" for t in ticks]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{t:.8g}" for t in ticks]


def _si(t: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if t >= div:
            return f"{t / div:g}{suffix}"
    return f"{t:g}"


def _ticks(lo: float, hi: float, most: int = 6, fits=None) -> list[float]:
    """Two to `most` tick values in [lo, hi]: 1-2-5 steps (finer on a short range), else
    evenly spaced values rounded to the fewest digits that keep them apart. `fits(ticks)`, if
    given, says whether their labels fit side by side (a horizontal axis): 1-2-5 steps whose
    labels would overlap give way to decades."""
    if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi):
        return [lo] if np.isfinite(lo) and lo > 0 else []
    fits = fits or (lambda ticks: True)
    for subs in ((1.0, 2.0, 5.0), (1.0,), tuple(np.arange(1, 10.0))):
        ticks = [m * 10.0 ** k for k in range(int(np.floor(np.log10(lo))) - 1,
                                                  int(np.ceil(np.log10(hi))) + 1)
                 for m in subs if lo <= m * 10.0 ** k <= hi]
        if 2 <= len(ticks) <= most and fits(ticks):
            return ticks
        if len(ticks) >= 2 and subs == (1.0,):
            step = -(-len(ticks) // most)
            while step < len(ticks) and not fits(ticks[::step]):
                step += 1
            if step < len(ticks):
                return ticks[::step]
    inner = np.geomspace(lo, hi, 4)[1:-1]  # two, away from the edges: labels never collide
    for d in range(1, 8):
        ticks = sorted({float(f"{v:.{d}g}") for v in inner})
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) >= 2:
            return ticks
    return list(inner)


def _labels_fit(ax, lo: float, hi: float):
    """For a horizontal log axis spanning [lo, hi]: whether tick labels fit side by side,
    from the axis's width and the tick font (labels about 0.6 em per character)."""
    width_in = ax.get_position().width * ax.figure.get_figwidth()
    em_in = FontProperties(size=mpl.rcParams["xtick.labelsize"]).get_size_in_points() / 72
    span = np.log10(hi / lo)

    def fits(ticks) -> bool:
        labels = _labels(ticks)
        x = [np.log10(t / lo) / span * width_in for t in ticks]
        return all(b - a >= 0.6 * em_in * (len(la) + len(lb)) / 2 + 0.5 * em_in
                   for a, b, la, lb in zip(x, x[1:], labels, labels[1:]))
    return fits
