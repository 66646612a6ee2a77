"""Where a results folder keeps what (the whole layout is in study.store's docstring): its
folders and files, how parts and merged files are named and listed, and the metadata a reader
may look at (study.json, the cell-id cache). No torch or ray here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MERGED_PREFIX = "merged-"


def merged_seq(name: str) -> int | None:
    """<seq> of a merged file's name, None for a part."""
    if name.startswith(MERGED_PREFIX) and name.endswith(".parquet"):
        digits = name[len(MERGED_PREFIX):-len(".parquet")]
        if digits.isdigit():
            return int(digits)
    return None


def merged_name(seq: int) -> str:
    return f"{MERGED_PREFIX}{seq:08d}.parquet"


def listing(folder: Path) -> tuple[list[Path], dict[int, Path]]:
    """(parts, {seq: merged file}) of a trials/ or epochs/ folder."""
    parts, merged = [], {}
    try:
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith(".") or not e.name.endswith(".parquet"):
                    continue
                seq = merged_seq(e.name)
                if seq is None:
                    parts.append(Path(e.path))
                else:
                    merged[seq] = Path(e.path)
    except (FileNotFoundError, NotADirectoryError):
        pass  # no store there (yet): nothing to read
    return sorted(parts), dict(sorted(merged.items()))


def name_stem(p: Path) -> str:
    """A part's cell id: its name up to the first dot (`<cell_id>.parquet`, or a live
    reader's second name `<cell_id>.<tag>.parquet`)."""
    return p.name.split(".", 1)[0]


def is_cell_id(stem: str) -> bool:
    return len(stem) == 16 and all(c in "0123456789abcdef" for c in stem)


def file_stat(p: Path) -> tuple[int, int, int] | None:
    """(inode, mtime, size): tells a file rewritten since from the one that was read."""
    try:
        s = p.stat()
        return (s.st_ino, s.st_mtime_ns, s.st_size)
    except OSError:
        return None


def spec_key(source: str) -> str:
    """The spec's text and the code that turns it into cell ids (a new sweep version may
    hash differently: its cache is not reused)."""
    import hashlib

    import sweep
    h = hashlib.sha256(source.encode())
    for name in ("spec.py", "params.py"):
        try:
            h.update((Path(sweep.__file__).parent / name).read_bytes())
        except OSError:
            h.update(name.encode())
    return h.hexdigest()


class Layout:
    """The paths of one results folder, and its metadata as it is on disk (reading only)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.trials_dir = self.root / "trials"
        self.epochs_dir = self.root / "epochs"
        self.checkpoints_dir = self.root / "checkpoints"
        self.weights_dir = self.root / "weights"
        self.quarantine_dir = self.root / "quarantine"
        self.figures_dir = self.root / "figures"
        self.spec_path = self.root / "spec.toml"
        self.meta_path = self.root / "study.json"
        self.cells_path = self.root / "cells.parquet"
        self.lock_path = self.root / "driver.lock"

    def exists(self) -> bool:
        return self.spec_path.is_file()

    def checkpoint_path(self, cell_id: str) -> Path:
        return self.checkpoints_dir / f"{cell_id}.pt"

    def weights_path(self, cell_id: str) -> Path:
        return self.weights_dir / f"{cell_id}.pt"

    def meta(self) -> dict:
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return {}

    def cached_cell_ids(self, source: str) -> list[str] | None:
        """The cell ids of spec `source` in grid order, if cached for this very text and
        sweep code; None otherwise."""
        try:
            pf = pq.ParquetFile(self.cells_path)
            meta = pf.schema_arrow.metadata or {}
            if meta.get(b"spec_key", b"").decode() != spec_key(source):
                return None
            return pf.read(columns=["cell_id"])["cell_id"].to_pylist()
        except (OSError, ValueError, KeyError, pa.ArrowException):
            return None
