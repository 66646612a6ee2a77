"""The results store's schema, defined once: every writer and reader uses these.

No torch or ray here: the analysis package imports this module.
"""
from __future__ import annotations

import pyarrow as pa

from sweep.params import PARAMS

STATUSES = ("ok", "failed", "diverged")

_ARROW = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}

# Every grid parameter under its own name (null where the cell's architecture lacks it).
PARAM_FIELDS = [pa.field(name, _ARROW[p.type]) for name, p in PARAMS.items()]

TRIAL_FIELDS = PARAM_FIELDS + [
    pa.field("cell_id", pa.string(), nullable=False),
    pa.field("pair_key", pa.string(), nullable=False),
    # cell_id of the cell actually trained when this cell is the same network as that one
    # (sweep.same_network: e.g. parallel at layers 1); its numbers are copied, not measured again.
    pa.field("same_network_as", pa.string()),
    pa.field("study", pa.string()),
    pa.field("status", pa.string(), nullable=False),  # one of STATUSES
    pa.field("n_params", pa.int64()),
    pa.field("filters_used", pa.int64()),  # differs from `filters` only with match_params
    pa.field("n_train", pa.int64()),  # training examples actually used (after split and cap)
    pa.field("n_val", pa.int64()),
    pa.field("n_test", pa.int64()),
    pa.field("n_classes", pa.int64()),
    pa.field("epochs_done", pa.int64()),
    # Final losses/accuracies, each a full evaluation pass in eval mode after training.
    pa.field("train_loss", pa.float64()),
    pa.field("val_loss", pa.float64()),
    pa.field("train_acc", pa.float64()),
    pa.field("val_acc", pa.float64()),
    pa.field("test_loss", pa.float64()),
    pa.field("test_acc", pa.float64()),
    pa.field("pruned_branches", pa.int64()),  # learned_connectivity only
    pa.field("wall_s", pa.float64()),  # this cell's (or its fused group's) training time
    pa.field("started_at", pa.timestamp("us", tz="UTC")),
    pa.field("finished_at", pa.timestamp("us", tz="UTC")),
    pa.field("attempts", pa.int64()),
    pa.field("resumed_from_epoch", pa.int64()),  # 0 = trained from scratch
    pa.field("host", pa.string()),
    pa.field("node_id", pa.string()),  # Ray node id ("" under the local executor)
    pa.field("device", pa.string()),  # cpu or cuda
    pa.field("device_name", pa.string()),  # the GPU's model name, or the CPU's
    # parallel cells: "loop" or "wide" (same network), "fused" when trained in a fused group
    pa.field("parallel_body", pa.string()),
    # Fused training (study.fused): an id shared by the cells that trained as one group, and
    # the group's size; null and 1 for a cell trained alone (null size: written before fusion).
    # A fused cell's wall_s and train_s are its group's: they say nothing of its own speed.
    pa.field("fused_group", pa.string()),
    pa.field("group_size", pa.int64()),
    pa.field("error", pa.string()),  # last line of the error for failed/diverged cells
    pa.field("torch_version", pa.string()),
    pa.field("project_version", pa.string()),
    pa.field("weights_path", pa.string()),  # relative to the results folder, when saved
]
TRIALS = pa.schema(TRIAL_FIELDS)

EPOCHS = pa.schema([
    pa.field("cell_id", pa.string(), nullable=False),
    pa.field("epoch", pa.int64(), nullable=False),  # 1-based
    pa.field("train_loss", pa.float64()),  # mean of the epoch's mini-batch losses
    pa.field("val_loss", pa.float64()),
    pa.field("train_acc", pa.float64()),  # running accuracy over the epoch's mini-batches
    pa.field("val_acc", pa.float64()),
    pa.field("wall_s", pa.float64()),  # cumulative training time at the end of this epoch
    # This epoch's training pass alone (no validation); null in stores written before it.
    pa.field("train_s", pa.float64()),
])

TRIAL_COLUMNS = TRIALS.names
EPOCH_COLUMNS = EPOCHS.names
PARAM_COLUMNS = [f.name for f in PARAM_FIELDS]


def conform(data: list[dict] | pa.Table, schema: pa.Schema,
            columns: list[str] | None = None) -> pa.Table:
    """Rows (dicts) or a Table -> a Table of exactly `columns` of the schema (default: all of
    them), in order, each of its type; columns the data lacks are nulls.

    Rows come from the tool's own code: a key outside the schema is a programming error and
    raises KeyError, so the schema cannot drift silently. A Table comes from a file: columns a
    newer writer added are left out, ones an older writer lacked read as nulls, and a table
    without `cell_id` raises ValueError (none of its rows can be told apart).
    """
    cols = schema.names if columns is None else columns
    out = pa.schema([schema.field(c) for c in cols])
    if isinstance(data, pa.Table):
        if "cell_id" not in data.column_names:
            raise ValueError("missing columns ['cell_id']")
        return pa.Table.from_arrays(
            [data[f.name].cast(f.type) if f.name in data.column_names
             else pa.nulls(len(data), f.type) for f in out], schema=out)
    extra = {k for r in data for k in r} - set(schema.names)
    if extra:
        raise KeyError(f"columns not in the store schema: {sorted(extra)}")
    return pa.Table.from_pydict({c: [r.get(c) for r in data] for c in cols}, schema=out)
