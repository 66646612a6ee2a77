"""Layer 3b: save what was computed and drawn to DIR/figures: every figure as PNG + PDF,
table2.csv/.md, stats.csv, seed_noise.csv and NOTES.txt (why any figure was skipped)."""
from __future__ import annotations

import datetime as dt
import io
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import matplotlib as mpl

from study.atomic import atomic_write
from study.store import StoreReader, atomic_write_text

from . import frames
from ._common import AnalysisError
from .compute import LESIONS_TABLE, Analysis, analyse, read_lesions
from .draw import STYLE, Drawn, draw_figures, draw_lesions

LESIONS_SAVE = {"dpi": 150, "bbox_inches": "tight"}  # its legend sits outside the axes


class FigureResult(list):
    """The paths written (a list of Path), with `.notes`: why any figure was skipped."""

    def __init__(self, paths=(), notes=()):
        super().__init__(paths)
        self.notes = list(notes)


@dataclass
class Written:
    """What write_outputs saved: the files, each figure's PNG (for the report to embed without
    reading it back) and every note (the store's, the figures', the tables')."""
    files: list[Path] = field(default_factory=list)
    pngs: dict[str, bytes] = field(default_factory=dict)  # stem -> the PNG written
    notes: list[str] = field(default_factory=list)


def write_outputs(res: Analysis, drawn: Drawn) -> Written:
    """Save the drawn figures and the tables of `res` to DIR/figures, then NOTES.txt."""
    out_dir = _figures_dir(res.root)
    out = Written(notes=res.notes + drawn.notes)
    for stem, fig in drawn.figures.items():
        # savefig reads rcParams too (the PDF's font type): each figure in the style it was
        # drawn in, the lesion figure in its own with the default ones
        with nullcontext() if stem == "lesions" else mpl.rc_context(STYLE):
            paths, out.pngs[stem] = _save(fig, out_dir, stem,
                                          **LESIONS_SAVE if stem == "lesions" else {})
        out.files += paths
    for stem in drawn.skipped:
        for ext in ("png", "pdf"):  # a stale figure from an earlier run would mislead
            (out_dir / f"{stem}.{ext}").unlink(missing_ok=True)
    _write_tables(res, out_dir, out)
    stamp = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    body = "\n".join(f"- {n}" for n in out.notes) if out.notes else "(none: every figure was drawn)"
    out.files.append(_write(out_dir / "NOTES.txt",
                            f"write_figures {res.a} vs {res.b} at {stamp}\n{body}\n"))
    return out


def _write_tables(res: Analysis, out_dir: Path, out: Written) -> None:
    if res.table2.empty:
        out.notes.append("table2.csv/.md: skipped, no finished (status ok) cell with a known Q")
    else:
        out.files.append(_write(out_dir / "table2.csv", res.table2.to_csv(index=False)))
        out.files.append(_write(out_dir / "table2.md", frames.table2_markdown(res.table2)))
    if res.stats.empty:
        out.notes.append(f"stats.csv: skipped, no complete {res.a}/{res.b} pairs")
    else:
        out.files.append(_write(out_dir / "stats.csv", res.stats.to_csv(index=False)))
    if res.noise.empty:
        (out_dir / "seed_noise.csv").unlink(missing_ok=True)  # a stale table would mislead
    else:
        out.files.append(_write(out_dir / "seed_noise.csv", res.noise.to_csv(index=False)))


def _figures_dir(root: Path) -> Path:
    out_dir = StoreReader(root).figures_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AnalysisError(f"cannot create {out_dir}: {e.strerror or e}") from None
    return out_dir


def _write(path: Path, text: str) -> Path:
    try:
        atomic_write_text(path, text)
    except Exception as e:  # StoreError carries a one-line message already
        raise AnalysisError(str(e)) from None
    return path


def _save(fig, out_dir: Path, stem: str, **savefig_kw) -> tuple[list[Path], bytes]:
    """Write STEM.png and STEM.pdf; return their paths and the PNG's bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kw)
    png = buf.getvalue()
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    for p, write in ((paths[0], lambda tmp: tmp.write_bytes(png)),
                     (paths[1], lambda tmp: fig.savefig(tmp, format="pdf", **savefig_kw))):
        try:
            atomic_write(p, write)
        except OSError as e:
            raise AnalysisError(f"cannot write {p}: {e.strerror or e}") from None
        # The layout the PNG was drawn with holds for the PDF (figure-relative positions,
        # text sized in points): not solving it again saves a third of a figure's time.
        fig.set_layout_engine("none")
    return paths, png


def write_lesion_figure(root: str | Path) -> list[Path]:
    """Draw DIR/figures/lesions.png and .pdf from DIR/lesions/lesions.parquet alone (what
    `study lesion` does after computing the table; write_figures and the report draw it too).
    Raises AnalysisError when there is no lesions table."""
    root = Path(root)
    if not (root / LESIONS_TABLE).is_file():
        raise AnalysisError(f"{root / LESIONS_TABLE} does not exist; run `study lesion {root}` "
                            "first (on a study run with save_weights = true)")
    out_dir = _figures_dir(root)
    return _save(draw_lesions(read_lesions(root)), out_dir, "lesions", **LESIONS_SAVE)[0]


def analyse_draw_write(root: str | Path, compare=("sequential", "parallel"),
                       pairs: Iterable[str] | None = None, only: Iterable[str] | None = None,
                       margin=None) -> tuple[Analysis, Written]:
    """compute.analyse, draw.draw_figures and write_outputs in turn (see write_figures)."""
    res = analyse(root, compare, pairs, only, margin)
    return res, write_outputs(res, draw_figures(res))


def write_figures(root: str | Path, compare=("sequential", "parallel"),
                  pairs: Iterable[str] | None = None, only: Iterable[str] | None = None,
                  margin=None) -> list[Path]:
    """Write every figure (PNG + PDF), table2.csv/.md, stats.csv and NOTES.txt to DIR/figures.

    `compare` = (a, b): the architectures set against each other (a on x, b on y; ratios are
    b / a). `pairs`: pair_keys (or unique prefixes) for the learning-curve figure; default the
    pairs with the largest, smallest and median validation-loss ratio. A figure that cannot be
    drawn is skipped with a line in NOTES.txt (also on the result's `.notes`). `only`: draw
    just these figures (stems of captions.FIGURES, e.g. ["learning_curves"]); tables always.
    Raises AnalysisError for a folder that is not a results store or an unknown architecture.
    `margin`: the equivalence margin (see compute.analyse).
    """
    _, out = analyse_draw_write(root, compare, pairs, only, margin)
    return FigureResult(out.files, out.notes)
