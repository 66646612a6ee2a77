"""Killing real process trees for the fault tests (no psutil: /proc is enough on Linux)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _procs() -> dict[int, tuple[int, str]]:
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def descendants(pid: int, procs=None) -> set[int]:
    procs = procs or _procs()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, (pp, _) in procs.items() if pp in frontier and p not in found}
        found |= frontier
    return found


def kill_tree(pid: int | None = None, marker: str | None = None) -> int:
    """SIGKILL a process, all its descendants, and every process whose command line holds
    `marker` (with their descendants), and wait until they are gone. Returns how many
    processes were signalled."""
    procs = _procs()
    roots = set()
    if pid is not None:
        roots.add(pid)
    if marker:
        roots |= {p for p, (_, cmd) in procs.items() if marker in cmd and p != os.getpid()}
    victims = set(roots)
    for r in roots:
        victims |= descendants(r, procs)
    victims.discard(os.getpid())
    started = {v: _start_time(v) for v in victims}
    for v in victims:
        try:
            os.kill(v, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _wait_gone(started)
    return len(victims)


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (the state first); [] when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _start_time(pid: int) -> str | None:
    """When the process started (field 22 of /proc/PID/stat: a PID taken again meanwhile is
    another process); None where it is gone, or a zombie (dead, its parent not yet told)."""
    fields = _stat(pid)
    return None if not fields or fields[0] in ("Z", "X") else fields[19]


def _wait_gone(started: dict[int, str | None], timeout: float = 30.0) -> None:
    """Until every one of these processes has died (SIGKILL is delivered, not awaited)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p, t in started.items() if t is not None and _start_time(p) == t]
        if not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"processes {sorted(left)} still run {timeout:.0f} s "
                                 "after SIGKILL")
        time.sleep(0.02)


def freeze_when(proc, predicate, timeout: float, what: str):
    """Poll `predicate` while `proc` (started with start_new_session=True, so its process
    group is its PID) runs; once it holds, SIGSTOP the group and ask again: a driver that is
    stopped cannot land a row or remove a checkpoint between that check and the kill that
    follows. Returns the predicate's value with the group stopped (SIGKILL ends a stopped
    process); where it no longer holds, the group runs on and polling goes on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"driver exited ({proc.returncode}) before {what}: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        if predicate():
            os.killpg(proc.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            while (_stat(proc.pid) or ["Z"])[0] not in "TtZ" and time.monotonic() - t0 < 10:
                time.sleep(0.005)
            value = predicate()
            if value:
                return value
            os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
