"""DriverLock: one driver (`study run`) per results folder. No torch or ray here."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from ..rows import now
from .errors import StoreError, os_message
from .layout import Layout


def _proc_start(pid: int) -> str | None:
    """Process start time (clock ticks since boot): tells a live driver from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _slurm_job() -> dict:
    """The SLURM job this driver runs in, if any: its id and how often it was requeued."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return {}
    return {"slurm_job_id": job, "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0)}


def _requeued_from(holder: dict, me: dict) -> bool:
    """The holder is an earlier run of this very SLURM job: SLURM runs one instance of a job
    at a time, so that driver is gone, though on another host its lock would look fresh for
    `stale_s` (a requeued job may start on any node)."""
    return (bool(me.get("slurm_job_id")) and holder.get("slurm_job_id") == me["slurm_job_id"]
            and int(holder.get("slurm_restart") or 0) < me["slurm_restart"])


class DriverLock:
    """One driver per results folder. A lock whose process is gone (same host), whose
    heartbeat is older than `stale_s` (another host), or held by an earlier run of the same
    SLURM job (a requeue) is stale and taken over."""

    def __init__(self, store: Layout, stale_s: float = 120.0):
        self.path = store.lock_path
        self.stale_s = stale_s
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "proc_start": _proc_start(os.getpid()), "started_at": now().isoformat(),
                     **_slurm_job()}
        self.held = False

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as stale below

    def is_stale(self, holder: dict) -> bool:
        if not holder or "pid" not in holder:
            return True
        if _requeued_from(holder, self.info):
            return True
        if holder.get("host") == self.info["host"]:
            start = _proc_start(int(holder["pid"]))
            return start is None or (holder.get("proc_start") not in (None, start))
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return True
        return age > self.stale_s

    def acquire(self) -> dict | None:
        """Take the lock; returns the stale holder it took over from, if any."""
        taken_over = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue
                if not self.is_stale(holder):
                    raise StoreError(
                        f"results folder {self.path.parent} is in use by another driver (host "
                        f"{holder.get('host')}, pid {holder.get('pid')}, started "
                        f"{holder.get('started_at')}); wait for it to finish or stop it, "
                        "or use another --results folder")
                taken_over = holder
                self.path.unlink(missing_ok=True)
                continue
            except OSError as e:
                raise StoreError(os_message(e, self.path)) from None
            with os.fdopen(fd, "w") as f:
                json.dump(self.info, f)
            self.held = True
            return taken_over
        raise StoreError(f"could not take the lock {self.path}; remove it if no driver is running")

    def heartbeat(self) -> None:
        if self.held:
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self.held:
            holder = self.holder()
            if holder and holder.get("pid") == self.info["pid"] and holder.get("host") == self.info["host"]:
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
