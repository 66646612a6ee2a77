"""Layer 3b: one self-contained HTML report (figures inlined as base64 PNG, no scripts, no
external resources; a Content-Security-Policy makes the browser refuse anything else)."""
from __future__ import annotations

import base64
import datetime as dt
import html
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from study.store import Store, atomic_write_text
from sweep import SpecError, parse_spec

from ._common import PRETTY, AnalysisError, dataset_label
from .data import table2_wide
from .figures import FIGURES, Analysis, analyse

MAX_FAILED_ROWS = 500  # a report stays readable; the store has every row

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.88em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:.25em .55em;text-align:right;vertical-align:top}
th{background:#f4f4f4} td.l,th.l{text-align:left}
pre{background:#f7f7f7;border:1px solid #e3e3e3;padding:.8em;overflow:auto;font-size:.85em}
figure{margin:1.2em 0} figure img{max-width:100%;height:auto;border:1px solid #eee}
table.num td{white-space:nowrap}
figcaption{font-size:.9em;color:#555} .note{color:#8a5a00} dl.kv{display:grid;
grid-template-columns:max-content auto;gap:.2em 1.2em} dl.kv dt{font-weight:600} dl.kv dd{margin:0}
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def esc(x) -> str:
    """Every string that came from the store or the spec goes through here."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return html.escape(str(x), quote=True)


def _num(v, fmt: str) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return ""
    return "–" if not np.isfinite(v) else format(v, fmt)


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds) or seconds <= 0:
        return "0 s"
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return (f"{int(h)} h {int(m)} min" if h else f"{int(m)} min {s:.0f} s" if m
            else f"{s:.1f} s") + f" ({seconds:,.0f} s)"


def _table(headers: list[str], rows: list[list[str]], left: int = 1, cls: str = "") -> str:
    """rows hold already-escaped HTML; the first `left` columns are left-aligned."""
    th = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _progress(res: Analysis) -> tuple[dict, str, str]:
    """Counts of the study's cells, the spec text and a note on the spec (if unreadable)."""
    store = Store(res.root)
    df = res.trials
    counts = {s: int((df["status"] == s).sum()) for s in ("ok", "failed", "diverged")}
    done = set(df["cell_id"])
    running = set(store.in_flight())
    counts["running"] = len(running)
    source, spec_note = "", ""
    try:
        source = store.spec_path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        spec_note = f"spec.toml unreadable or missing ({type(e).__name__}); grid size unknown"
    counts["grid"] = counts["pending"] = None
    if source:
        try:
            ids = {c.cell_id for c in parse_spec(source, origin=str(store.spec_path)).cells()}
            counts["grid"] = len(ids)
            counts["pending"] = len(ids - done - running)
            counts["outside_spec"] = len(done - ids)
        except SpecError as e:
            spec_note = f"spec.toml does not parse ({e}); grid size unknown"
    return counts, source, spec_note


STATS_PARAGRAPH = """
<p><b>What these numbers show.</b> Each row compares {b} with {a} on the pairs of cells that
share every setting except the architecture. <i>median {b}/{a}</i> is the typical loss ratio
(below 1: {b} lower) with a bootstrap 95% interval; <i>{b} wins</i> is the share of pairs where
{b} reached the lower loss, with a Wilson 95% interval; the p-value is a paired Wilcoxon
signed-rank test on the log losses (does {b}'s loss tend to sit above or below {a}'s by a
constant factor?), and the Holm column adjusts it for the number of tests in this table.</p>
<p><b>What they do not show.</b> The pairs are the cells of a designed grid of settings, not a
random sample from a population of networks or tasks: a p-value says how consistent the
difference is across <i>this</i> grid, not that it would hold on other grids or datasets.
{seeds} A large p-value does not prove the architectures equivalent: absence of evidence is
not evidence of absence; equivalence would need a pre-chosen margin and an equivalence test (or
read the interval of the median ratio against the margin you care about). Many tests are shown
(per dataset and per Q bin, train and validation), so some small p-values are expected by
chance; prefer the Holm-adjusted column, and note that a bin with few pairs has little power.</p>
"""


def _stats_html(res: Analysis) -> str:
    s = res.stats
    if s.empty:
        return f'<p class="note">No complete {esc(res.a)}/{esc(res.b)} pairs: no statistics.</p>'
    rows = []
    for r in s.itertuples(index=False):
        rows.append([esc(dataset_label(r.dataset)), esc(r.q_bin), esc(PRETTY.get(r.metric, r.metric)),
                     str(r.n), _num(r.mean_a, ".4g"), _num(r.mean_b, ".4g"),
                     f"{_num(r.median_ratio, '.3f')} [{_num(r.ratio_ci_low, '.3f')}, "
                     f"{_num(r.ratio_ci_high, '.3f')}]",
                     f"{r.b_wins}/{r.n} = {_num(r.win_rate_b, '.2f')} "
                     f"[{_num(r.win_ci_low, '.2f')}, {_num(r.win_ci_high, '.2f')}]",
                     _num(r.p_value, ".3g"), _num(r.p_holm, ".3g")])
    a, b = esc(res.a), esc(res.b)
    head = ["dataset", "Q bin", "loss", "pairs", f"mean {a}", f"mean {b}",
            f"median {b}/{a} [95% CI]", f"{b} wins [95% CI]", "Wilcoxon p", "Holm p"]
    n_seeds = res.pairs["seed"].nunique() if "seed" in res.pairs else 1
    seeds = ("Each setting was trained with one seed, so seed-to-seed noise is not separated "
             "from the architecture effect." if n_seeds <= 1 else
             f"Each setting was trained with {n_seeds} seeds and every seed counts as its own "
             "pair, so pairs that share their settings are not independent; judge the gap "
             "against the spread between seeds.")
    return _table(head, rows, left=3, cls="num") + STATS_PARAGRAPH.format(a=a, b=b, seeds=seeds)


def _table2_html(res: Analysis) -> str:
    wide = table2_wide(res.table2)
    if wide.empty:
        return '<p class="note">No finished cell with a known Q: no Table 2.</p>'
    rows = [[esc(idx), *[esc(c) for c in row]] for idx, row in
            zip(wide.index, wide.itertuples(index=False))]
    return (_table([""] + [esc(c) for c in wide.columns], rows, cls="num") +
            "<p>Mean loss, train / validation, over the cells with status ok in each bin of "
            "Q = training examples × classes / parameters (– : no cell).</p>")


def _failed_html(df: pd.DataFrame) -> str:
    bad = df[df["status"].isin(["failed", "diverged"])]
    if bad.empty:
        return "<p>None.</p>"
    bad = bad.sort_values(["status", "dataset", "architecture", "cell_id"], kind="stable")
    cols = ["cell_id", "status", "dataset", "architecture", "layers", "filters", "kernel", "error"]
    rows = [[esc(getattr(r, c)) for c in cols] for r in bad.head(MAX_FAILED_ROWS).itertuples(index=False)]
    out = _table(cols, rows, left=len(cols))
    if len(bad) > MAX_FAILED_ROWS:
        out += f"<p>… and {len(bad) - MAX_FAILED_ROWS} more (every row is in trials/).</p>"
    return out


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def render(res: Analysis) -> str:
    meta = Store(res.root).meta()
    counts, source, spec_note = _progress(res)
    name = meta.get("name") or res.root.name
    df = res.trials
    wall = float(pd.to_numeric(df["wall_s"], errors="coerce").sum()) if len(df) else 0.0
    a, b = esc(res.a), esc(res.b)

    def c(k):
        return "unknown" if counts.get(k) is None else f"{counts[k]:,}"

    kv = [("results folder", esc(res.root.resolve())), ("spec from", esc(meta.get("origin", ""))),
          ("created", esc(meta.get("created_at", ""))), ("compared", f"{a} (a) vs {b} (b)"),
          ("cells in the grid", c("grid")), ("done (ok)", c("ok")), ("failed", c("failed")),
          ("diverged", c("diverged")), ("running", c("running")), ("pending", c("pending")),
          ("complete pairs", f"{len(res.pairs):,}"), ("compute time", esc(_duration(wall)))]
    if counts.get("outside_spec"):
        kv.append(("rows outside the current spec", c("outside_spec")))
    notes = list(res.notes) + ([spec_note] if spec_note else [])
    figs = []
    for stem, caption in FIGURES.items():
        if stem in res.pngs:
            cap = esc(caption.format(a=res.a, b=res.b))
            figs.append(f"<figure>{_img(res.pngs[stem], cap)}<figcaption>{cap}"
                        f" (figures/{esc(stem)}.png, .pdf)</figcaption></figure>")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Study report: {esc(name)}</title><style>{CSS}</style></head><body>",
        f"<h1>Study report: {esc(name)}</h1>",
        f"<p>{esc(meta.get('description', ''))}</p>" if meta.get("description") else "",
        f"<p>Generated {stamp}.</p>",
        "<h2>Progress</h2><dl class=\"kv\">" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in kv)
        + "</dl>",
    ]
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f'<li class="note">{esc(n)}</li>' for n in notes)
                     + "</ul>")
    parts += ["<h2>Table 2: mean loss by Q bin</h2>", _table2_html(res),
              f"<h2>Statistics: {b} vs {a}</h2>", _stats_html(res),
              "<h2>Figures</h2>", "".join(figs) or '<p class="note">No figure could be drawn.</p>',
              "<h2>Failed and diverged cells</h2>", _failed_html(df),
              "<h2>Spec</h2>", f"<pre>{esc(source)}</pre>" if source else "<p>(no spec.toml)</p>",
              "</body></html>"]
    return "\n".join(p for p in parts if p)


def write_report(root: str | Path, compare=("sequential", "parallel"),
                 pairs: Iterable[str] | None = None) -> Path:
    """(Re)draw the figures and write DIR/report.html, a single self-contained file."""
    res = analyse(root, compare, pairs)
    out = res.root / "report.html"
    try:
        atomic_write_text(out, render(res))
    except Exception as e:
        raise AnalysisError(str(e)) from None
    return out
