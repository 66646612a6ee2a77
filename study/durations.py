"""Durations as the tool prints them, one home for both forms (torch- and ray-free: analysis
imports it): short on the command line, spelled out (with the seconds) in the report."""
from __future__ import annotations

import math


def short_duration(seconds: float) -> str:
    """The progress line's and `study status`'s form: 42s, 3m05s, 1h02m."""
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def long_duration(seconds: float) -> str:
    """The report's form: 4.2 s (4 s), 3 min 5 s (185 s), 1 h 2 min (3,720 s); 0 s for none."""
    if not math.isfinite(seconds) or seconds <= 0:
        return "0 s"
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return (f"{int(h)} h {int(m)} min" if h else f"{int(m)} min {s:.0f} s" if m
            else f"{s:.1f} s") + f" ({seconds:,.0f} s)"
