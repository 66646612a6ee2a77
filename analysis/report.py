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

from study.counts import count_cells
from study.store import Store, atomic_write_text
from sweep import SpecError, parse_spec

from ._common import PRETTY, AnalysisError, dataset_label
from .data import table2_wide
from .plots import AXIS_RULE
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
figcaption{font-size:.9em;color:#555} .headline{font-size:1.05em;background:#f6f8fb;
border-left:4px solid #4a6fa5;padding:.6em 1em} .alarm{color:#b00020;font-weight:700}
.ok{color:#1b5e20} .note{color:#8a5a00} dl.kv{display:grid;
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
    source, spec_note, ids = "", "", None
    try:
        source = store.spec_path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        spec_note = f"spec.toml unreadable or missing ({type(e).__name__}); grid size unknown"
    if source:
        try:
            ids = [c.cell_id for c in parse_spec(source, origin=str(store.spec_path)).cells()]
        except SpecError as e:
            spec_note = f"spec.toml does not parse ({e}); grid size unknown"
    n = count_cells(res.trials, ids, in_flight=store.in_flight(done=res.trials["cell_id"]))
    counts = {**n.by_status(), "running": n.in_flight, "grid": n.total,
              # pending here: neither done nor running
              "pending": None if n.pending is None else n.pending - n.in_flight,
              "outside_spec": n.outside}
    return counts, source, spec_note


STATS_PARAGRAPH = """
<p><b>What these numbers show.</b> Each row compares {b} with {a} on the pairs of cells that
share every setting except the architecture and are two different networks (the same-network
pairs, one network on both sides, are the control below and count in no row). <i>median {b}/{a}</i> is the typical loss ratio
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


def _table2_html(t2: pd.DataFrame, what: str = "loss") -> str:
    wide = table2_wide(t2, with_n=True)
    if wide.empty:
        return f'<p class="note">No finished cell with a known Q: no Table 2 of {what}.</p>'
    rows = [[esc(idx), *[esc(c) for c in row]] for idx, row in
            zip(wide.index, wide.itertuples(index=False))]
    return (_table([""] + [esc(c) for c in wide.columns], rows, cls="num") +
            f"<p>Mean {what}, train / validation, over the cells with status ok in each bin of "
            "Q = training examples × classes / parameters; n = cells averaged (– : no cell). "
            "A same-network twin is both architectures and counts in both rows.</p>")


def _reliable(r) -> bool:
    """A difference we call reliable: the bootstrap interval of the median ratio excludes 1
    and the Holm-adjusted Wilcoxon p is below 0.05."""
    return (np.isfinite(r.ratio_ci_low) and np.isfinite(r.p_holm) and r.p_holm < 0.05
            and (r.ratio_ci_high < 1 or r.ratio_ci_low > 1))


def _headline(res: Analysis) -> str:
    """The report's first paragraph: per dataset the median ratio of train and validation
    loss with its interval, the win rate, and the Q bins where one side is reliably better."""
    a, b = esc(res.a), esc(res.b)
    s = res.stats
    ctl = res.controls or {}
    out = []
    if s.empty:
        out.append(f"No complete {a}/{b} pairs of two different networks yet: no comparison "
                   "to report.")
    for ds in dict.fromkeys(s["dataset"]) if not s.empty else []:
        rows = {(r.q_bin, r.metric): r for r in s[s["dataset"] == ds].itertuples(index=False)}
        tr, va = rows.get(("all", "train_loss")), rows.get(("all", "val_loss"))
        if va is None:
            continue
        bits = [f"<b>{esc(dataset_label(ds))}</b> ({va.n} pairs): the median {b}/{a} loss "
                "ratio is "]
        if tr is not None:
            bits.append(f"{_num(tr.median_ratio, '.3f')} [{_num(tr.ratio_ci_low, '.3f')}, "
                        f"{_num(tr.ratio_ci_high, '.3f')}] on training loss and ")
        bits.append(f"{_num(va.median_ratio, '.3f')} [{_num(va.ratio_ci_low, '.3f')}, "
                    f"{_num(va.ratio_ci_high, '.3f')}] on validation loss (bootstrap 95% "
                    f"intervals); {b} reached the lower validation loss in {va.b_wins} of "
                    f"{va.n} pairs ({_num(va.win_rate_b * 100, '.0f')}%, Wilson 95% interval "
                    f"{_num(va.win_ci_low * 100, '.0f')}–{_num(va.win_ci_high * 100, '.0f')}%)"
                    + (f" and the lower training loss in {tr.b_wins} of {tr.n}" if tr is not None
                       else "") + ". ")
        reliable = []
        for (q, m), r in rows.items():
            if _reliable(r):
                better = b if r.median_ratio < 1 else a
                where = "over all its pairs" if q == "all" else f"in Q∈{esc(q)}"
                reliable.append(f"{better} has the lower {esc(PRETTY.get(m, m))} {where} "
                                f"(median ratio {_num(r.median_ratio, '.3f')}, "
                                f"Holm p = {_num(r.p_holm, '.2g')})")
        if reliable:
            bits.append("Reliably (interval of the median ratio excluding 1 and Holm-adjusted "
                        "Wilcoxon p &lt; 0.05): " + "; ".join(reliable) + ". ")
        else:
            bits.append("Neither architecture is reliably better, over all pairs or in any Q bin "
                        "(none has an interval of the median ratio excluding 1 together with a "
                        "Holm-adjusted Wilcoxon p &lt; 0.05). ")
        out.append("".join(bits))
    n_seeds = res.pairs["seed"].nunique() if "seed" in res.pairs and len(res.pairs) else 1
    out.append("These numbers describe this grid of settings"
               + (" with one seed per setting" if n_seeds <= 1 else f" with {n_seeds} seeds")
               + "; they neither prove the two architectures equivalent nor carry over to other "
               "grids or datasets (see “What they do not show” below).")
    if ctl.get("n"):
        out.append(_control_sentence(res))
    return '<p class="headline">' + " ".join(x.strip() for x in out) + "</p>"


def _control_sentence(res: Analysis) -> str:
    ctl = res.controls
    a, b = esc(res.a), esc(res.b)
    n, same = ctl["n"], ctl["identical"]
    if same == n:
        return (f'<span class="ok">{n} same-network pair{"s" if n != 1 else ""}, all identical: '
                "the pairing works.</span> (One network on both sides, e.g. "
                f"{a} and {b} at one layer; shown as a control, left out of every statistic.)")
    return (f'<span class="alarm">WARNING: {n - same} of {n} same-network pairs are NOT '
            f"identical although {a} and {b} are one network there: the pairing or the training "
            "is not deterministic, so no difference in this report can be trusted until this is "
            "explained.</span>")


def _controls_html(res: Analysis) -> str:
    ctl = res.controls or {}
    if not ctl.get("n"):
        return (f"<p>No same-network {esc(res.a)}/{esc(res.b)} pair in this grid (no cell is the "
                "same network as its twin), so there is no built-in control.</p>")
    c = res.all_pairs[res.all_pairs["same_network"].astype(bool)]
    from .data import swept_factors
    factors = swept_factors(res.all_pairs)[:4]
    rows = []
    for r in c.head(50).itertuples(index=False):
        setting = ", ".join(f"{f.removesuffix('_b').removesuffix('_a')} {getattr(r, f)}"
                            for f in factors)
        rows.append([esc(dataset_label(r.dataset)), esc(setting), _num(r.val_loss_a, ".6g"),
                     _num(r.val_loss_b, ".6g"), _num(r.test_acc_a, ".6g"), _num(r.test_acc_b, ".6g"),
                     "recorded once" if (isinstance(r.same_network_as_a, str)
                                         or isinstance(r.same_network_as_b, str)) else "trained twice"])
    head = ["dataset", "settings", f"val loss {esc(res.a)}", f"val loss {esc(res.b)}",
            f"test acc {esc(res.a)}", f"test acc {esc(res.b)}", "how"]
    more = f"<p>… and {len(c) - 50} more.</p>" if len(c) > 50 else ""
    return (f"<p>{_control_sentence(res)}</p>" + _table(head, rows, left=2, cls="num") + more +
            "<p>A same-network pair has one network on both sides (the grid's rule in "
            "sweep/twins.py, or the column same_network_as). A study run trains it once and "
            "records it under both cells; in a store that trained both, equal numbers show that "
            "the two sides really see the same weights and batches.</p>")


def _environment_html(res: Analysis) -> str:
    df = res.trials
    if df.empty:
        return "<p>No finished cell: nothing recorded.</p>"
    trained = df[df["same_network_as"].isna()] if "same_network_as" in df else df

    def counts(col: str) -> str:
        if col not in df:
            return "unknown"
        v = trained[col].fillna("").astype(str).replace("", "(not recorded)").value_counts()
        return ", ".join(f"{esc(k)} ({n:,} cells)" for k, n in v.items()) or "unknown"

    wall = float(pd.to_numeric(trained["wall_s"], errors="coerce").sum())
    start = pd.to_datetime(df["started_at"], utc=True, errors="coerce").min()
    end = pd.to_datetime(df["finished_at"], utc=True, errors="coerce").max()
    kv = [("torch", counts("torch_version")), ("project (study)", counts("project_version")),
          ("devices", counts("device")), ("hosts", counts("host")),
          ("Ray nodes", f"{trained['node_id'].replace('', np.nan).nunique():,}"
           if "node_id" in df else "unknown"),
          ("compute time", esc(_duration(wall)) + f" over {len(trained):,} trained cells"
           + (f" ({len(df) - len(trained):,} same-network twins recorded without training)"
              if len(df) > len(trained) else "")),
          ("first start, last finish", esc(f"{start:%Y-%m-%d %H:%M} – {end:%Y-%m-%d %H:%M} UTC")
           if pd.notna(start) and pd.notna(end) else "unknown")]
    import matplotlib
    import pyarrow
    kv.append(("report drawn with", esc(f"pandas {pd.__version__}, pyarrow {pyarrow.__version__}, "
                                        f"matplotlib {matplotlib.__version__}")))
    return '<dl class="kv">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in kv) + "</dl>"


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
    trained = df[df["same_network_as"].isna()] if "same_network_as" in df else df
    wall = float(pd.to_numeric(trained["wall_s"], errors="coerce").sum()) if len(df) else 0.0
    a, b = esc(res.a), esc(res.b)

    def c(k):
        return "unknown" if counts.get(k) is None else f"{counts[k]:,}"

    kv = [("results folder", esc(res.root.resolve())), ("spec from", esc(meta.get("origin", ""))),
          ("created", esc(meta.get("created_at", ""))), ("compared", f"{a} (a) vs {b} (b)"),
          ("cells in the grid", c("grid")), ("done (ok)", c("ok")), ("failed", c("failed")),
          ("diverged", c("diverged")), ("running", c("running")), ("pending", c("pending")),
          ("complete pairs", f"{len(res.pairs):,} of different networks"
           + (f" + {res.controls['n']:,} same-network controls" if res.controls.get("n") else "")),
          ("compute time", esc(_duration(wall)))]
    if counts.get("outside_spec"):
        kv.append(("rows outside the current spec", c("outside_spec")))
    notes = list(res.notes) + ([spec_note] if spec_note else [])
    figs = []
    n_cells = int((df["status"] == "ok").sum()) if len(df) else 0
    for stem, caption in FIGURES.items():
        if stem in res.pngs:
            num = len(figs) + 1
            cap = esc(caption.format(a=res.a, b=res.b, n=f"{len(res.pairs):,}",
                                     cells=f"{n_cells:,}"))
            figs.append(f'<figure id="fig{num}">{_img(res.pngs[stem], f"Figure {num}. {cap}")}'
                        f"<figcaption><b>Figure {num}.</b> {cap} (figures/{esc(stem)}.png, .pdf)"
                        "</figcaption></figure>")
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
        "<h2>Progress</h2><dl class=\"kv\">" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in kv)
        + "</dl>",
    ]
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f'<li class="note">{esc(n)}</li>' for n in notes)
                     + "</ul>")
    parts += ["<h2>Table 2: mean loss by Q bin</h2>", _table2_html(res.table2),
              "<h2>Table 2 of accuracy: mean accuracy by Q bin</h2>",
              _table2_html(res.table2_acc if res.table2_acc is not None else pd.DataFrame(),
                           "accuracy"),
              f"<h2>Statistics: {b} vs {a}</h2>", _stats_html(res),
              "<h2>Same-network pairs: the control</h2>", _controls_html(res),
              "<h2>Figures</h2>",
              f"<p>{esc(AXIS_RULE)} n is the number of pairs (or cells) each figure shows.</p>"
              if figs else "",
              "".join(figs) or '<p class="note">No figure could be drawn.</p>',
              "<h2>Failed and diverged cells</h2>", _failed_html(df),
              "<h2>Environment</h2>", _environment_html(res),
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
