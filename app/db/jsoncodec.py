"""JSON of the database's JSON columns: orjson both ways (every journal record, row summary
and replayed record goes through here), the standard library for what orjson refuses."""

from __future__ import annotations

import json
from typing import Any

import orjson


def json_loads(text: str | bytes) -> Any:
    """JSON columns read with orjson (replay decodes every record's args); a document orjson
    refuses (an integer past 64 bits) falls back to the standard parser."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def json_dumps(value: Any) -> str:
    """JSON columns written with orjson (every journal record and row summary); what orjson
    refuses (an integer past 64 bits) goes through the standard encoder."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(value)
