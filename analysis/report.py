"""Layer 3c: one self-contained HTML report (figures inlined as base64 PNG, no scripts, no
external resources; a Content-Security-Policy makes the browser refuse anything else).
Its headline, progress and figures are built here; the table sections in report_sections."""
from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from study.counts import StudyGrid, count_cells
from study.durations import long_duration
from study.store import StoreReader, atomic_write_text
from study.trials import compute_seconds, trained_cells, training_modes
from sweep import SpecError

from ._common import PRETTY, AnalysisError, dataset_label
from .captions import FIGURES
from .compute import Analysis
from .draw import AXIS_RULE
from .report_looks import looks_section
from .report_plan import (HOLM_MARK, HOLM_NOTE, exploratory_label, family_interval, holm_marked,
                          levels_sentence, margin_words, plan_html, power_sentence)
from .report_sections import (MAX_FAILED_ROWS, STATS_PARAGRAPH, _control_sentence,
                              _controls_html, _environment_html, _failed_html, _noise_html,
                              _num, _one_seed_sentence, _p, _stats_html, _table2_html, esc)
from .stats import TIME_METRIC, arch_effect, noise_of
from .write import Written, analyse_draw_write

# esc, MAX_FAILED_ROWS and STATS_PARAGRAPH were defined here: still importable from here.
__all__ = ["CSS", "CSP", "MAX_FAILED_ROWS", "STATS_PARAGRAPH", "esc", "render", "write_report"]


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
figcaption{font-size:.9em;color:#555} .headline{font-size:1.05em;background:#f6f8fb;
border-left:4px solid #4a6fa5;padding:.1em 1em} .headline li{margin:.35em 0}
.wide{overflow-x:auto} .alarm{color:#b00020;font-weight:700}
.ok{color:#1b5e20} .note{color:#8a5a00} dl.kv{display:grid;
grid-template-columns:max-content auto;gap:.2em 1.2em} dl.kv dt{font-weight:600} dl.kv dd{margin:0}
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _progress(res: Analysis) -> tuple[dict, str, str]:
    """Counts of the study's cells, the spec text and a note on the spec (if unreadable)."""
    store = StoreReader(res.root)
    source, spec_note, ids = "", "", None
    try:
        grid = StudyGrid.saved(store)
        source = grid.source
    except (OSError, UnicodeDecodeError) as e:
        spec_note = f"spec.toml unreadable or missing ({type(e).__name__}); grid size unknown"
    if source:
        try:
            ids = grid.cell_ids()  # from the driver's cache: a big grid is not enumerated again
        except SpecError as e:
            spec_note = f"spec.toml does not parse ({e}); grid size unknown"
    n = count_cells(res.trials, ids, in_flight=store.in_flight(done=res.trials["cell_id"]))
    counts = {**n.by_status(), "running": n.in_flight, "grid": n.total,
              # pending here: neither done nor running
              "pending": None if n.pending is None else n.pending - n.in_flight,
              "outside_spec": n.outside}
    return counts, source, spec_note


def _margin_text(res: Analysis, delta: float | None = None) -> str:
    if isinstance(res.margin, dict):
        return margin_words(res.margin)
    if res.margin == "seed":
        return "the seed noise of each row (δ = exp(median seed-to-seed |log ratio|) − 1)"
    d = res.margin if delta is None else delta
    return f"±{_num(100 * d, '.3g')} %"


def _time_clause(res: Analysis, ds: str) -> str:
    s = res.stats
    r = s[(s["dataset"] == ds) & (s["q_bin"] == "all") & (s["metric"] == TIME_METRIC)]
    if r.empty:
        return ""
    r = next(r.itertuples(index=False))
    return (f"<b>{esc(dataset_label(ds))}, training time per epoch</b>: {esc(res.b)} takes "
            f"{_num(r.median_ratio, '.2f')}× {esc(res.a)}'s (median over {r.n} settings, "
            f"95 % interval [{_num(r.ratio_ci_low, '.2f')}, {_num(r.ratio_ci_high, '.2f')}]; on "
            "this hardware and schedule).")


def _verdict_sentence(res: Analysis, r, noise_med: float, effect_med: float) -> str:
    """One dataset x loss: the verdict with its numbers, then the seed-noise comparison."""
    a, b = esc(res.a), esc(res.b)
    margin = f"±{_num(100 * r.margin, '.3g')} %"
    ci = family_interval(r)
    n = f"n = {r.n} settings" + (f", {r.n_runs} runs" if r.n_runs != r.n else "")
    head = f"<b>{esc(dataset_label(r.dataset))}, {esc(PRETTY.get(r.metric, r.metric))}</b>: "
    shift = (f"{b}'s loss is about {_num(100 * abs(1 - r.ratio), '.2g')} % "
             f"{'lower' if r.ratio < 1 else 'higher'} than {a}'s")
    if r.verdict == "equivalent":
        text = (f"{b} and {a} are <b>equivalent</b> within {margin} (TOST p = "
                f"{_p(r.p_tost_holm)}, {n}, ratio {b}/{a} {_num(r.ratio, '.3f')}, {ci})")
    elif r.verdict == "equivalent but different":
        text = (f"{b} and {a} are <b>equivalent but different</b>: {shift}, a real difference "
                f"inside the {margin} margin (ratio "
                f"{_num(r.ratio, '.3f')}, {ci}; TOST p = {_p(r.p_tost_holm)}, "
                f"t-test p = {_p(r.p_ttest_holm)}; {n})")
    elif r.verdict == "different":
        text = (f"{b} and {a} are <b>different</b>: {shift} "
                f"(ratio {_num(r.ratio, '.3f')}, {ci} not inside the {margin} "
                f"margin; t-test p = {_p(r.p_ttest_holm)}; {n})")
    elif r.verdict == "inconclusive":
        text = (f"<b>inconclusive</b>: the ratio {b}/{a} {_num(r.ratio, '.3f')}, {ci}, crosses "
                f"the {margin} margin and the t-test finds no difference (TOST p = "
                f"{_p(r.p_tost_holm)}, t-test p = {_p(r.p_ttest_holm)}; {n})")
    else:
        text = f"no verdict: fewer than 3 settings ({n})"
    if np.isfinite(noise_med) and np.isfinite(effect_med):
        verb = "less" if effect_med < noise_med else "more"
        text += (f"; swapping the architecture moves the loss {verb} than re-seeding does "
                 f"(median |log ratio| {_num(effect_med, '.3f')} between architectures vs "
                 f"{_num(noise_med, '.3f')} between seeds)")
    if holm_marked(r):
        text += f" {HOLM_MARK}"
    return head + text + exploratory_label(res) + "." + power_sentence(res, r) + " "


def _headline(res: Analysis) -> str:
    """The report's first paragraph: the margin and where it came from, then per dataset and
    loss the verdict of the equivalence test with its numbers, the verdicts per Q bin, the
    seeds, and the same-network control."""
    a, b = esc(res.a), esc(res.b)
    s = res.stats
    ctl = res.controls or {}
    out = []
    if s.empty:
        out.append(f"No complete {a}/{b} pairs of two different networks yet: no comparison "
                   "to report.")
    else:
        src = {"--margin": "given by --margin", "spec [analysis]": "from the spec's [analysis] "
               "table", "default": "the default; set <code>[analysis] margin</code> in the spec "
               "or <code>--margin</code>",
               "plan (pilot seed noise)": "resolved from the pilot when the plan was saved"
               }[res.margin_from]
        fallback = (" (rows without seed repeats fall back to ±10 %)"
                    if res.margin == "seed" and (s["margin_source"] != "seed noise").any() else "")
        out.append(f"Equivalence margin: {_margin_text(res)}, {src}{fallback}; a ratio {b}/{a} "
                   "inside it counts as the same loss. " + levels_sentence(s, res.alpha))
        if res.margin == "seed":
            out.append("<i>The margin comes from the same data it judges: these verdicts are "
                       "exploratory; fix it from a pilot (<code>margin = \"seed\"</code> with "
                       "<code>pilot = DIR</code> in <code>[analysis]</code>).</i>")
    eff = arch_effect(res.pairs)
    items = []
    for ds in dict.fromkeys(s["dataset"]) if not s.empty else []:
        for m in ("train_loss", "val_loss"):
            hit = s[(s["dataset"] == ds) & (s["metric"] == m)]
            top = hit[hit["q_bin"] == "all"]
            if top.empty:
                continue
            e = eff[(eff["dataset"] == ds) & (eff["q_bin"] == "all") & (eff["metric"] == m)]
            item = _verdict_sentence(res, next(top.itertuples(index=False)),
                                     noise_of(res.noise, ds, "all", m),
                                     float(e["median_abs_log_ratio"].iloc[0]) if len(e) else np.nan)
            bins = hit[hit["q_bin"] != "all"]
            if len(bins) and (bins["n"] < 3).all():
                item += "No Q bin has the 3 settings a verdict needs."
            elif len(bins):
                item += "By Q bin: " + "; ".join(
                    f"Q∈{esc(r.q_bin)} {esc(r.verdict)}{' ' + HOLM_MARK if holm_marked(r) else ''} "
                    f"(n = {r.n})"
                    for r in bins.itertuples(index=False)) + "."
            items.append(item)
        if _time_clause(res, ds):
            items.append(_time_clause(res, ds))
    tail = []
    if not s.empty and s["holm_only"].eq(True).any():
        tail.append(HOLM_NOTE)
    if res.noise is None or res.noise.empty:
        tail.append(_one_seed_sentence())
    tail.append("These verdicts describe this grid of settings; they do not carry over to other "
                "grids or datasets (see “What they do not show” below).")
    if ctl.get("n"):
        tail.append(_control_sentence(res))
    return ('<div class="headline"><p>' + " ".join(out) + "</p>"
            + ("<ul>" + "".join(f"<li>{x.strip()}</li>" for x in items) + "</ul>" if items else "")
            + "<p>" + " ".join(x.strip() for x in tail) + "</p></div>")


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def render(res: Analysis, written: Written) -> str:
    """The report's HTML: `res` laid out, with the figures `written` saved embedded."""
    meta = StoreReader(res.root).meta()
    counts, source, spec_note = _progress(res)
    name = meta.get("name") or res.root.name
    notes = list(written.notes) + ([spec_note] if spec_note else [])
    figs = _figures_html(res, written.pngs)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>Study report: {esc(name)}</title><style>{CSS}</style></head><body>",
        f"<h1>Study report: {esc(name)}</h1>",
        f"<p>{esc(meta.get('description', ''))}</p>" if meta.get("description") else "",
        f"<p>Generated {stamp}.</p>",
        "<h2>Headline</h2>", _headline(res),
        "<h2>The analysis plan</h2>", plan_html(res),
        looks_section(res.root),
        "<h2>Progress</h2>" + _progress_html(res, meta, counts),
    ]
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f'<li class="note">{esc(n)}</li>' for n in notes)
                     + "</ul>")
    parts += _sections(res, figs, source)
    return "\n".join(p for p in parts if p)


def _modes_text(trained: pd.DataFrame) -> str:
    """How the cells trained: alone, in fused groups, or (a study resumed with another
    --fuse) both, which the reader should know: values agree to float rounding only."""
    m = training_modes(trained)
    if not m["fused"]:
        return f"{m['solo']:,} cells one per trial"
    if not m["solo"]:
        return f"{m['fused']:,} cells in fused groups (study.fused)"
    return (f"<b>mixed modes</b>: {m['solo']:,} cells one per trial, {m['fused']:,} in fused "
            "groups; a fused cell matches its solo run to float rounding, not bit for bit "
            "(README, Fused training)")


def _progress_html(res: Analysis, meta: dict, counts: dict) -> str:
    """The Progress list: where the study is, what it compares and how far it got."""
    trained = trained_cells(res.trials)
    wall = compute_seconds(trained) if len(res.trials) else 0.0
    a, b = esc(res.a), esc(res.b)

    def c(k):
        return "unknown" if counts.get(k) is None else f"{counts[k]:,}"

    kv = [("results folder", esc(res.root.resolve())), ("spec from", esc(meta.get("origin", ""))),
          ("created", esc(meta.get("created_at", ""))), ("compared", f"{a} (a) vs {b} (b)"),
          ("cells in the grid", c("grid")), ("done (ok)", c("ok")), ("failed", c("failed")),
          ("diverged", c("diverged")), ("running", c("running")), ("pending", c("pending")),
          ("settings compared", f"{len(res.settings) if res.settings is not None else 0:,} "
           f"(from {len(res.pairs):,} pairs of cells, seeds counted apart)"),
          ("complete pairs", f"{len(res.pairs):,} of different networks"
           + (f" + {res.controls['n']:,} same-network controls" if res.controls.get("n") else "")),
          ("compute time", esc(long_duration(wall))), ("trained", _modes_text(trained))]
    if counts.get("outside_spec"):
        kv.append(("rows outside the current spec", c("outside_spec")))
    return '<dl class="kv">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in kv) + "</dl>"


def _figures_html(res: Analysis, pngs: dict[str, bytes]) -> list[str]:
    """One <figure> per figure drawn, numbered in FIGURES order, its PNG inlined."""
    df = res.trials
    n_cells = int((df["status"] == "ok").sum()) if len(df) else 0
    n_settings = len(res.settings) if res.settings is not None else len(res.pairs)
    figs = []
    for stem, caption in FIGURES.items():
        if stem in pngs:
            num = len(figs) + 1
            cap = esc(caption.format(a=res.a, b=res.b, n=f"{n_settings:,}",
                                     cells=f"{n_cells:,}", margin=_margin_text(res)))
            figs.append(f'<figure id="fig{num}">{_img(pngs[stem], f"Figure {num}. {cap}")}'
                        f"<figcaption><b>Figure {num}.</b> {cap} (figures/{esc(stem)}.png, .pdf)"
                        "</figcaption></figure>")
    return figs


def _sections(res: Analysis, figs: list[str], source: str) -> list[str]:
    """Everything after the notes: tables, statistics, control, figures, failures, spec."""
    a, b = esc(res.a), esc(res.b)
    return ["<h2>Table 2: mean loss by Q bin</h2>", _table2_html(res.table2),
            "<h2>Table 2 of accuracy: mean accuracy by Q bin</h2>",
            _table2_html(res.table2_acc if res.table2_acc is not None else pd.DataFrame(),
                         "accuracy"),
            "<h2>Seed noise: re-seeding against swapping the architecture</h2>",
            _noise_html(res),
            f"<h2>Statistics: {b} vs {a}</h2>", _stats_html(res),
            "<h2>Same-network pairs: the control</h2>", _controls_html(res),
            "<h2>Figures</h2>",
            f"<p>{esc(AXIS_RULE)} n is the number of settings (seeds averaged), pairs or cells "
            "each figure shows.</p>" if figs else "",
            "".join(figs) or '<p class="note">No figure could be drawn.</p>',
            "<h2>Failed and diverged cells</h2>", _failed_html(res.trials),
            "<h2>Environment</h2>", _environment_html(res),
            "<h2>Spec</h2>", f"<pre>{esc(source)}</pre>" if source else "<p>(no spec.toml)</p>",
            "</body></html>"]


def write_report(root: str | Path, compare=("sequential", "parallel"),
                 pairs: Iterable[str] | None = None, margin=None) -> Path:
    """(Re)draw the figures and write DIR/report.html, a single self-contained file.
    `margin`: the equivalence margin (a positive number or "seed"; default the spec's
    [analysis] margin, else analysis.DEFAULT_MARGIN)."""
    res, written = analyse_draw_write(root, compare, pairs, margin=margin)
    out = res.root / "report.html"
    try:
        atomic_write_text(out, render(res, written))
    except Exception as e:
        raise AnalysisError(str(e)) from None
    return out
