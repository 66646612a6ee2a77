"""Lesion analysis (Greff et al., "Highway and Residual networks learn unrolled iterative
estimation"): for every cell whose weights were saved, the validation loss of the intact net,
of the net with one block removed, and of the net with two adjacent blocks swapped.

If a stage of blocks iteratively refines one representation, dropping or reordering a block
costs little (residual, highway); a plain net, which computes a new representation per layer,
breaks. A parallel net sums its blocks, so a swap changes nothing at all.

Output: DIR/lesions/lesions.parquet (and notes.txt: what was skipped and why). Computing only:
the figure is drawn from that table by analysis (`analysis.write_lesion_figure`, also part of
`study figures` and the report), like every other figure.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch


from . import data as _data
from .atomic import atomic_write, atomic_write_text
from .errors import DatasetError
from .models import build, image_size_for, model_kwargs
from .store import Store, StoreError
from .train import evaluate
from .trials import variant_labels

# Families whose blocks cannot be dropped or reordered meaningfully: why (becomes a note).
SKIP = {
    "learned_connectivity": "its blocks are wired to each other by learned masks; dropping or "
                            "reordering one breaks the wiring instead of lesioning a block",
}
# Families whose body is a sum over blocks: any order is the same function. They are evaluated
# in index order, so a swap is exactly a no-op instead of differing by float rounding.
ORDER_FREE = {"parallel"}

COLUMNS = ["cell_id", "architecture", "variant", "dataset", "layers", "filters", "filters_used",
           "kernel", "n_blocks", "lesion", "position", "val_loss", "val_loss_intact",
           "loss_increase"]


class LesionError(StoreError):
    """Nothing in the results folder can be lesioned; the one-line message says why.
    (A StoreError, so the CLI reports it like any other problem with the folder.)"""


def lesion_orders(n_blocks: int) -> list[tuple[str, int | None, list[int]]]:
    """(lesion, position, block order): intact, each block removed, each adjacent pair swapped."""
    out = [("intact", None, list(range(n_blocks)))]
    for i in range(n_blocks):
        out.append(("remove", i, [j for j in range(n_blocks) if j != i]))
    for i in range(n_blocks - 1):
        order = list(range(n_blocks))
        order[i], order[i + 1] = order[i + 1], order[i]
        out.append(("swap", i, order))
    return out


def load_model(path: Path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild a cell's model from its weights file (train.py's format) in eval mode."""
    saved = torch.load(path, map_location=device, weights_only=True)
    config = saved["config"]
    kw = {**model_kwargs(config), "filters": int(saved["filters_used"]),
          "image_size": image_size_for(config, saved.get("image_size"))}
    model = build(config["architecture"], in_channels=int(saved["in_channels"]),
                  n_classes=int(saved["n_classes"]), **kw)
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval(), saved


def _variant_labels(rows: pd.DataFrame) -> pd.Series:
    """architecture, plus the architecture-specific options that vary within it in this study
    (e.g. "highway gate=full"), so that each variant gets its own line in the figure."""
    labels = variant_labels(rows, sep=" ")
    arch = rows["architecture"].astype(str)
    return arch.where(labels == "", arch + " " + labels)


class _Skip(Exception):
    """A cell that cannot be lesioned; the message is its note. `dataset` is set when the
    cell's dataset cannot be loaded: the later cells of that dataset are skipped unnoted."""

    def __init__(self, note: str, dataset: str | None = None):
        super().__init__(note)
        self.dataset = dataset


def _saved_cells(root: Path) -> pd.DataFrame:
    """The finished cells whose weights were saved, each with its variant label."""
    trials = Store(root).read_trials(live=True)  # a study may be running
    saved = trials[(trials["status"] == "ok") & trials["weights_path"].notna()]
    if saved.empty:
        raise LesionError(f"no cell in {root} has saved weights; run the study with "
                          "save_weights = true in its [study] table")
    return saved.assign(variant=_variant_labels(saved))


def _cell_inputs(trial: pd.Series, path: Path, data_dir: str | Path | None, device: str):
    """(model, weights file contents, data) of one cell; raises _Skip saying why not."""
    try:
        model, saved_file = load_model(path, device)
    except Exception as e:  # truncated file, foreign format, mismatched state dict, ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _Skip(f"cell {trial['cell_id']} skipped: cannot rebuild it from {path}: {first}")
    config = saved_file["config"]
    try:
        data = _data.load(config["dataset"], data_dir, val_fraction=config["val_fraction"],
                          max_train_examples=config.get("max_train_examples"), device=device)
    except DatasetError as e:
        raise _Skip(f"{config['dataset']} cells skipped: {e}", dataset=config["dataset"])
    if len(data.val_x) == 0:
        raise _Skip(f"cell {trial['cell_id']} skipped: val_fraction = 0 leaves no validation set")
    return model, saved_file, data


def _lesion_rows(trial: pd.Series, model: torch.nn.Module, saved_file: dict,
                 data: "_data.Data") -> list[dict]:
    """The validation loss of one cell under every lesion; intact comes first, so each row
    also carries the intact loss and the increase over it."""
    arch, config, n_blocks = trial["architecture"], saved_file["config"], len(model.blocks)
    rows, intact = [], None
    for lesion, position, order in lesion_orders(n_blocks):
        if arch in ORDER_FREE:
            order = sorted(order)
        loss, _ = evaluate(model, data.val_x, data.val_y, None if lesion == "intact" else order)
        intact = loss if lesion == "intact" else intact
        rows.append({"cell_id": trial["cell_id"], "architecture": arch,
                     "variant": trial["variant"], "dataset": config["dataset"],
                     "layers": config["layers"], "filters": config["filters"],
                     "filters_used": int(saved_file["filters_used"]),
                     "kernel": config["kernel"], "n_blocks": n_blocks, "lesion": lesion,
                     "position": position, "val_loss": loss, "val_loss_intact": intact,
                     "loss_increase": loss - intact})
    return rows


def _lesion_cells(root: Path, saved: pd.DataFrame, data_dir: str | Path | None,
                  device: str) -> tuple[list[dict], list[str]]:
    """The rows of every saved cell that can be lesioned, and a note for each that cannot
    (one per skipped family and per dataset that cannot be loaded)."""
    rows: list[dict] = []
    notes: list[str] = []
    skipped_archs: set[str] = set()
    bad_data: set[str] = set()
    for _, trial in saved.iterrows():
        arch, path = trial["architecture"], root / trial["weights_path"]
        if arch in SKIP:
            if arch not in skipped_archs:
                notes.append(f"{arch} skipped: {SKIP[arch]}")
                skipped_archs.add(arch)
        elif not path.is_file():
            notes.append(f"cell {trial['cell_id']} skipped: its weights file {path} is missing")
        elif trial["dataset"] not in bad_data:
            try:
                rows += _lesion_rows(trial, *_cell_inputs(trial, path, data_dir, device))
            except _Skip as skip:
                notes.append(str(skip))
                if skip.dataset is not None:
                    bad_data.add(skip.dataset)
    return rows, notes


def _write_table(root: Path, df: pd.DataFrame, notes: list[str]) -> Path:
    out_dir = root / "lesions"
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / "lesions.parquet"
    atomic_write(table, lambda p: df.to_parquet(p, index=False))
    atomic_write_text(out_dir / "notes.txt", "".join(n + "\n" for n in notes))
    return table


def run_lesion(results_dir: str | Path, data_dir: str | Path | None = None,
               device: str = "cpu") -> tuple[pd.DataFrame, list[Path]]:
    """Evaluate every saved cell intact and lesioned; write the table (not the figure).

    Returns (table, [parquet]); `table.attrs["notes"]` lists what was skipped and why.
    """
    root = Path(results_dir)
    rows, notes = _lesion_cells(root, _saved_cells(root), data_dir, device)
    if not rows:
        raise LesionError("no cell could be lesioned" + (": " + "; ".join(notes) if notes else ""))
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["position"] = df["position"].astype("Int64")
    df.attrs["notes"] = notes
    return df, [_write_table(root, df, notes)]
