"""Layer 3a: load once, style once, draw every figure, save PNG + PDF (+ tables) to DIR/figures."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import matplotlib as mpl
import pandas as pd

from study.atomic import atomic_write
from study.store import ReadReport, Store, atomic_write_text

from . import data as _data
from . import plots
from ._common import AnalysisError, NothingToPlot, check_compare, check_store
from .lesions import plot_lesions
from .stats import stats as _stats

# stem -> one-line caption: what each mark, bar and band is ({a}, {b}: the architectures,
# {n}: complete pairs that compare two different networks, {cells}: finished cells).
FIGURES = {
    "equivalence_loss": "Final train and validation loss of {b} (y) against {a} (x), one dot per "
                        "pair of cells with equal settings (n = {n} pairs), colour = Q bin; "
                        "dashed: y = x; panel titles: median ratio {b}/{a} and the pairs {b} "
                        "wins. Log-log axes.",
    "table2": "Table 2 as a figure: mean train and validation loss per architecture (rows) and "
              "Q bin (columns); each cell gives the mean and n, the number of finished cells "
              "averaged; one log colour scale per dataset; grey '–': no cell in that bin.",
    "ratio_distribution": "Histogram of log10({b}/{a}) of the final loss over n = {n} pairs; "
                          "red line: median, red band: its percentile-bootstrap 95% interval "
                          "(2,000 resamples); dashed: equal loss.",
    "factor_effects": "Median log10({b}/{a}) loss ratio at each value of each swept grid axis; "
                      "error bars: percentile-bootstrap 95% interval of that median over the "
                      "pairs at that value (n = {n} pairs in all); dashed: equal loss.",
    "learning_curves": "Learning curves of the pairs with the largest, smallest and median "
                       "validation-loss ratio: train (dashed) and validation (solid) loss per "
                       "epoch, {a} and {b} in their colours; log loss axis.",
    "equivalence_accuracy": "Final validation and test accuracy of {b} (y) against {a} (x), one "
                            "dot per pair (n = {n} pairs), colour = Q bin; dashed: y = x. "
                            "Linear axes.",
    "zoo": "Final validation loss against parameter count of every finished cell (n = {cells}), "
           "colour = architecture (cells per architecture in the legend); log-log axes.",
    "lesions": "Lesions (drawn when `study lesion` has written lesions/lesions.parquet): rise of "
               "the validation loss when block i of a saved network is removed (left) or blocks "
               "i and i+1 are swapped (right), by block position, one row per depth in blocks; "
               "each point the mean over a variant's cells; symmetric log axis.",
}
LESIONS_TABLE = Path("lesions") / "lesions.parquet"  # under DIR, written by study.lesion
LESIONS_SAVE = {"dpi": 150, "bbox_inches": "tight"}  # its legend sits outside the axes
class FigureResult(list):
    """The paths written (a list of Path), with `.notes`: why any figure was skipped."""

    def __init__(self, paths=(), notes=()):
        super().__init__(paths)
        self.notes = list(notes)


@dataclass
class Analysis:
    """Everything one run computed; the report layer renders it."""
    root: Path
    a: str
    b: str
    trials: pd.DataFrame
    pairs: pd.DataFrame  # evidence: pairs of two different networks
    table2: pd.DataFrame
    stats: pd.DataFrame
    bad_parts: list[str]
    notes: list[str] = field(default_factory=list)
    all_pairs: pd.DataFrame | None = None  # evidence and same-network controls
    controls: dict = field(default_factory=dict)  # data.control_summary
    table2_acc: pd.DataFrame | None = None
    pngs: dict[str, Path] = field(default_factory=dict)  # stem -> PNG written
    files: list[Path] = field(default_factory=list)


def _write(path: Path, text: str) -> Path:
    try:
        atomic_write_text(path, text)
    except Exception as e:  # StoreError carries a one-line message already
        raise AnalysisError(str(e)) from None
    return path


def _save(fig, out_dir: Path, stem: str, **savefig_kw) -> list[Path]:
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    for p in paths:
        try:
            atomic_write(p, lambda tmp: fig.savefig(tmp, format=p.suffix[1:], **savefig_kw))
        except OSError as e:
            raise AnalysisError(f"cannot write {p}: {e.strerror or e}") from None
    return paths


def analyse(root: str | Path, compare=("sequential", "parallel"),
            pairs: Iterable[str] | None = None, only: Iterable[str] | None = None) -> Analysis:
    """Load the store, compute pairs / Table 2 / statistics and write the figures (all, or
    the stems in `only`)."""
    root = check_store(root)
    if isinstance(compare, str) or len(compare) != 2:
        raise AnalysisError(f"compare takes two architectures (a, b), got {compare!r}")
    a, b = compare
    check_compare(a, b)
    out_dir = Store(root).figures_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AnalysisError(f"cannot create {out_dir}: {e.strerror or e}") from None

    report = ReadReport()
    df = _data.load(root, report)
    all_pairs = _data.pairs(df, a, b)
    # Same-network pairs are controls, not evidence: out of every statistic and pair figure.
    pdf = _data.evidence(all_pairs)
    t2 = _data.table2(df)
    res = Analysis(root=root, a=a, b=b, trials=df, pairs=pdf, table2=t2,
                   stats=_stats(pdf), bad_parts=list(report.bad_parts), all_pairs=all_pairs,
                   controls=_data.control_summary(all_pairs),
                   table2_acc=_data.table2(df, ("train_acc", "val_acc")))
    notes = res.notes
    ctl = res.controls
    if ctl["n"] and ctl["identical"] < ctl["n"]:
        notes.append(f"{ctl['n'] - ctl['identical']} of {ctl['n']} same-network {a}/{b} pairs "
                     "differ although both sides are one network: the pairing or the run is "
                     "broken (pairs " + ", ".join(k[:8] for k in ctl["differing"][:5]) + ")")
    notes += [f"unreadable part skipped (left in place): {x}" for x in report.bad_parts]
    ok = df[df["status"] == "ok"]
    for arch in (a, b):
        if not (ok["architecture"] == arch).any():
            notes.append(f"no finished (status ok) {arch} cell in the store")

    wanted = set(FIGURES) if only is None else {only} if isinstance(only, str) else set(only)
    unknown = wanted - set(FIGURES)
    if unknown:
        raise AnalysisError(f"unknown figure {sorted(unknown)[0]!r}; figures: " + ", ".join(FIGURES))

    def job(stem: str, draw: Callable, **savefig_kw):
        if stem not in wanted:
            return
        try:
            fig = draw()
        except AnalysisError as e:
            if not isinstance(e, NothingToPlot):
                raise
            notes.append(f"{stem}: skipped, {e}")
            fig = None
        except Exception as e:  # a bug in one figure must not cost the others
            notes.append(f"{stem}: could not be drawn ({type(e).__name__}: {e})")
            fig = None
        if fig is None:
            for ext in ("png", "pdf"):  # a stale figure from an earlier run would mislead
                (out_dir / f"{stem}.{ext}").unlink(missing_ok=True)
            return
        paths = _save(fig, out_dir, stem, **savefig_kw)
        res.pngs[stem] = paths[0]
        res.files.extend(paths)

    with mpl.rc_context(plots.STYLE):
        job("equivalence_loss", lambda: plots.plot_equivalence(pdf, ("train_loss", "val_loss")))
        job("table2", lambda: plots.plot_table2(t2))
        job("ratio_distribution", lambda: plots.plot_ratio_distribution(pdf))
        job("factor_effects", lambda: plots.plot_factor_effects(pdf))
        job("learning_curves", lambda: _curves(root, pdf, pairs, notes))
        job("equivalence_accuracy", lambda: plots.plot_equivalence(pdf, ("val_acc", "test_acc")))
        job("zoo", lambda: plots.plot_zoo(df))
    if (root / LESIONS_TABLE).is_file():  # no lesion study, no figure and no note
        # outside plots.STYLE: the lesion figure styles itself
        job("lesions", lambda: _lesions(root), **LESIONS_SAVE)

    if t2.empty:
        notes.append("table2.csv/.md: skipped, no finished (status ok) cell with a known Q")
    else:
        res.files.append(_write(out_dir / "table2.csv", t2.to_csv(index=False)))
        res.files.append(_write(out_dir / "table2.md", _data.table2_markdown(t2)))
    if res.stats.empty:
        notes.append(f"stats.csv: skipped, no complete {a}/{b} pairs")
    else:
        res.files.append(_write(out_dir / "stats.csv", res.stats.to_csv(index=False)))
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    body = "\n".join(f"- {n}" for n in notes) if notes else "(none: every figure was drawn)"
    res.files.append(_write(out_dir / "NOTES.txt",
                            f"write_figures {a} vs {b} at {stamp}\n{body}\n"))
    return res


def _curves(root: Path, pdf: pd.DataFrame, keys, notes: list[str]):
    if pdf.empty:
        raise NothingToPlot("no complete pairs (both twins finished with status ok)")
    if keys:
        rows, unknown = _data.resolve_pair_keys(pdf, keys)
        if unknown:
            notes.append("learning_curves: no complete pair with key " + ", ".join(unknown))
        if not rows:
            raise NothingToPlot("none of the requested pair keys names a complete pair")
    else:
        rows = _data.choose_curve_pairs(pdf, Store.part_ids(Store(root).epochs_dir, live=True))
        if not rows:
            raise NothingToPlot("no complete pair has epoch records for both twins")
    chosen = pdf.loc[rows]
    report = ReadReport()
    ep = _data.load_epochs(root, list(chosen["cell_id_a"]) + list(chosen["cell_id_b"]), report)
    notes += [f"learning_curves: unreadable part skipped: {x}" for x in report.bad_parts]
    return plots.plot_learning_curves(pdf, ep, rows)


def _lesions(root: Path):
    df = pd.read_parquet(root / LESIONS_TABLE)
    try:
        return plot_lesions(df)
    except ValueError as e:  # only intact rows, or an empty table
        raise NothingToPlot(str(e)) from None


def write_lesion_figure(root: str | Path) -> list[Path]:
    """Draw DIR/figures/lesions.png and .pdf from DIR/lesions/lesions.parquet alone (what
    `study lesion` does after computing the table; write_figures and the report draw it too).
    Raises AnalysisError when there is no lesions table."""
    root = Path(root)
    if not (root / LESIONS_TABLE).is_file():
        raise AnalysisError(f"{root / LESIONS_TABLE} does not exist; run `study lesion {root}` "
                            "first (on a study run with save_weights = true)")
    out_dir = Store(root).figures_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AnalysisError(f"cannot create {out_dir}: {e.strerror or e}") from None
    return _save(_lesions(root), out_dir, "lesions", **LESIONS_SAVE)


def write_figures(root: str | Path, compare=("sequential", "parallel"),
                  pairs: Iterable[str] | None = None, only: Iterable[str] | None = None
                  ) -> list[Path]:
    """Write every figure (PNG + PDF), table2.csv/.md, stats.csv and NOTES.txt to DIR/figures.

    `compare` = (a, b): the architectures set against each other (a on x, b on y; ratios are
    b / a). `pairs`: pair_keys (or unique prefixes) for the learning-curve figure; default the
    pairs with the largest, smallest and median validation-loss ratio. A figure that cannot be
    drawn is skipped with a line in NOTES.txt (also on the result's `.notes`). `only`: draw
    just these figures (stems of FIGURES, e.g. ["learning_curves"]); tables always. Raises
    AnalysisError for a folder that is not a results store or an unknown architecture.
    """
    res = analyse(root, compare, pairs, only)
    return FigureResult(res.files, res.notes)
