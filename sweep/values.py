"""A value of a store row read back through pandas, as the plain Python value it was written as.

pandas turns an int or bool column that holds nulls into floats, and nulls into NaN (NaT in a
timestamp column); a row's values come back as numpy and pandas scalars. Both the runner (a
copied row written again) and the same-network grouping (a cell's config from its row) undo
that here, the one place that knows how (stdlib only: sweep imports neither study nor pandas).
"""
from __future__ import annotations

import datetime as dt


def is_missing(v) -> bool:
    """None, or the NaN / NaT pandas reads a null as (both are unequal to themselves)."""
    return v is None or v != v


def plain_value(v, kind: type):
    """`v` as a `kind` (int, float, bool, str or datetime.datetime); None where it is missing."""
    if is_missing(v):
        return None
    if kind is dt.datetime:
        # a pandas Timestamp is a datetime subclass: the plain datetime it holds
        return v.to_pydatetime() if hasattr(v, "to_pydatetime") else v
    if kind in (int, float, bool):
        return kind(v)
    return v


def parse_off_auto_or_count(value, flag: str, letter: str, high: int) -> int | str:
    """A command-line mode such as --fuse's or --bundle's: "off", "auto" (any case) or a
    whole number from 1 to `high`; ValueError naming `flag` and its `letter` otherwise."""
    v = str(value).strip().lower()
    if v in ("off", "auto"):
        return v
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"{flag} takes off, auto or a whole number {letter}, not {value!r}") from None
    if not 1 <= n <= high:
        raise ValueError(f"{flag} {letter} must be between 1 and {high}, not {n}")
    return n

