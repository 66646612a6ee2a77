"""The report's table sections and their HTML helpers: escaping, number formatting and tables;
Table 2, seed noise, the statistics (equivalence, rank-based, training time), the same-network
control, the environment and the failed cells. report.py lays them out after its headline."""
from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd

from study.durations import long_duration
from study.trials import compute_seconds, trained_cells, training_modes

from ._common import PRETTY, dataset_label
from .compute import Analysis
from .frames import controls, swept_factors, table2_wide
from .report_plan import FAMILIES_PARAGRAPH, HOLM_MARK, holm_marked
from .stats import TIME_METRIC, arch_effect

MAX_FAILED_ROWS = 500  # a report stays readable; the store has every row


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
