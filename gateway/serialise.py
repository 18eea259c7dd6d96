"""Every record row made storable before anything writes it: one poison value must not fail a
batch, kill the writer, or sit in the spool for ever (issue 14, items 1 and 2).

What the stores refuse, and what is done instead (pure functions, no I/O):

- NUL (PostgreSQL text and JSONB refuse it) and lone surrogates (not UTF-8: orjson and both
  drivers refuse them) become U+FFFD, in every string, dict keys too;
- a string column longer than its width is cut to it, ending in ``…[cut]``;
- an integer column outside PostgreSQL's ``INTEGER``, a float that is not finite, is clamped;
- JSON that orjson cannot encode (deeper than its 254 levels, integers beyond 64 bits, keys that
  are not strings) is rebuilt: containers deeper than ``MAX_DEPTH`` become ``DEPTH_MARKER``;
- a row whose JSON columns pass ``MAX_ROW_BYTES`` keeps its metadata, its bodies replaced by a marker.

Values orjson encodes as they are, with no NUL, are left untouched (the common case: one C-speed
encode per JSON column, no Python walk).
"""

from __future__ import annotations

import math
import re
from typing import Any

import orjson
from sqlalchemy import Integer, String

from gateway.store.models import Record

CUT_MARKER = "…[cut]"
MAX_DEPTH = 128
"""Nesting kept in a JSON column; deeper containers become ``DEPTH_MARKER``."""
DEPTH_MARKER = "…[nesting deeper than 128 levels cut]"
MAX_ROW_BYTES = 32 * 1024 * 1024
"""Largest encoded JSON a row may carry; past it the bodies are replaced by ``dropped_marker``."""
JSON_COLUMNS = ("request", "response", "feedback", "shadow")
INT_RANGE = (-(2**31), 2**31 - 1)
"""PostgreSQL ``INTEGER``, the narrowest integer column of ``record``."""
JSON_INT_RANGE = (-(2**63), 2**64 - 1)
"""What orjson encodes; larger integers are kept as their decimal text."""

_TABLE = Record.__table__  # type: ignore[attr-defined]


def _is_text(column_type: Any) -> bool:
    return isinstance(column_type, String) or isinstance(getattr(column_type, "impl", None), String)


TEXT_WIDTHS: dict[str, int | None] = {
    c.name: c.type.length for c in _TABLE.columns if _is_text(c.type) and c.name not in JSON_COLUMNS
}
"""Every string column and its width (None: unbounded ``TEXT``, still cleaned of NUL)."""
INT_COLUMNS = tuple(c.name for c in _TABLE.columns if isinstance(c.type, Integer))
FLOAT_COLUMNS = ("latency_ms", "ttft_ms", "cost_usd", "teacher_cost_usd")

_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")


def clean_text(value: str) -> str:
    """NUL and lone surrogates replaced by U+FFFD."""
    return _BAD_CHARS.sub("\ufffd", value) if _BAD_CHARS.search(value) else value


def cut(value: str, width: int | None) -> str:
    """``value`` cleaned and, when longer than ``width``, cut to it with ``CUT_MARKER`` at the end."""
    value = clean_text(value)
    if width is None or len(value) <= width:
        return value
    return value[: max(0, width - len(CUT_MARKER))] + CUT_MARKER[:width]


def storable_json(value: Any) -> Any:
    """``value`` as JSON both orjson and PostgreSQL's JSONB accept (see the module docstring)."""
    return _storable_json(value)[0]


def _storable_json(value: Any) -> tuple[Any, int]:
    """The storable value and the length of its encoding."""
    try:
        encoded = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        encoded = b"\\u0000"
    if b"\\u0000" in encoded:
        value = _rebuild(value, 0)
        encoded = orjson.dumps(value)
    return value, len(encoded)


def _rebuild(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        low, high = JSON_INT_RANGE
        return value if low <= value <= high else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict | list | tuple):
        if depth >= MAX_DEPTH:
            return DEPTH_MARKER
        if isinstance(value, dict):
            return {_key(k): _rebuild(v, depth + 1) for k, v in value.items()}
        return [_rebuild(v, depth + 1) for v in value]
    return clean_text(str(value))  # bytes, datetimes, anything a caller put in: its text


def _key(key: Any) -> str:
    return clean_text(key if isinstance(key, str) else str(key))


def dropped_marker(size: int) -> dict[str, Any]:
    return {"_distillgate": f"body dropped: the record's JSON was {size} bytes, over {MAX_ROW_BYTES}"}


def storable_row(row: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``row`` that SQLite, PostgreSQL and the spool all accept (see the module docstring)."""
    out = dict(row)
    for name, width in TEXT_WIDTHS.items():
        value = out.get(name)
        if value is not None:
            out[name] = cut(value if isinstance(value, str) else str(value), width)
    for name in INT_COLUMNS:
        value = out.get(name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            low, high = INT_RANGE
            number = int(value) if math.isfinite(value) else 0
            out[name] = min(high, max(low, number))
    for name in FLOAT_COLUMNS:
        value = out.get(name)
        if isinstance(value, float) and not math.isfinite(value):
            out[name] = 0.0
    size = 0
    for name in JSON_COLUMNS:
        if out.get(name) is not None:
            out[name], length = _storable_json(out[name])
            size += length
    if size > MAX_ROW_BYTES:
        for name in ("request", "response", "shadow"):
            if out.get(name) is not None:
                out[name] = dropped_marker(size)
    return out
