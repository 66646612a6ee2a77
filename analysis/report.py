"""Layer 3c: one self-contained HTML report (figures inlined as base64 PNG, no scripts, no
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

from study.counts import StudyGrid, count_cells
from study.durations import long_duration
from study.store import StoreReader, atomic_write_text
from study.trials import compute_seconds, trained_cells, training_modes
from sweep import SpecError

from ._common import PRETTY, AnalysisError, dataset_label
from .captions import FIGURES
from .compute import Analysis
from .draw import AXIS_RULE
from .frames import controls, swept_factors, table2_wide
from .report_looks import looks_section
from .report_plan import (FAMILIES_PARAGRAPH, HOLM_MARK, HOLM_NOTE, exploratory_label,
                          family_interval, holm_marked, levels_sentence, margin_words, plan_html,
                          power_sentence)
from .stats import TIME_METRIC, arch_effect, noise_of
from .write import Written, analyse_draw_write

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
border-left:4px solid #4a6fa5;padding:.1em 1em} .headline li{margin:.35em 0}
.wide{overflow-x:auto} .alarm{color:#b00020;font-weight:700}
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


def _table(headers: list[str], rows: list[list[str]], left: int = 1, cls: str = "") -> str:
    """rows hold already-escaped HTML; the first `left` columns are left-aligned."""
    th = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


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


STATS_PARAGRAPH = """
<p><b>What these numbers show.</b> Each row compares {b} with {a} over the <i>settings</i> that
share every grid value except the architecture and are two different networks (the
same-network pairs, one network on both sides, are the control below and count in no row). The
seeds of a setting are repeats of one comparison, so each setting's log ratios log({b}/{a}) are
averaged over its seeds first: <i>n</i> counts settings, <i>runs</i> the seeds behind them.
<i>ratio</i> is exp of the mean log ratio, with t intervals at 90 % and 95 %. The equivalence
test is two one-sided t-tests (TOST) against the margin ±log(1+δ): both one-sided p-values are
shown, and the TOST p is the larger. Beside it, the ordinary two-sided paired t-test. Each p
(TOST, t-test) is Holm-adjusted within its family (below), and the verdict follows
Lakens' four outcomes on the adjusted p-values at alpha: <i>equivalent</i> (TOST significant,
t-test not), <i>equivalent but different</i> (both: a real effect smaller than the margin),
<i>different</i> (t-test only), <i>inconclusive</i> (neither). A row with fewer than 3 settings
gets no verdict.</p>
<p><b>What they do not show.</b> The settings are the cells of a designed grid, not a random
sample from a population of networks or tasks: a verdict says how the two architectures
compare across <i>this</i> grid, not that it would hold on other grids or datasets. {seeds}
"Equivalent" is relative to the margin: a different δ can change a verdict, which is why the
margin and where it came from are stated in the headline. The rank-based columns above (median
ratio with a bootstrap interval, the share of settings {b} wins with a Wilson interval, a
Wilcoxon signed-rank test) are counterparts that do not decide the verdict. Training times,
where shown, depend on the hardware and on how many cells shared it.</p>
"""


def _p(v) -> str:
    return _num(v, ".2g")


def _margin_text(res: Analysis, delta: float | None = None) -> str:
    if isinstance(res.margin, dict):
        return margin_words(res.margin)
    if res.margin == "seed":
        return "the seed noise of each row (δ = exp(median seed-to-seed |log ratio|) − 1)"
    d = res.margin if delta is None else delta
    return f"±{_num(100 * d, '.3g')} %"


def _stats_html(res: Analysis) -> str:
    s = res.stats
    if s.empty:
        return f'<p class="note">No complete {esc(res.a)}/{esc(res.b)} pairs: no statistics.</p>'
    a, b = esc(res.a), esc(res.b)
    eq_rows, rank_rows = [], []
    times = s[s["metric"] == TIME_METRIC]
    s = s[s["metric"] != TIME_METRIC]
    for r in s.itertuples(index=False):
        where = [esc(dataset_label(r.dataset)), esc(r.q_bin), esc(PRETTY.get(r.metric, r.metric))]
        mark = HOLM_MARK if holm_marked(r) else ""
        eq_rows.append(where + [f"{esc(r.family)} (m = {r.family_size})",
            f"{r.n} ({r.n_runs})", f"{_num(r.ratio, '.3f')}",
            f"[{_num(r.ratio_ci90_low, '.3f')}, {_num(r.ratio_ci90_high, '.3f')}]",
            f"[{_num(r.ratio_ci95_low, '.3f')}, {_num(r.ratio_ci95_high, '.3f')}]",
            f"[{_num(r.ratio_ci_family_low, '.3f')}, {_num(r.ratio_ci_family_high, '.3f')}]{mark} "
            f"({_num(100 * r.ci_family_level, '.3g')} %)",
            f"±{_num(100 * r.margin, '.3g')} %" + (" (seed)" if r.margin_source == "seed noise"
                                                   else " (pilot)" if r.margin_source ==
                                                   "pilot seed noise" else ""),
            f"{_p(r.p_lower)} / {_p(r.p_upper)}", f"{_p(r.p_tost)} ({_p(r.p_tost_holm)})",
            f"{_p(r.p_ttest)} ({_p(r.p_ttest_holm)})",
            f"<b>{esc(r.verdict)}</b>{mark}" + (f" <i>{esc(r.exploratory)}</i>"
                                                if r.exploratory else "")])
        rank_rows.append(where + [
            str(r.n), f"{_num(r.median_ratio, '.3f')} [{_num(r.ratio_ci_low, '.3f')}, "
                      f"{_num(r.ratio_ci_high, '.3f')}]",
            f"{r.b_wins}/{r.n} = {_num(r.win_rate_b, '.2f')} "
            f"[{_num(r.win_ci_low, '.2f')}, {_num(r.win_ci_high, '.2f')}]",
            _p(r.wilcoxon_p), _p(r.wilcoxon_p_holm)])
    eq_head = ["dataset", "Q bin", "loss", "family (rows)", "settings (runs)", f"ratio {b}/{a}",
               "90% CI", "95% CI", "CI at the verdict's level", "margin", "one-sided p: lower / upper", "TOST p (Holm)",
               "t-test p (Holm)", "verdict"]
    rank_head = ["dataset", "Q bin", "loss", "settings", f"median {b}/{a} [95% bootstrap CI]",
                 f"{b} wins [95% Wilson CI]", "Wilcoxon p", "Holm p"]
    seeds = (_one_seed_sentence() if res.noise is None or res.noise.empty else
             "Seed-to-seed noise is measured (table and figure above) and shown beside the "
             "architecture effect; a margin set from it says “no larger than what re-seeding "
             "does”.")
    return ("<h3>Equivalence</h3>" + '<div class="wide">' + _table(eq_head, eq_rows, left=3)
            + "</div><h3>Rank-based counterparts</h3>" + '<div class="wide">'
            + _table(rank_head, rank_rows, left=3, cls="num") + "</div>" + _time_html(res, times)
            + FAMILIES_PARAGRAPH + STATS_PARAGRAPH.format(a=a, b=b, seeds=seeds))


def _time_html(res: Analysis, times: pd.DataFrame) -> str:
    """The speed half of the claim: training time per epoch, b/a, outside the verdicts."""
    if times.empty:
        return ""
    a, b = esc(res.a), esc(res.b)
    rows = [[esc(dataset_label(r.dataset)), esc(r.q_bin), f"{r.n} ({r.n_runs})",
             f"{_num(r.median_ratio, '.3f')} [{_num(r.ratio_ci_low, '.3f')}, "
             f"{_num(r.ratio_ci_high, '.3f')}]", f"{_num(r.mean_a, '.3g')} s",
             f"{_num(r.mean_b, '.3g')} s"] for r in times.itertuples(index=False)]
    head = ["dataset", "Q bin", "settings (runs)", f"median {b}/{a} [95% bootstrap CI]",
            f"{a} s/epoch (geometric mean)", f"{b} s/epoch"]
    return ("<h3>Training time per epoch</h3>" + _table(head, rows, left=2, cls="num")
            + "<p>The training pass alone (no validation), the median over a cell's epochs; per "
            "setting the log ratio averaged over its seeds. These rows are outside the verdicts "
            "and the Holm families, and count cells trained one per trial only: a fused "
            f"cell's time is its group's{_fused_left_out(res)}. "
            "<b>They describe this hardware and this schedule</b>: "
            "times depend on the device, on how many cells shared it and on what else ran, so "
            "they say which layout was faster here, not in general.</p>")


def _fused_left_out(res: Analysis) -> str:
    n = training_modes(trained_cells(res.trials))["fused"]
    return f" ({n:,} fused cells left out)" if n else ""


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


def _one_seed_sentence() -> str:
    return ("Each setting was trained with one seed, so the seed-to-seed noise cannot be "
            "measured and the architecture effect cannot be set against it; add "
            "<code>seed = [0, 1]</code> to the spec's [grid] (then <code>study run</code> "
            "trains only the new seeds).")


def _noise_html(res: Analysis) -> str:
    """The seed-noise table beside the architecture effect measured the same way."""
    noise = res.noise
    if noise is None or noise.empty:
        return f'<p class="note">{_one_seed_sentence()}</p>'
    eff = arch_effect(res.pairs)
    eff_of = {(r.dataset, r.q_bin, r.metric): r for r in eff.itertuples(index=False)}
    archs = [x for x in (res.a, res.b) if (noise["architecture"] == x).any()]
    rows = []
    for r in noise[noise["architecture"] == "all"].itertuples(index=False):
        per_arch = []
        for x in archs:
            h = noise[(noise["dataset"] == r.dataset) & (noise["q_bin"] == r.q_bin)
                      & (noise["metric"] == r.metric) & (noise["architecture"] == x)]
            per_arch.append(f"{_num(h['median_ratio'].iloc[0], '.3f')} ({int(h['n_groups'].iloc[0])})"
                            if len(h) else "–")
        e = eff_of.get((r.dataset, r.q_bin, r.metric))
        rows.append([esc(dataset_label(r.dataset)), esc(r.q_bin), esc(PRETTY.get(r.metric, r.metric)),
                     f"{r.n_groups} ({r.n_seed_pairs})", _num(r.median_ratio, ".3f"),
                     _num(r.p90_ratio, ".3f"), *per_arch,
                     _num(e.median_ratio, ".3f") if e else "–", _num(e.p90_ratio, ".3f") if e else "–",
                     str(e.n_pairs) if e else "–"])
    head = ["dataset", "Q bin", "loss", "repeat groups (seed pairs)", "re-seeding: median",
            "90th pct", *[f"median {esc(x)} (groups)" for x in archs],
            f"swapping {esc(res.a)}↔{esc(res.b)}: median", "90th pct", "pairs"]
    return (_table(head, rows, left=3, cls="num") +
            "<p>Seed noise: the loss ratio (larger / smaller) between two seeds of one network, "
            "over every pair of seeds of every repeat group (cells that differ only in seed; "
            "same-network copies are not repeats), pooled over both architectures and per "
            "architecture. Beside it the architecture effect measured the same way: the ratio "
            "between the two architectures at each setting and seed. Where swapping moves the "
            "loss no more than re-seeding does, the grid cannot tell the architectures apart "
            "from noise.</p>")


def _table2_html(t2: pd.DataFrame, what: str = "loss") -> str:
    wide = table2_wide(t2, with_n=True)
    if wide.empty:
        return f'<p class="note">No finished cell with a known Q: no Table 2 of {what}.</p>'
    rows = [[esc(idx), *[esc(c) for c in row]] for idx, row in
            zip(wide.index, wide.itertuples(index=False))]
    return (_table([""] + [esc(c) for c in wide.columns], rows, cls="num") +
            f"<p>Mean {what}, train / validation, over the cells with status ok in each bin of "
            "Q = training examples × classes / parameters; n = cells averaged (– : no cell). "
            "A same-network copy is both architectures and counts in both rows.</p>")


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
    c = controls(res.all_pairs)
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
            "sweep/same_network.py, or the column same_network_as). A study run trains it once and "
            "records it under both cells; in a store that trained both, equal numbers show that "
            "the two sides really see the same weights and batches.</p>")


def _environment_html(res: Analysis) -> str:
    df = res.trials
    if df.empty:
        return "<p>No finished cell: nothing recorded.</p>"
    trained = trained_cells(df)

    def counts(col: str) -> str:
        if col not in df:
            return "unknown"
        v = trained[col].fillna("").astype(str).replace("", "(not recorded)").value_counts()
        return ", ".join(f"{esc(k)} ({n:,} cells)" for k, n in v.items()) or "unknown"

    wall = compute_seconds(trained)
    start = pd.to_datetime(df["started_at"], utc=True, errors="coerce").min()
    end = pd.to_datetime(df["finished_at"], utc=True, errors="coerce").max()
    kv = [("torch", counts("torch_version")), ("project (study)", counts("project_version")),
          ("devices", counts("device")), ("hosts", counts("host")),
          ("Ray nodes", f"{trained['node_id'].replace('', np.nan).nunique():,}"
           if "node_id" in df else "unknown"),
          ("compute time", esc(long_duration(wall)) + f" over {len(trained):,} trained cells"
           + (f" ({len(df) - len(trained):,} same-network copies recorded without training)"
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
