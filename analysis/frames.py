"""Layer 1a: the results store as tidy DataFrames (trials, epochs, pairs, Table 2).

Pure pandas: every function takes and returns DataFrames, nothing is drawn or written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from study import live, schema
from study.store import ReadReport, StoreReader
from study.trials import variant_labels
from sweep import same_network
from sweep.params import ARCH_SPECIFIC

from ._common import (METRICS, Q_LABELS, AnalysisError, add_q, arch_order, check_compare,
                      check_store, dataset_label, dataset_order)

# Grid parameters a cell shares with its twins (pair_key is a hash of exactly these).
SHARED_PARAMS = [c for c in schema.PARAM_COLUMNS
                 if c != "architecture" and c not in ARCH_SPECIFIC]
# Columns that differ between the two sides of a pair and get the _a / _b suffix.
SIDE_COLUMNS = ["cell_id", "architecture", "n_params", "filters_used", "epochs_done",
                "wall_s", "q", "q_bin", "network_id", "same_network_as", *METRICS]
PAIR_METRICS = METRICS
# Per-cell timing a caller may add to the trials frame (see `train_time`): it gets a side each,
# and settings average its log ratio over seeds like a loss.
TIME_COLUMNS = ("train_s_per_epoch",)


def load(root: str | Path, report: ReadReport | None = None,
         columns: Iterable[str] | None = None) -> pd.DataFrame:
    """All trial rows of the store at `root` (every status), plus `q` and `q_bin`.

    `columns`: read only these (plus what `q` needs); default every column. Unreadable files
    are skipped (never quarantined: analysis only reads); pass a ReadReport to learn of them.
    """
    root = check_store(root)
    if columns is not None:
        columns = list(dict.fromkeys([*columns, "cell_id", "status", "n_train", "n_classes",
                                      "n_params"]))
    df = StoreReader(root).read_trials(quarantine=False, report=report, columns=columns, live=True)
    return add_q(df)


def live_files(root: str | Path, table: str = "trials") -> list[str]:
    """The files to read for `table` ("trials" or "epochs") of the store at `root`, running or
    not: each landed cell is in exactly one of them, and each stays readable for
    study.live.RETAIN_S seconds after a compaction replaced it (call this again for every
    read). For `duckdb read_parquet([...], union_by_name=true)`, `pl.read_parquet([...])`,
    `pd.read_parquet([...])`, `pyarrow.dataset.dataset([...])`. A store that no `study run`
    of this version has touched has no manifest: then the folder's files, as the glob sees them."""
    root = check_store(root)
    if table not in live.TABLES:
        raise AnalysisError(f"table must be 'trials' or 'epochs', not {table!r}")
    files = live.live_files(root, table)
    if files is None:
        files = sorted(str(p) for p in (root / table).glob("*.parquet"))
    return files


def load_epochs(root: str | Path, cell_ids: Iterable[str] | None = None,
                report: ReadReport | None = None) -> pd.DataFrame:
    """Per-epoch rows (schema EPOCHS) of every cell, or only of `cell_ids`.

    With `cell_ids` only the files and row groups that can hold those cells are read (merged
    files are sorted by cell_id), so learning curves stay cheap on a large store; an
    unreadable file is skipped (and listed in `report`).
    """
    root = check_store(root)
    store = StoreReader(root)
    if cell_ids is not None:
        cell_ids = list(dict.fromkeys(cell_ids))
    df = store.read_epochs(quarantine=False, report=report, cell_ids=cell_ids, live=True)
    return df.sort_values(["cell_id", "epoch"], kind="stable").reset_index(drop=True)


def pairs(df: pd.DataFrame, a: str = "sequential", b: str = "parallel") -> pd.DataFrame:
    """One row per (a cell, b cell) twin pair at the same settings; only status 'ok' pairs.

    Columns:
      pair_key, the shared grid parameters (dataset, layers, filters, ...) once, unsuffixed;
      per side, with suffix `_a` (architecture `a`) or `_b` (architecture `b`): cell_id,
        architecture, n_params, filters_used, epochs_done, wall_s, q, q_bin, the metrics
        (train/val/test loss and accuracy), the architecture-specific parameters that side
        has (e.g. gate_b), and `variant_a` / `variant_b`, a readable summary of the ones
        that vary on that side ('' when that side has a single variant);
      `<metric>_ratio` = b / a and `<metric>_diff` = b - a for every metric (ratio NaN where
        a is 0 or either side is missing);
      `q`, `q_bin`: side a's determination ratio and bin.
    A cell of `a` matching several variants of `b` (e.g. highway gates) gives one row each.
    """
    check_compare(a, b)
    if "q" not in df.columns:
        df = add_q(df)
    ok = df[df["status"] == "ok"]
    ok = ok.assign(network_id=network_ids(ok))
    if "same_network_as" not in ok.columns:  # a frame from before the column existed
        ok = ok.assign(same_network_as=None)
    sides = []
    for arch, suf in ((a, "_a"), (b, "_b")):
        side = ok[ok["architecture"] == arch]
        specific = [c for c in ARCH_SPECIFIC if c in side.columns and side[c].notna().any()]
        cols = SIDE_COLUMNS + [c for c in TIME_COLUMNS if c in side.columns] + specific
        out = side[cols].rename(columns={c: c + suf for c in cols})
        out["variant" + suf] = variant_labels(side)
        out.insert(0, "pair_key", side["pair_key"])
        if suf == "_a":
            for c in SHARED_PARAMS:
                out[c] = side[c]
        sides.append(out)
    merged = sides[0].merge(sides[1], on="pair_key", how="inner")
    for m in PAIR_METRICS + tuple(c for c in TIME_COLUMNS if c + "_a" in merged.columns):
        va = pd.to_numeric(merged[m + "_a"], errors="coerce").astype(float)
        vb = pd.to_numeric(merged[m + "_b"], errors="coerce").astype(float)
        merged[m + "_diff"] = vb - va
        merged[m + "_ratio"] = (vb / va.where(va != 0)).replace([np.inf, -np.inf], np.nan)
    merged["q"] = merged["q_a"]
    merged["q_bin"] = merged["q_bin_a"]
    # One network on both sides (by the marker a run wrote, or by the rule for older stores).
    merged["same_network"] = ((merged["network_id_a"] == merged["network_id_b"])
                              | (merged["same_network_as_a"] == merged["cell_id_b"])
                              | (merged["same_network_as_b"] == merged["cell_id_a"]))
    lead = ["pair_key", *SHARED_PARAMS]
    merged = merged[lead + [c for c in merged.columns if c not in lead]]
    order = {d: i for i, d in enumerate(dataset_order(merged["dataset"]))}
    merged = (merged.assign(_d=merged["dataset"].map(order))
              .sort_values(["_d", "pair_key", "cell_id_b"], kind="stable")
              .drop(columns="_d").reset_index(drop=True))
    return merged


LOSS_METRICS = tuple(m for m in METRICS if m.endswith("_loss"))
LOG_SCALED = LOSS_METRICS + TIME_COLUMNS  # averaged over seeds on the log scale


def train_time(root: str | Path, cell_ids: Iterable[str] | None = None,
               report: ReadReport | None = None) -> pd.Series:
    """Training time per epoch of each cell (the median of its epochs' training-only
    `train_s`, so a first epoch's warm-up does not count), indexed by cell_id; empty for a
    store written before epochs recorded it."""
    if "train_s" not in schema.EPOCH_COLUMNS:
        return pd.Series(dtype=float)
    ep = StoreReader(check_store(root)).read_epochs(quarantine=False, report=report,
                                              columns=["cell_id", "train_s"],
                                              cell_ids=None if cell_ids is None else list(cell_ids),
                                              live=True)
    ep = ep.dropna(subset=["train_s"])
    return ep.groupby("cell_id")["train_s"].median() if len(ep) else pd.Series(dtype=float)


def setting_columns(pairs_df: pd.DataFrame) -> list[str]:
    """What makes a setting: every shared grid parameter but the seed, and each side's
    architecture-specific parameters (a highway gate, a number of branches)."""
    shared = [c for c in SHARED_PARAMS if c != "seed" and c in pairs_df.columns]
    variant = [c + suf for suf in ("_a", "_b") for c in ARCH_SPECIFIC if c + suf in pairs_df.columns]
    return shared + variant


def settings(pairs_df: pd.DataFrame) -> pd.DataFrame:
    """One row per setting: the pairs that differ only in `seed` are repeats of one deep/shallow
    comparison and are averaged into one (the unit of evidence of every statistic and pair
    figure). Same-network pairs are left out.

    Columns: the setting's parameters (as in `pairs`, without seed), architecture_a/_b,
    variant_a/_b, q/q_bin, `n_seeds` (pairs averaged), `cell_id_a`/`cell_id_b` of its first
    seed; per loss metric `<m>_log_ratio` = mean over seeds of log(b/a), `<m>_a`/`<m>_b` the
    geometric means (so `<m>_ratio` = exp(<m>_log_ratio) = b/a of those); per accuracy the
    arithmetic means and their ratio; `<m>_diff` = mean of b - a.
    """
    p = evidence(pairs_df)
    keys = setting_columns(p)
    cols = [*keys, "architecture_a", "architecture_b", "variant_a", "variant_b", "q", "q_bin",
            "n_seeds", "cell_id_a", "cell_id_b", "wall_s_a", "wall_s_b"]
    if p.empty:
        return pd.DataFrame(columns=cols)
    work = p.assign(_g=p.groupby(keys, dropna=False, sort=False).ngroup())
    agg = {"n_seeds": ("pair_key", "size")}
    for c in ("architecture_a", "architecture_b", "variant_a", "variant_b", "q", "cell_id_a",
              "cell_id_b", *keys):
        if c in work.columns:
            agg[c] = (c, "first")
    agg["q_bin"] = ("q_bin", "first")
    for c in ("wall_s_a", "wall_s_b"):
        agg[c] = (c, "mean")
    metrics = METRICS + tuple(c for c in TIME_COLUMNS if c + "_a" in work.columns)
    for m in metrics:
        for suf in ("_a", "_b"):
            v = pd.to_numeric(work[m + suf], errors="coerce").astype(float)
            if m in LOG_SCALED:
                work["_l" + m + suf] = np.log(v.where(v > 0))
                agg["_l" + m + suf] = ("_l" + m + suf, "mean")
            else:
                work["_v" + m + suf] = v
                agg[m + suf] = ("_v" + m + suf, "mean")
        work["_d" + m] = (pd.to_numeric(work[m + "_b"], errors="coerce").astype(float)
                          - pd.to_numeric(work[m + "_a"], errors="coerce").astype(float))
        agg[m + "_diff"] = ("_d" + m, "mean")
    out = work.groupby("_g", sort=True).agg(**agg).reset_index(drop=True)
    for m in metrics:
        if m in LOG_SCALED:
            la, lb = out.pop("_l" + m + "_a"), out.pop("_l" + m + "_b")
            out[m + "_a"], out[m + "_b"] = np.exp(la), np.exp(lb)
            out[m + "_log_ratio"] = lb - la
            out[m + "_ratio"] = np.exp(out[m + "_log_ratio"])
        else:
            va = out[m + "_a"]
            out[m + "_ratio"] = (out[m + "_b"] / va.where(va != 0)).replace([np.inf, -np.inf], np.nan)
    out["q_bin"] = pd.Categorical(out["q_bin"], categories=list(Q_LABELS), ordered=True)
    out["same_network"] = False
    return out


def network_ids(df: pd.DataFrame) -> pd.Series:
    """Each row's network identity (sweep.same_network.network_id of its config): rows with equal ids
    are one network trained once (or, in a store from before the rule, trained twice).

    A row no same-network rule matches is its own network, whose id is its cell_id (the hash
    of its config): only the rows a rule matches are hashed (100,000 rows: ~20 s -> well
    under a second)."""
    if df.empty:
        return pd.Series([], index=df.index, dtype=object)
    out = df["cell_id"].astype(object).copy()
    cols = [c for c in schema.PARAM_COLUMNS if c in df.columns]
    for arch, (rule, _why) in same_network.SAME_AS_SEQUENTIAL.items():
        sub = df[df["architecture"] == arch]
        if sub.empty:
            continue
        values = [sub[c].to_numpy(object) for c in cols]
        for label, *row in zip(sub.index, *values):
            raw = dict(zip(cols, row))
            if rule(raw):
                out[label] = same_network.network_id(same_network.config_from_row(raw))
    return out


def evidence(pairs_df: pd.DataFrame) -> pd.DataFrame:
    """The pairs that compare two different networks (what statistics and figures use)."""
    if "same_network" not in pairs_df.columns:
        return pairs_df
    return pairs_df[~pairs_df["same_network"].astype(bool)]


def controls(pairs_df: pd.DataFrame) -> pd.DataFrame:
    """The same-network pairs: one network on both sides, so every number must be equal."""
    if "same_network" not in pairs_df.columns:
        return pairs_df.iloc[0:0]
    return pairs_df[pairs_df["same_network"].astype(bool)]


CONTROL_METRICS = ("train_loss", "val_loss", "test_loss", "train_acc", "val_acc", "test_acc")


def control_summary(pairs_df: pd.DataFrame) -> dict:
    """n same-network pairs, how many have bit-identical metrics on both sides, and the
    pair_keys of those that do not (a broken pairing or a non-deterministic run)."""
    c = controls(pairs_df)
    same = pd.Series(True, index=c.index)
    for m in CONTROL_METRICS:
        if m + "_a" in c.columns:
            va, vb = c[m + "_a"].astype(float), c[m + "_b"].astype(float)
            same &= (va == vb) | (va.isna() & vb.isna())
    copied = c["same_network_as_a"].notna() | c["same_network_as_b"].notna()
    return {"n": int(len(c)), "identical": int(same.sum()),
            "recorded_once": int(copied.sum()),
            "differing": list(c.loc[~same, "pair_key"].astype(str)),
            "max_abs_diff": float(np.nanmax(np.abs(
                c["val_loss_a"].astype(float) - c["val_loss_b"].astype(float))))
            if len(c) and c["val_loss_a"].notna().any() else 0.0}


def swept_factors(pairs_df: pd.DataFrame) -> list[str]:
    """Columns of a pairs frame that vary: shared grid axes, then variant axes of either side."""
    out = [c for c in SHARED_PARAMS if c != "dataset" and c in pairs_df.columns
           and pairs_df[c].nunique(dropna=True) > 1]
    for suf in ("_a", "_b"):
        out += [c + suf for c in ARCH_SPECIFIC if c + suf in pairs_df.columns
                and pairs_df[c + suf].nunique(dropna=True) > 1]
    return out


# -- Table 2 ---------------------------------------------------------------------------------
def table2(df: pd.DataFrame, metrics=("train_loss", "val_loss")) -> pd.DataFrame:
    """Mean train and validation loss (or `metrics`) per dataset x architecture x Q bin over
    'ok' cells.

    Tidy: columns dataset, architecture, q_bin, n (cells averaged), then the metrics; one
    row per combination that has at least one cell. Every architecture present is included;
    a same-network copy counts under both architectures (it is both networks).
    """
    if "q_bin" not in df.columns:
        df = add_q(df)
    ok = df[(df["status"] == "ok") & df["q_bin"].notna()]
    cols = ["dataset", "architecture", "q_bin", "n", *metrics]
    if ok.empty:
        return pd.DataFrame(columns=cols)
    t = (ok.groupby(["dataset", "architecture", "q_bin"], observed=True)
         .agg(n=("cell_id", "size"), **{m: (m, "mean") for m in metrics})
         .reset_index())
    t["q_bin"] = t["q_bin"].astype(str)
    t = t.assign(_d=t["dataset"].map({d: i for i, d in enumerate(dataset_order(t["dataset"]))}),
                 _a=t["architecture"].map({x: i for i, x in enumerate(arch_order(t["architecture"]))}),
                 _q=t["q_bin"].map({q: i for i, q in enumerate(Q_LABELS)}))
    t = t.sort_values(["_d", "_a", "_q"], kind="stable")
    return t[cols].reset_index(drop=True)


def fmt_loss(v: float) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    if v != 0 and abs(v) < 1e-3:
        return f"{v:.2e}"
    return f"{v:.5f}"


def table2_wide(t2: pd.DataFrame, with_n: bool = False) -> pd.DataFrame:
    """Table 2 in the paper's layout: index 'DATASET arch', columns 'Q∈bin', cells 'train / val'
    (the two metric columns of t2 after n; ' (n = k)' appended with `with_n`)."""
    cols = [f"Q∈{q}" for q in Q_LABELS]
    if t2.empty:
        return pd.DataFrame(columns=cols)
    m1, m2 = [c for c in t2.columns if c not in ("dataset", "architecture", "q_bin", "n")][:2]
    fmt = fmt_loss if m1.endswith("_loss") else (lambda v: "–" if not np.isfinite(v) else f"{v:.4f}")
    cell = t2[m1].map(fmt) + " / " + t2[m2].map(fmt)
    if with_n:
        cell = cell + " (n = " + t2["n"].astype(int).astype(str) + ")"
    label = t2["dataset"].map(dataset_label) + " " + t2["architecture"]
    wide = (pd.DataFrame({"row": label, "q": "Q∈" + t2["q_bin"], "cell": cell})
            .pivot(index="row", columns="q", values="cell"))
    rows = list(dict.fromkeys(label))  # t2 is already in dataset, architecture order
    return (wide.reindex(index=rows, columns=cols).astype(object).fillna("–")
            .rename_axis(index=None, columns=None))


def table2_markdown(t2: pd.DataFrame) -> str:
    wide = table2_wide(t2)
    head = "| | " + " | ".join(wide.columns) + " |"
    sep = "|---" * (len(wide.columns) + 1) + "|"
    body = ["| " + " | ".join([str(idx), *map(str, row)]) + " |"
            for idx, row in zip(wide.index, wide.itertuples(index=False))]
    note = ("\nMean loss over the cells with status ok, train / val; – = no cell in that bin. "
            "Q = training examples × classes / parameters.\n")
    return "\n".join([head, sep, *body]) + "\n" + note


def choose_curve_pairs(pairs_df: pd.DataFrame, have_epochs: set[str] | None = None) -> list[int]:
    """Row positions of the pairs with the largest, smallest and median val-loss ratio
    (among pairs whose both cells have epochs, when `have_epochs` is given)."""
    p = pairs_df[pairs_df["val_loss_ratio"].notna()]
    if have_epochs is not None:
        p = p[p["cell_id_a"].isin(have_epochs) & p["cell_id_b"].isin(have_epochs)]
    if p.empty:
        return []
    s = p["val_loss_ratio"].sort_values(kind="stable")
    picks = [s.index[-1], s.index[0], s.index[(len(s) - 1) // 2]]
    return list(dict.fromkeys(picks))


def resolve_pair_keys(pairs_df: pd.DataFrame, keys: Iterable[str]) -> tuple[list[int], list[str]]:
    """Row positions of the given pair_keys (a unique prefix is enough); unknown keys listed."""
    all_keys = pairs_df["pair_key"].astype(str)
    rows, unknown = [], []
    for k in keys:
        k = str(k).strip()
        hit = all_keys[all_keys == k]
        if hit.empty and k:
            hit = all_keys[all_keys.str.startswith(k)]
            if hit.nunique() > 1:
                unknown.append(f"{k} (ambiguous prefix)")
                continue
        if hit.empty:
            unknown.append(k)
        rows += list(hit.index)
    return list(dict.fromkeys(rows)), unknown
