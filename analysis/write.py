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
from .stats import seed_noise as _seed_noise
from .stats import seed_pairs as _seed_pairs
from .stats import stats as _stats
from sweep import SpecError, parse_spec
from sweep.spec import DEFAULT_MARGIN, SEED_MARGIN, parse_margin

# stem -> one-line caption: what each mark, bar and band is ({a}, {b}: the architectures,
# {n}: complete pairs that compare two different networks, {cells}: finished cells).
FIGURES = {
    "forest": "Equivalence of {b} and {a}: per dataset, loss and Q bin, the ratio {b}/{a} of the "
              "loss (exp of the settings' mean log ratio; n = settings), its 90% (thick) and "
              "95% (thin) t intervals, the margin {margin} (green band), the seed noise "
              "(hatched: median ratio between two seeds of one network, where the study has "
              "repeats) and the verdict (two one-sided t-tests and a two-sided t-test, "
              "Holm-adjusted, at 0.05). Log-ratio axis.",
    "seed_noise": "Seed noise against the architecture effect, on one log-ratio axis: the loss "
                  "ratio (larger/smaller) between two seeds of one network of {a} and of {b}, "
                  "and between {a} and {b} at one setting and seed; boxes: quartiles and median, "
                  "whiskers: 5th to 95th percentile.",
    "train_time": "Training time per epoch (the training pass alone, median over a cell's "
                  "epochs), {b}/{a}: per dataset and Q bin the median over settings of the "
                  "ratio (seeds averaged) with its percentile-bootstrap 95% interval; dashed: "
                  "equal time. Times depend on the hardware and on how many cells shared it.",
    "equivalence_loss": "Final train and validation loss of {b} (y) against {a} (x), one dot per "
                        "setting (the geometric mean over its seeds; n = {n} settings), colour = "
                        "Q bin; dashed: y = x; panel titles: median ratio {b}/{a} and the "
                        "settings {b} wins. Log-log axes.",
    "table2": "Table 2 as a figure: mean train and validation loss per architecture (rows) and "
              "Q bin (columns); each cell gives the mean and n, the number of finished cells "
              "averaged; one log colour scale per dataset; grey '–': no cell in that bin.",
    "ratio_distribution": "Histogram of log10({b}/{a}) of the final loss over n = {n} settings "
                          "(seeds averaged); "
                          "red line: median, red band: its percentile-bootstrap 95% interval "
                          "(2,000 resamples); dashed: equal loss.",
    "factor_effects": "Median log10({b}/{a}) loss ratio at each value of each swept grid axis; "
                      "error bars: percentile-bootstrap 95% interval of that median over the "
                      "settings at that value (n = {n} settings in all); dashed: equal loss.",
    "learning_curves": "Learning curves of the pairs with the largest, smallest and median "
                       "validation-loss ratio: train (dashed) and validation (solid) loss per "
                       "epoch, {a} and {b} in their colours; log loss axis.",
    "equivalence_accuracy": "Final validation and test accuracy of {b} (y) against {a} (x), one "
                            "dot per setting (n = {n} settings), colour = Q bin; dashed: y = x. "
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
    pairs: pd.DataFrame  # evidence: pairs of two different networks (one row per seed)
    table2: pd.DataFrame
    stats: pd.DataFrame
    bad_parts: list[str]
    notes: list[str] = field(default_factory=list)
    all_pairs: pd.DataFrame | None = None  # evidence and same-network controls
    controls: dict = field(default_factory=dict)  # data.control_summary
    table2_acc: pd.DataFrame | None = None
    settings: pd.DataFrame | None = None  # evidence with seeds averaged: the unit of evidence
    noise: pd.DataFrame | None = None  # stats.seed_noise
    margin: float | str = DEFAULT_MARGIN  # a delta, or "seed"
    margin_from: str = "default"  # "--margin", "spec [analysis]" or "default"
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
        # The layout the PNG was drawn with holds for the PDF (figure-relative positions,
        # text sized in points): not solving it again saves a third of a figure's time.
        fig.set_layout_engine("none")
    return paths


def study_margin(root: Path, margin=None) -> tuple[float | str, str]:
    """The margin to judge with, and where it came from: `margin` if given (--margin), else the
    saved spec's [analysis] margin, else DEFAULT_MARGIN."""
    if margin is not None:
        return parse_margin(margin, "--margin"), "--margin"
    try:
        saved = parse_spec(Store(root).spec_path.read_text()).analysis.get("margin")
    except (OSError, UnicodeDecodeError, SpecError):
        saved = None  # no readable spec: the report says so under Progress
    if saved is not None:
        return saved, "spec [analysis]"
    return DEFAULT_MARGIN, "default"


def analyse(root: str | Path, compare=("sequential", "parallel"),
            pairs: Iterable[str] | None = None, only: Iterable[str] | None = None,
            margin=None) -> Analysis:
    """Load the store, compute pairs / settings / Table 2 / seed noise / statistics and write
    the figures (all, or the stems in `only`). `margin`: the equivalence margin (a positive
    number or "seed"), default the spec's [analysis] margin or DEFAULT_MARGIN."""
    root = check_store(root)
    if isinstance(compare, str) or len(compare) != 2:
        raise AnalysisError(f"compare takes two architectures (a, b), got {compare!r}")
    a, b = compare
    check_compare(a, b)
    margin, margin_from = study_margin(root, margin)
    out_dir = Store(root).figures_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AnalysisError(f"cannot create {out_dir}: {e.strerror or e}") from None

    report = ReadReport()
    df = _data.load(root, report)
    times = _data.train_time(root, report=report)
    if len(times):  # epochs that recorded their training pass: the speed half of the claim
        df = df.assign(train_s_per_epoch=df["cell_id"].map(times))
    all_pairs = _data.pairs(df, a, b)
    # Same-network pairs are controls, not evidence: out of every statistic and pair figure.
    pdf = _data.evidence(all_pairs)
    sdf = _data.settings(pdf)  # seeds of a setting averaged: n counts settings
    t2 = _data.table2(df)
    seeds = _seed_pairs(df[df["architecture"].isin([a, b])])
    noise = _seed_noise(df[df["architecture"].isin([a, b])])
    res = Analysis(root=root, a=a, b=b, trials=df, pairs=pdf, table2=t2,
                   stats=_stats(sdf, margin=margin, noise=noise), bad_parts=list(report.bad_parts),
                   all_pairs=all_pairs, controls=_data.control_summary(all_pairs),
                   table2_acc=_data.table2(df, ("train_acc", "val_acc")), settings=sdf,
                   noise=noise, margin=margin, margin_from=margin_from)
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
        job("forest", lambda: plots.plot_forest(res.stats, noise))
        job("seed_noise", lambda: plots.plot_seed_noise(seeds, pdf))
        if (res.stats["metric"] == "train_s_per_epoch").any():  # a store before train_s: no note
            job("train_time", lambda: plots.plot_time_ratio(res.stats))
        job("equivalence_loss", lambda: plots.plot_equivalence(sdf, ("train_loss", "val_loss")))
        job("table2", lambda: plots.plot_table2(t2))
        job("ratio_distribution", lambda: plots.plot_ratio_distribution(sdf))
        job("factor_effects", lambda: plots.plot_factor_effects(sdf))
        job("learning_curves", lambda: _curves(root, pdf, pairs, notes))
        job("equivalence_accuracy", lambda: plots.plot_equivalence(sdf, ("val_acc", "test_acc")))
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
    if noise.empty:
        (out_dir / "seed_noise.csv").unlink(missing_ok=True)  # a stale table would mislead
    else:
        res.files.append(_write(out_dir / "seed_noise.csv", noise.to_csv(index=False)))
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
                  pairs: Iterable[str] | None = None, only: Iterable[str] | None = None,
                  margin=None) -> list[Path]:
    """Write every figure (PNG + PDF), table2.csv/.md, stats.csv and NOTES.txt to DIR/figures.

    `compare` = (a, b): the architectures set against each other (a on x, b on y; ratios are
    b / a). `pairs`: pair_keys (or unique prefixes) for the learning-curve figure; default the
    pairs with the largest, smallest and median validation-loss ratio. A figure that cannot be
    drawn is skipped with a line in NOTES.txt (also on the result's `.notes`). `only`: draw
    just these figures (stems of FIGURES, e.g. ["learning_curves"]); tables always. Raises
    AnalysisError for a folder that is not a results store or an unknown architecture.
    `margin`: the equivalence margin (see `analyse`).
    """
    res = analyse(root, compare, pairs, only, margin)
    return FigureResult(res.files, res.notes)
