"""Analysis of a study's results store: tables, statistics, figures and an HTML report.

Never imports torch or ray: it reads the Parquet store through `study.store` / `study.schema`
and the spec through `sweep`, so it runs anywhere pandas and matplotlib do.

Three layers (as in rliable):

1. Data and statistics on DataFrames (pure, nothing written):
   ``load(DIR, report=None)``        every trial row (all statuses) plus ``q`` =
                                      n_train * n_classes / n_params and ``q_bin`` (ordered
                                      categorical "[0,1)", "[1,3)", "[3,10)", "[10,inf)");
   ``load_epochs(DIR, cell_ids=None, report=None)``  per-epoch rows;
   ``live_files(DIR, table="trials")``  the files to hand to DuckDB / Polars / pandas / pyarrow
                                      to read a running study: each cell once, no file
                                      vanishing under the read (both loaders read them too);
   ``pairs(df, a="sequential", b="parallel")``  one row per twin pair, status ok only: shared
                                      grid params unsuffixed, per-side columns suffixed ``_a``
                                      / ``_b`` (cell_id, n_params, losses, accuracies, variant
                                      params such as gate_b, ``variant_b``), ``<metric>_ratio``
                                      = b/a and ``<metric>_diff`` = b-a, ``q``/``q_bin`` of a;
                                      a cell paired with several variants gives a row each;
                                      ``same_network``: one network on both sides (sweep.same_network
                                      rule or the same_network_as marker);
   ``evidence(pairs_df)`` / ``controls(pairs_df)``  the pairs of two different networks / the
                                      same-network pairs; ``control_summary`` counts how many
                                      controls came out identical (statistics and pair figures
                                      use the evidence only);
   ``table2(df)``                    mean train/val loss per dataset x architecture x Q bin
                                      (``table2_wide``/``table2_markdown``: the paper's layout);
   ``settings(pairs_df)``            one row per setting (the unit of evidence): the pairs
                                      that differ only in seed averaged (mean log ratio b/a,
                                      geometric-mean losses, ``n_seeds``);
   ``seed_noise(df)`` / ``seed_pairs(df)``  seed-to-seed |log loss ratio| of cells that differ
                                      only in seed, per dataset x Q bin x architecture x
                                      metric (median, 90th percentile) / one row per seed pair;
   ``arch_effect(pairs_df)``         |log(b/a)| of each pair measured the same way;
   ``stats(pairs_or_settings, margin=0.1, noise=None)``  per dataset and dataset x Q bin,
                                      train and val loss, on settings: the ratio with 90/95 %
                                      t intervals, TOST against the margin and a two-sided
                                      t-test (Holm-adjusted per family), Lakens' verdict, and
                                      rank-based counterparts (median ratio with bootstrap CI,
                                      win rate with Wilson CI, Wilcoxon); ``equivalence(...)``
                                      its equivalence columns; ``margin="seed"`` takes the
                                      margin from ``noise`` (a seed_noise table);
                                      ``family``: Holm runs within the primary family
                                      (headline rows) and per dataset x loss over the bins;
   ``variance_components(pairs_df)`` sigma2_between / sigma2_within of the log ratio per
                                      dataset x Q bin x loss, with 80 % upper limits;
   ``power(n, sigma2_between, sigma2_within, seeds, margin, ratio=1, alpha=0.05)`` the
                                      power of the paired TOST (exact, Owen's Q integral).
2. Figures, one function per figure, each returning a matplotlib Figure (``fig=None``):
   ``plot_equivalence``, ``plot_table2``, ``plot_ratio_distribution``,
   ``plot_factor_effects``, ``plot_learning_curves``, ``plot_zoo``, ``plot_forest``,
   ``plot_seed_noise`` (module ``analysis.draw``, which re-exports them from ``draw_pairs``,
   ``draw_cells`` and ``draw_verdicts`` on the style and helpers of ``draw_base``; log ticks
   in ``analysis.ticks``);
   ``plot_lesions`` (module ``analysis.lesion_figure``) from the table `study lesion` computes.
3. Outputs: ``write_figures(DIR, compare=("sequential", "parallel"), pairs=None) -> list[Path]``
   writes DIR/figures/*.png + *.pdf (the lesion figure too when DIR/lesions/lesions.parquet
   exists), table2.csv/.md, stats.csv and NOTES.txt (why any figure was skipped; also on the
   returned list's ``.notes``); ``write_lesion_figure(DIR)`` draws the lesion figure alone;
   ``write_report(DIR, compare) -> Path`` writes DIR/report.html, self-contained (figures
   inlined as base64 PNG). Both run the same three steps: ``compute.analyse`` computes an
   ``Analysis`` (the frames and statistics), ``draw.draw_figures`` draws it in memory and
   ``write.write_outputs`` saves it (module ``analysis.write``); ``report.render`` embeds the
   PNGs that were saved, never reading them back (its table sections in
   ``analysis.report_sections``).

Both writers raise ``AnalysisError`` (one-line message) for a folder that is not a results
store or an unknown architecture; a figure that cannot be drawn is a note, never a crash.
"""
from ._common import Q_LABELS, AnalysisError, NothingToPlot, add_q
from .draw import (plot_equivalence, plot_factor_effects, plot_forest, plot_learning_curves,
                   plot_ratio_distribution, plot_seed_noise, plot_table2, plot_time_ratio,
                   plot_zoo)
from .frames import (control_summary, controls, evidence, live_files, load, load_epochs,
                     network_ids, pairs, settings, swept_factors, table2, table2_markdown,
                     table2_wide, train_time)
from .lesion_figure import plot_lesions
from .report import write_report
from .power import power
from .variance import variance_components
from .stats import (arch_effect, bootstrap_median_ci, equivalence, seed_noise, seed_pairs, stats,
                    wilson_interval)
from .write import FigureResult, write_figures, write_lesion_figure
from sweep.spec import DEFAULT_MARGIN

__all__ = ["AnalysisError", "NothingToPlot", "Q_LABELS", "add_q", "load", "load_epochs",
           "live_files", "pairs", "evidence", "controls", "control_summary", "network_ids",
           "settings", "swept_factors", "table2", "table2_wide", "table2_markdown", "stats",
           "equivalence", "seed_noise", "seed_pairs", "arch_effect", "DEFAULT_MARGIN",
           "wilson_interval", "bootstrap_median_ci", "plot_equivalence", "plot_table2",
           "plot_ratio_distribution", "plot_factor_effects", "plot_learning_curves", "plot_zoo",
           "plot_forest", "plot_seed_noise", "plot_time_ratio", "train_time",
           "plot_lesions", "write_figures", "write_lesion_figure", "FigureResult", "write_report",
           "power", "variance_components"]
