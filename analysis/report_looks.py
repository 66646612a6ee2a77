"""The report's "Looks" section: each look of a study grown by `study run --until-decided`
(DIR/design.json): its seeds, and per primary row the information fraction, the boundary,
n and the decision."""
from __future__ import annotations

from pathlib import Path

from study.sequential_run import read_design

from .report_plan import esc

LOSS = {"train_loss": "training loss", "val_loss": "validation loss"}


def _f(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def looks_html(root: str | Path) -> str:
    """The section's HTML, or "" for a study without a sequential design."""
    rec = read_design(root)
    if not rec or not rec.get("looks"):
        return ""
    head = (f"<p>A sequential design of {rec['looks_planned']} planned looks, each adding the "
            "next seed to every setting. The level is spent over the looks by the Lan–DeMets "
            "O'Brien–Fleming function on the information fractions estimated at each look "
            "(I = n / (σ²_between + σ²_within / seeds)); each primary row gets α/m "
            "(Bonferroni). A row stops when its TOST p-value is below the look's nominal "
            "level; stopping for <i>difference</i> is not allowed (the t-test is judged at the "
            "last look only). The headline above tests all the data once; the decisions "
            "below are the design's. "
            + (f"Stopped: {esc(rec['stopped'])}." if rec.get("stopped") else "Not finished.")
            + " (design.json)</p>")
    rows = []
    for look in rec["looks"]:
        for r in look["rows"]:
            early = f" (look {r['decided_at_look']})" if r.get("stopped_earlier") else ""
            rows.append(
                f"<tr><td>{look['look']}</td><td>{esc(', '.join(map(str, look['seeds'])))}</td>"
                f"<td>{esc(r['dataset'])}</td><td>{esc(LOSS.get(r['metric'], r['metric']))}</td>"
                f"<td>{r['n']}</td><td>{_f(r.get('information_fraction'), '.2f')}</td>"
                f"<td>{_f(r.get('boundary_z'), '.3f')}</td><td>{_f(r.get('nominal_p'), '.4g')}</td>"
                f"<td>{_f(r.get('p_tost'), '.4g')}</td>"
                f"<td>{esc(r['decision'])}{esc(early)}</td></tr>")
    return (head + "<table><thead><tr><th>look</th><th>seeds</th><th>dataset</th><th>loss</th>"
            "<th>n (settings)</th><th>information fraction</th><th>boundary z</th>"
            "<th>nominal p</th><th>TOST p</th><th>decision</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def looks_section(root) -> str:
    """The "Looks" heading and section, or "" without a sequential design."""
    body = looks_html(root)
    return f"<h2>Looks</h2>{body}" if body else ""
