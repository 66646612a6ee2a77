"""A study in the experiment trackers researchers already use (issue 19): MLflow and TensorBoard.

MLflow: one experiment per study (a study is its folder: it is found by the folder's study id,
not by its name), one parent run, one child run per cell nested under it. TensorBoard: one run
folder per cell with its per-epoch scalars and the HParams plugin's session summaries.

Both exports are idempotent and incremental: a cell already exported with the same row
(`finished_at`) is left alone, a re-run cell's run or folder is replaced whole, new cells are
added. The names follow the store's schema: tags are the trial row's text columns under their
own names, metric histories are the epoch columns (step = epoch), params are the grid
parameters. mlflow and tensorboard are optional: they are imported here, inside functions,
and only when an export runs (the CLI's start-up never imports them).
"""
from __future__ import annotations

from .cells import (FINALS, HISTORY, PARAMS, STUDY_ID_TAG, TAGS, TB_SCALARS, Cell, ExportCounts,
                    cell_from_rows, run_name, safe_folder, store_cells, study_axes)
from .errors import MLFLOW_PACKAGE, TENSORBOARD_PACKAGE, MissingPackage, TrackerError, require
from .live import LiveExport, parse_targets
from .to_mlflow import (HEADLINE_METRICS, MAX_TAG, PARENT_TAG, ROLE_TAG, MlflowTarget,
                        bound_http_retries, export_mlflow, headline, local_mlflow_uri,
                        tune_local_sqlite, write_cells)
from .to_tensorboard import MANIFEST, TensorBoardTarget, export_tensorboard

__all__ = [
    "FINALS", "HEADLINE_METRICS", "HISTORY", "MANIFEST", "MAX_TAG", "MLFLOW_PACKAGE", "PARAMS",
    "PARENT_TAG", "ROLE_TAG", "STUDY_ID_TAG", "TAGS", "TB_SCALARS", "TENSORBOARD_PACKAGE", "Cell",
    "ExportCounts", "LiveExport", "MissingPackage", "MlflowTarget", "TensorBoardTarget",
    "TrackerError", "bound_http_retries", "cell_from_rows", "export_mlflow", "export_tensorboard",
    "headline", "local_mlflow_uri", "parse_targets", "require", "run_name", "safe_folder",
    "store_cells", "study_axes", "tune_local_sqlite", "write_cells",
]
