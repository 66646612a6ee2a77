"""The store's one error, StoreError, and its one-line messages.

study.atomic writes every file and leaves OSError to its caller; here an OSError where the
store writes becomes a StoreError that says what to do (free some space, fix permissions,
choose another folder), which the command-line tool prints as it is.
"""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa

from .. import atomic


class StoreError(RuntimeError):
    """A problem with the results folder; the message is one line that says what to do."""


def os_message(e: OSError, path: Path) -> str:
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return (f"cannot write {path}: {os.strerror(e.errno)}; free some space and run the same "
                "command again (every row written so far is kept)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write {path}: {os.strerror(e.errno)}; choose a writable folder with "
                "--results or fix its permissions")
    return f"cannot write {path}: {e.strerror or e}"


@contextmanager
def store_errors(path: Path):
    """An OSError raised while writing `path` leaves as a StoreError with os_message's line."""
    try:
        yield
    except OSError as e:
        raise StoreError(os_message(e, path)) from None


def atomic_write_text(path: Path, text: str) -> None:
    """study.atomic's text writer, its OSError as a StoreError with a one-line message."""
    with store_errors(path):
        atomic.atomic_write_text(path, text)


def atomic_write_table(path: Path, table: pa.Table, **write_kw) -> None:
    """study.atomic's Parquet writer, flushed to disk before the rename (rows the store must
    not lose), its OSError as a StoreError with a one-line message."""
    with store_errors(path):
        atomic.atomic_write_table(path, table, fsync=True, **write_kw)
