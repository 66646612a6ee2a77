"""Finished cells' (row, epochs) through a Tune result dict and back: JSON strings, with the
rows' timestamps as ISO text (Tune's results hold plain values; the driver lands datetimes).
A trial of a fused group reports all its members' rows in one result."""
from __future__ import annotations

import datetime as dt
import json

_TS_FIELDS = ("started_at", "finished_at")
ROW_KEYS = ("rows_json", "epochs_json")  # the keys a result carrying rows holds


def _plain(row: dict) -> dict:
    return {k: (v.isoformat() if k in _TS_FIELDS and v is not None else v) for k, v in row.items()}


def _timed(row: dict) -> dict:
    for k in _TS_FIELDS:
        if row.get(k):
            row[k] = dt.datetime.fromisoformat(row[k])
    return row


def encode_all(results: list[tuple[dict, list[dict]]]) -> dict:
    return {"rows_json": json.dumps([_plain(row) for row, _ in results]),
            "epochs_json": json.dumps([epochs for _, epochs in results])}


def decode_all(result: dict) -> list[tuple[dict, list[dict]]]:
    rows = json.loads(result["rows_json"])
    return [(_timed(row), epochs) for row, epochs in zip(rows, json.loads(result["epochs_json"]))]
