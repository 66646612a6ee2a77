"""What a reader of a running study opens: a manifest of the live files, with retention.

The driver compacts as it runs, so a file listed by a glob may be gone a moment later. Here
each file of DIR/trials and DIR/epochs gets a second name (a hard link: no extra space) under
DIR/.live/<table>/, and DIR/.live/manifest.json, replaced atomically, lists those names. The
driver publishes a new manifest after every landed cell and every compaction, and only when
each cell is in exactly one listed file. A file the new manifest drops is *retired*: its
second name stays RETAIN_S seconds, so a reader still holding the previous manifest opens
every file it lists, and is removed by the first publish after that (at the next compaction
or landed cell, or the next `study run`). The globs of DIR/trials and DIR/epochs never see
DIR/.live (a dot folder beside them), so they keep their own promise. No torch or ray here.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_write, atomic_write_text

LIVE_DIR = ".live"
MANIFEST = "manifest.json"
TABLES = ("trials", "epochs")
# How long a replaced file stays readable for a reader holding an older manifest: far above
# the time one read of a large store takes (seconds), and at one compaction per 30 s it keeps
# about ten generations of the one merged file a compaction rewrites. Tests shorten it.
RETAIN_S = 300.0


def manifest_path(root: str | Path) -> Path:
    return Path(root) / LIVE_DIR / MANIFEST


def read_manifest(root: str | Path) -> dict | None:
    """The manifest, or None where none was published (or it cannot be read)."""
    try:
        m = json.loads(manifest_path(root).read_text())
        return m if isinstance(m, dict) and all(isinstance(m.get(t), list) for t in TABLES) else None
    except (OSError, ValueError):
        return None


def live_files(root: str | Path, table: str = "trials") -> list[str] | None:
    """Paths of the files that hold every landed row of `table` ("trials" or "epochs"), each
    cell exactly once; they stay readable RETAIN_S seconds after a newer list replaced this one.
    None where no manifest was published (a store written before manifests existed)."""
    if table not in TABLES:
        raise ValueError(f"table must be one of {TABLES}, not {table!r}")
    m = read_manifest(root)
    if m is None:
        return None
    return [str(Path(root) / e["file"]) for e in m[table]]


def _stat_key(path: Path) -> list[int] | None:
    try:
        s = path.stat()
        return [s.st_ino, s.st_mtime_ns, s.st_size]
    except OSError:
        return None


def _second_name(src: Path, dest_dir: Path) -> Path:
    """A new name for `src` in dest_dir: a hard link, or a copy where links are refused."""
    dest = dest_dir / f"{src.stem}.{uuid.uuid4().hex[:8]}.parquet"
    try:
        os.link(src, dest)
    except OSError:
        atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))
    return dest


def _empty_file(root: Path, table: str, sch: pa.Schema) -> dict:
    """An empty file of the table's schema: a table without rows still reads (0 rows)."""
    rel = f"{LIVE_DIR}/{table}/empty.parquet"
    if not (root / rel).is_file():
        atomic_write(root / rel, lambda tmp: pq.write_table(sch.empty_table(), tmp))
    return {"name": None, "file": rel, "stat": None}


def publish(root: str | Path, schemas: dict[str, pa.Schema], retain_s: float | None = None,
            pause=None, sweep: bool = True) -> dict:
    """List the files now in DIR/trials and DIR/epochs as the live ones (the caller, the
    driver, makes sure each cell is in one of them), retire the rest and remove what was
    retired more than `retain_s` (default RETAIN_S) ago. Returns the manifest written.
    `pause`: pause_for_test, where a test may stop a compaction between these steps.
    `sweep`: also retire second names no manifest knows (what a crash between making one and
    publishing it left); a driver does it at its first publish."""
    root = Path(root)
    retain_s = RETAIN_S if retain_s is None else retain_s
    old = read_manifest(root) or {t: [] for t in TABLES}
    now = time.time()
    retired = {k: float(v) for k, v in (old.get("retired") or {}).items()}
    new: dict = {"version": 1, "published_at": now, "retain_s": retain_s}
    for table in TABLES:
        hidden = root / LIVE_DIR / table
        hidden.mkdir(parents=True, exist_ok=True)
        known = {(e["name"], tuple(e["stat"])): e for e in old[table] if e.get("name")}
        entries = []
        # Merged files first: readers that take the schema from the first file (pandas,
        # pyarrow, Polars) get the full one (compaction conforms them), not an old part's.
        for src in sorted((root / table).glob("*.parquet"),
                          key=lambda p: (not p.name.startswith("merged-"), p.name)):
            key = _stat_key(src)
            if key is None:
                continue
            e = known.get((src.name, tuple(key)))
            if e is None or not (root / e["file"]).is_file():
                dest = _second_name(src, hidden)
                e = {"name": src.name, "file": f"{LIVE_DIR}/{table}/{dest.name}", "stat": key}
            entries.append(e)
        if not entries:
            entries.append(_empty_file(root, table, schemas[table]))
        new[table] = entries
        listed = {e["file"] for e in entries}
        # Every other second name is retired from now on (or since earlier).
        dropped = [e["file"] for e in old[table] if e["file"] not in listed]
        if sweep:
            dropped += [f"{LIVE_DIR}/{table}/{p.name}" for p in hidden.glob("*.parquet")
                        if f"{LIVE_DIR}/{table}/{p.name}" not in listed]
        for rel in dropped:
            retired.setdefault(rel, now)
        for rel in [r for r in retired if r in listed]:
            del retired[rel]
    expired = [r for r, t in retired.items() if now - t >= retain_s]
    new["retired"] = {r: t for r, t in retired.items() if r not in expired}
    if pause:
        pause("before_manifest")
    atomic_write_text(manifest_path(root), json.dumps(new, separators=(",", ":")) + "\n")
    if pause:
        pause("before_retired_removal")
    for rel in expired:  # no manifest names them any more: a crash here only delays this
        (root / rel).unlink(missing_ok=True)
    return new


_pauses: dict[str, int] = {}


def pause_for_test(step: str) -> None:
    """Test-only: STUDY_TEST_PAUSE="STEP:N:FILE" stops this process the Nth time it reaches
    STEP (it creates FILE, then sleeps), so that a test can SIGKILL the driver exactly there."""
    spec = os.environ.get("STUDY_TEST_PAUSE")
    if not spec:
        return
    want, n, flag = spec.split(":", 2)
    if want != step:
        return
    _pauses[step] = _pauses.get(step, 0) + 1
    if _pauses[step] == int(n):
        Path(flag).write_text(step)
        time.sleep(600)
