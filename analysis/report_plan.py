"""The report's plan-related pieces: the saved analysis plan, each headline's interval at the
level its verdict used (with the Holm mark), and the next step from the power calculation.
(Kept apart from report.py, which is long enough.)"""
from __future__ import annotations

import html

import numpy as np

from sweep.spec import SEED_MARGIN

from .study_power import power_of

HOLM_MARK = "†"
HOLM_NOTE = (f"{HOLM_MARK} Holm's step-down adjustment decides this row where the Bonferroni "
             "interval of its family does not: the verdict stands (Holm controls the family's "
             "error), but the interval drawn is the more conservative one.")


def esc(x) -> str:
    return html.escape(str(x))


def _num(v, fmt: str) -> str:
    try:
        return "–" if v is None or not np.isfinite(float(v)) else format(float(v), fmt)
    except (TypeError, ValueError):
        return "–"


def margin_words(margin) -> str:
    if isinstance(margin, dict):
        return "from the pilot's seed noise, per dataset, Q bin and loss (fixed in the plan)"
    if margin == SEED_MARGIN:
        return "the seed noise of this study's own data"
    return f"±{_num(100 * float(margin), '.3g')} %"


def holm_marked(r) -> bool:
    """Whether a stats row is decided by Holm where its Bonferroni interval is not (time rows,
    outside the families, hold NaN there)."""
    v = getattr(r, "holm_only", False)
    return bool(v) if isinstance(v, (bool, np.bool_)) else False


def family_interval(r) -> str:
    """'97.5 % interval [lo, hi]' at the level the row's verdict used (the Bonferroni interval
    of its family, 1 - 2 alpha / m), with the Holm mark."""
    level = getattr(r, "ci_family_level", np.nan)
    lo, hi = getattr(r, "ratio_ci_family_low", np.nan), getattr(r, "ratio_ci_family_high", np.nan)
    mark = HOLM_MARK if holm_marked(r) else ""
    return f"{_num(100 * level, '.3g')} % interval [{_num(lo, '.3f')}, {_num(hi, '.3f')}]{mark}"


def levels_sentence(stats_df, alpha: float) -> str:
    """How the headline's intervals are set: the primary family's size and level."""
    top = stats_df[stats_df["q_bin"] == "all"] if "family_size" in stats_df.columns else None
    if top is None or top.empty:
        return ""
    m = int(top["family_size"].max())
    return (f"Headline rows are the primary family: Holm-adjusted among themselves (m = {m}) at "
            f"alpha {_num(alpha, 'g')}, each interval at the verdict's level, "
            f"1 − 2α/m = {_num(100 * (1 - 2 * alpha / max(m, 1)), '.3g')} % (Bonferroni).")


def _count(v) -> int | None:
    """An int, or None for a count that was not reachable (None or NaN in a frame)."""
    try:
        return None if v is None or not np.isfinite(float(v)) else int(v)
    except (TypeError, ValueError):
        return None


def power_sentence(res, r) -> str:
    """The power the study had for a headline row, and for an inconclusive one the next step."""
    p = power_of(res.power, r.dataset, r.metric)
    if p is None:
        return ""
    text = (f" Power of this test: {_num(p.power_at_1, '.2f')} at a true ratio of 1, "
            f"{_num(p.power_at_ratio, '.2f')} at the measured ratio (at level "
            f"{_num(p.level, '.3g')}, if the variance is as measured).")
    if r.verdict != "inconclusive":
        return text
    upper = (f"80 % upper limits σ²<sub>between</sub> {_num(p.sigma2_between_upper, '.3g')}, "
             f"σ²<sub>within</sub> {_num(p.sigma2_within_upper, '.3g')}"
             if np.isfinite(p.sigma2_within_upper) else
             f"80 % upper limit of the settings' variance {_num(p.var_setting_mean_upper, '.3g')}")
    seeds, n = _count(p.seeds_needed), _count(p.settings_needed)
    if seeds is None and n is None:
        return text + (" The measured ratio lies outside the margin: more seeds or settings "
                       "alone would not make the two equivalent.")
    parts = []
    if seeds is not None:
        parts.append(f"{int(seeds) - p.seeds} more seeds per setting ({int(seeds)})")
    if n is not None:
        parts.append(f"{int(n) - p.n:,} more settings ({int(n):,})")
    what = " (or ".join(parts) + (")" if len(parts) == 2 else "")
    cannot = (" Seeds alone cannot get there: σ²<sub>between</sub> dominates." if p.seeds_cannot is True
              else " Seed noise is unmeasured (one seed per setting), so only settings are "
              "counted." if not np.isfinite(p.sigma2_within) else "")
    return text + (f" Next step: {what} give 80 % power, if the variance is as measured "
                   f"({upper}).{cannot}" if what else cannot)


def exploratory_label(res) -> str:
    return f' <i class="note">{esc(res.exploratory)}</i>' if res.exploratory else ""


def plan_html(res) -> str:
    """The analysis plan as saved in the folder, its changes, and what it means here."""
    plan = res.plan
    if plan is None:
        return ("<p>No analysis plan is saved in this folder (it is saved by the <code>study "
                "run</code> that lands the first cell). The verdicts below use "
                f"{esc(margin_words(res.margin))} and alpha {_num(res.alpha, 'g')}.</p>")
    when = "before the first cell landed" if plan.get("before_data", True) else (
        "after data (the store predates saved plans)")
    first = (f"margin {esc(margin_words(plan.get('margin')))}"
             + (f" from pilot <code>{esc(plan['pilot'])}</code>" if plan.get("pilot") else "")
             + f", alpha {_num(plan.get('alpha'), 'g')}")
    items = [f"<li>{esc(plan.get('recorded_at', ''))}: {first}, recorded {when}.</li>"]
    for c in plan.get("changes", []):
        items.append(f"<li>{esc(c.get('recorded_at', ''))}: changed by {esc(c.get('source'))} "
                     f"to margin {esc(margin_words(c.get('margin')))}"
                     + (f", alpha {_num(c.get('alpha'), 'g')}" if c.get("alpha") else "")
                     + (" (after data)" if c.get("after_data") else " (before data)") + ".</li>")
    status = (f'<p class="note">The verdicts of this report are {esc(res.exploratory)}.</p>'
              if res.exploratory else
              '<p class="ok">The verdicts of this report follow the plan.</p>')
    return (f"<p>The analysis plan (<code>analysis_plan.json</code>), fixed before the data it "
            "judges:</p><ul>" + "".join(items) + "</ul>" + status)


FAMILIES_PARAGRAPH = """<p><b>Two families.</b> The headline rows (each dataset × loss over all
Q bins, the paper's claim) are the primary family, Holm-adjusted among themselves; the rows of
each Q bin are a secondary family per dataset × loss, Holm-adjusted within it. Each row shows
the raw p-value and, in brackets, the Holm-adjusted one, and the interval at the level its
verdict used: the family's Bonferroni interval, 1 − 2α/m. A row marked {mark} is decided by
Holm where that interval still crosses the margin.</p>""".format(mark=HOLM_MARK)
