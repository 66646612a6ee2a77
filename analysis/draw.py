"""Layer 2: one function per figure. Each takes DataFrames (and `fig=None`), returns the Figure;
`draw_figures` draws every figure of an Analysis (compute.analyse) in memory.

The figure functions live in draw_pairs (pair figures), draw_cells (Table 2, the zoo) and
draw_verdicts (forest, seed noise, training time), on the shared style and helpers of
draw_base; they are re-exported here, where callers import them from.
A figure that cannot be drawn from the data raises NothingToPlot with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import matplotlib as mpl
import pandas as pd
from matplotlib.figure import Figure

from ._common import NothingToPlot, guarded
from .compute import Analysis
from .draw_base import AXIS_RULE, NO_Q_COLOR, Q_COLORS, STYLE, arch_color, dataset_color
from .draw_cells import plot_table2, plot_zoo
from .draw_pairs import (plot_equivalence, plot_factor_effects, plot_learning_curves,
                         plot_ratio_distribution)
from .draw_verdicts import VERDICT_COLORS, plot_forest, plot_seed_noise, plot_time_ratio
from .lesion_figure import plot_lesions
from .stats import TIME_METRIC

__all__ = ["AXIS_RULE", "STYLE", "Q_COLORS", "NO_Q_COLOR", "VERDICT_COLORS", "arch_color",
           "dataset_color", "plot_equivalence", "plot_table2", "plot_ratio_distribution",
           "plot_factor_effects", "plot_learning_curves", "plot_zoo", "plot_forest",
           "plot_seed_noise", "plot_time_ratio", "plot_lesions", "Drawn", "draw_figures",
           "draw_lesions"]


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
