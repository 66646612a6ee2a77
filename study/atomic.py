"""The one way the tool writes a file: to a hidden temporary name beside it, renamed into place.

A reader (or a crash) sees the old file or the new one, never half of either, and the
temporary names (`.NAME.<random>.tmp`) are skipped by the globs that read a folder. Store rows,
checkpoints and weights, the spec, figures, tables, the report and the lesion table all go
through `atomic_write`. Errors are OSError, left to the caller to turn into its own one-line
message (the store's StoreError, analysis's AnalysisError). No torch, no ray: analysis uses it.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq


def atomic_write(path: str | Path, write: Callable[[Path], object], fsync: bool = False) -> None:
    """`write(tmp)` writes the whole file to a temporary path, which is then renamed to `path`.

    fsync: flush the file to disk before the rename, so that after a power loss the new name
    never points at missing data (the store's Parquet parts: rows it must not lose).
    On any error, or an interrupt, the temporary file is removed and the error raised again;
    after success nothing else is touched (a test stops the process inside this window).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_table(path: str | Path, table, fsync: bool = True, **write_kw) -> None:
    """A pyarrow Table as Parquet (`write_kw`: pyarrow.parquet.write_table's options)."""
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, **write_kw), fsync=fsync)
