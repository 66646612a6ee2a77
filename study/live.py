"""What a reader of a running study opens: a manifest of the live files, with retention.

The driver compacts as it runs, so a file listed by a glob may be gone a moment later. Here
each file of DIR/trials and DIR/epochs gets a second name (a hard link: no extra space) under
DIR/.live/<table>/, and DIR/.live/manifest.json, replaced atomically, lists those names, each
cell in exactly one of them. The driver keeps the manifest in memory (LiveManifest): a landed
cell adds the second names of its own two files, nothing else is listed or stat-ed; the
folders are listed again only at start-up, after a compaction and after a quarantine. The
manifest is written at most once per PUBLISH_EVERY_S (a landing marks it due; a timer writes
it by the end of the interval), and at once after every compaction and at the end of a run.
A file a written manifest drops is *retired*: its second name stays RETAIN_S seconds, so a
reader still holding the previous manifest opens every file it lists, and is removed by the
first manifest write after that. The globs of DIR/trials and DIR/epochs never see DIR/.live
(a dot folder beside them), so they keep their own promise. No torch or ray here.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
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
# The most a manifest lags the landed cells: one write per interval, however many cells land
# in it (a write costs the whole list; a landing only its own files). Tests change it.
PUBLISH_EVERY_S = 1.0


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
        s = os.stat(path)
        return [s.st_ino, s.st_mtime_ns, s.st_size]
    except OSError:
        return None


def _second_name(src: Path, dest_dir: Path) -> Path:
    """A new name for `src` in dest_dir: a hard link, or a copy where links are refused."""
    dest = dest_dir / f"{src.name[:-len('.parquet')]}.{uuid.uuid4().hex[:8]}.parquet"
    try:
        os.link(src, dest)
    except FileNotFoundError:
        raise
    except OSError:
        atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))
    return dest


def _empty_file(root: Path, table: str, sch: pa.Schema) -> dict:
    """An empty file of the table's schema: a table without rows still reads (0 rows)."""
    rel = f"{LIVE_DIR}/{table}/empty.parquet"
    if not (root / rel).is_file():
        atomic_write(root / rel, lambda tmp: pq.write_table(sch.empty_table(), tmp))
    return {"name": None, "file": rel, "stat": None}


class LiveManifest:
    """The driver's manifest, in memory: per table, the listed entries by source file name
    ({"name", "file": the second name, relative to DIR, "stat": [inode, mtime_ns, size]}),
    merged files first (readers that take the schema from the first file, pandas, pyarrow and
    Polars, get the full one, which compaction conforms them to, not an old part's). The
    caller, the driver, makes sure each cell is in one listed file. Thread-safe: a timer
    thread writes what landings left due."""

    def __init__(self, root: str | Path, schemas: dict[str, pa.Schema]):
        self.root = Path(root)
        self.schemas = schemas
        self.entries: dict[str, dict[str, dict]] = {t: {} for t in TABLES}
        self.empty: dict[str, dict] = {}  # the empty file listed for a table without files
        old = read_manifest(self.root) or {}
        self.retired = {k: float(v) for k, v in (old.get("retired") or {}).items()}
        # What the manifest on disk lists (dropped from a write: retired), what lives in
        # .live/ unlisted since the last write (second names replaced before being written).
        self.written = {t: {e["file"] for e in old.get(t) or []} for t in TABLES}
        self.known = {t: {(e["name"], tuple(e["stat"])): e for e in old.get(t) or []
                          if e.get("name") and e.get("stat")} for t in TABLES}
        self.unlisted: set[str] = set()
        self.due = False  # a landing since the last write
        self.last_write = float("-inf")  # time.monotonic() of the last write
        self.writes = 0
        self.lock = threading.RLock()
        self.timer: threading.Timer | None = None  # the pending write of landed cells
        self.due_at = float("-inf")  # time.monotonic() it is set for

    # -- listing the folders (start-up, after a compaction or a quarantine) ----------------------
    def relist(self, sweep: bool = False) -> None:
        """List DIR/trials and DIR/epochs again: a file listed before under the same name and
        stat keeps its second name, any other gets a new one. `sweep`: also retire the second
        names no manifest knows (a crash between making one and writing the manifest)."""
        with self.lock:
            for table in TABLES:
                hidden = self.root / LIVE_DIR / table
                hidden.mkdir(parents=True, exist_ok=True)
                known = {**self.known[table],
                         **{(e["name"], tuple(e["stat"])): e for e in self.entries[table].values()}}
                before = {e["file"] for e in self.entries[table].values()}
                entries: dict[str, dict] = {}
                srcs = sorted((self.root / table).glob("*.parquet"),
                              key=lambda p: (not p.name.startswith("merged-"), p.name))
                for src in srcs:
                    key = _stat_key(src)
                    if key is None:
                        continue
                    e = known.get((src.name, tuple(key)))
                    if e is None or not (self.root / e["file"]).is_file():  # a new file
                        try:
                            e = self._entry(table, src)
                        except FileNotFoundError:
                            continue
                    entries[src.name] = e
                self.entries[table] = entries
                listed = {e["file"] for e in entries.values()}
                self.unlisted |= before - listed
                self.known[table] = {}
                if not entries:
                    self.empty[table] = _empty_file(self.root, table, self.schemas[table])
                else:
                    self.empty.pop(table, None)
                if sweep:
                    self.unlisted |= {f"{LIVE_DIR}/{table}/{p.name}" for p in hidden.glob("*.parquet")
                                      } - listed - {e["file"] for e in self.empty.values()}
            self.due = True

    def _entry(self, table: str, src: Path) -> dict:
        """A new second name for `src`, and the entry that lists it (its stat tells a later
        listing whether `src` is still the file it names)."""
        key = _stat_key(src)
        if key is None:
            raise FileNotFoundError(src)
        dest = _second_name(src, self.root / LIVE_DIR / table)
        return {"name": src.name, "file": f"{LIVE_DIR}/{table}/{dest.name}", "stat": key}

    # -- a landed cell: its own files only ----------------------------------------------------
    def land(self, files: dict[str, Path]) -> None:
        """Add a landed cell's files ({table: its part}) and write the manifest if the last
        write is PUBLISH_EVERY_S old, else have the timer write it when it is."""
        with self.lock:
            for table, src in files.items():
                try:
                    e = self._entry(table, src)
                except FileNotFoundError:  # e.g. an epochs part removed after landing
                    continue
                old = self.entries[table].pop(src.name, None)  # a re-landed part
                if old is not None:
                    self.unlisted.add(old["file"])
                self.entries[table][src.name] = e
            pause_for_test("landed_before_manifest")
            self.due = True
            now = time.monotonic()
            wait = self.last_write + PUBLISH_EVERY_S - now
            if wait <= 0:
                self.write()
            elif self.timer is None:
                self.due_at = now + wait
                self.timer = threading.Timer(wait, self._flush_on_timer)
                self.timer.daemon = True  # the end of a run writes (close); a crash need not
                self.timer.start()

    def flush(self) -> None:
        """Write the manifest if a landing has not been written yet."""
        with self.lock:
            self.timer = None
            if self.due:
                self.write()

    def _flush_on_timer(self) -> None:
        try:
            self.flush()
        except OSError:
            pass  # the manifest stays the previous one (consistent); the next write retries

    def close(self) -> None:
        """The end of a run: no timer left, everything landed written."""
        with self.lock:
            if self.timer is not None:
                self.timer.cancel()
            self.flush()

    # -- writing ------------------------------------------------------------------------------
    def write(self, retain_s: float | None = None, pause=None) -> dict:
        """Replace the manifest with the entries in memory, retire what it no longer lists
        and remove what was retired more than `retain_s` (default RETAIN_S) ago. Returns the
        manifest written. `pause`: pause_for_test, where a test may stop a compaction here."""
        with self.lock:
            retain_s = RETAIN_S if retain_s is None else retain_s
            now = time.time()
            new: dict = {"version": 1, "published_at": now, "retain_s": retain_s}
            listed_all: set[str] = set()
            for table in TABLES:
                entries = list(self.entries[table].values()) or [self.empty[table]]
                new[table] = entries
                listed = {e["file"] for e in entries}
                listed_all |= listed
                for rel in self.written[table] - listed:  # retired from this write on
                    self.retired.setdefault(rel, now)
                self.written[table] = listed
            for rel in self.unlisted - listed_all:
                self.retired.setdefault(rel, now)
            self.unlisted.clear()
            for rel in [r for r in self.retired if r in listed_all]:
                del self.retired[rel]
            expired = [r for r, t in self.retired.items() if now - t >= retain_s]
            new["retired"] = {r: t for r, t in self.retired.items() if r not in expired}
            if pause:
                pause("before_manifest")
            atomic_write_text(manifest_path(self.root), json.dumps(new, separators=(",", ":")) + "\n")
            self.retired = dict(new["retired"])
            self.due = False
            self.last_write = time.monotonic()
            self.writes += 1
            if pause:
                pause("before_retired_removal")
            for rel in expired:  # no manifest names them any more: a crash here only delays this
                (self.root / rel).unlink(missing_ok=True)
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
