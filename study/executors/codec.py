"""A finished cell's (row, epochs) through a Tune result dict and back: JSON strings, with the
row's timestamps as ISO text (Tune's results hold plain values; the driver lands datetimes)."""
from __future__ import annotations

import datetime as dt
import json

_TS_FIELDS = ("started_at", "finished_at")
ROW_KEYS = ("row_json", "epochs_json")  # the keys a result carrying a row holds


def encode(row: dict, epochs: list[dict]) -> dict:
    row = {k: (v.isoformat() if k in _TS_FIELDS and v is not None else v) for k, v in row.items()}
    return {"row_json": json.dumps(row), "epochs_json": json.dumps(epochs)}


def decode(result: dict) -> tuple[dict, list[dict]]:
    row = json.loads(result["row_json"])
    for k in _TS_FIELDS:
        if row.get(k):
            row[k] = dt.datetime.fromisoformat(row[k])
    return row, json.loads(result["epochs_json"])
