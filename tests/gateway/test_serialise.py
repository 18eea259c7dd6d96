"""Any row the recorder builds, from any JSON a client or a teacher sends, is storable: orjson
encodes it, and SQLite and PostgreSQL (COPY and INSERT) both accept it (issue 14, items 1-2)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import insert, select

from gateway.recorder import RECORD_TABLE, _copy_rows
from gateway.serialise import (
    CUT_MARKER,
    DEPTH_MARKER,
    MAX_DEPTH,
    MAX_ROW_BYTES,
    TEXT_WIDTHS,
    clean_text,
    storable_row,
)
from gateway.store.db import Database, create_database
from tests.servers import fresh_postgres_database

NASTY = st.sampled_from(["\x00", "\ud800", "\udfff", "a\x00b", "\ud83d", "é", "タスク", "\u2028", "\\u0000"])
TEXT = st.lists(st.one_of(st.text(max_size=8), NASTY), max_size=4).map("".join)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(TEXT, st.integers(-5, 5)), inner, max_size=4),
    ),
    max_leaves=20,
)


def nested(depth: int, leaf: Any) -> Any:
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"x": value}
    return value


DEEP = st.builds(nested, st.integers(0, 600), JSONISH)
BODY = st.one_of(st.none(), st.dictionaries(TEXT, st.one_of(JSONISH, DEEP), max_size=3))


@st.composite
def rows(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "created_at": datetime.now(UTC),
        "api_key_id": draw(st.one_of(st.none(), st.integers(-(2**40), 2**40))),
        "task": draw(st.one_of(TEXT, st.text(min_size=190, max_size=400))),
        "endpoint": "chat.completions",
        "model": draw(st.one_of(TEXT, st.text(min_size=190, max_size=400), NASTY)),
        "target": draw(TEXT),
        "stream": draw(st.booleans()),
        "stored": True,
        "request": draw(BODY),
        "response": draw(BODY),
        "status": draw(st.integers(-(2**40), 2**40)),
        "error": draw(st.one_of(st.none(), TEXT)),
        "finish_reason": draw(st.one_of(st.none(), TEXT, st.text(min_size=30, max_size=80))),
        "prompt_tokens": draw(st.integers(-(2**70), 2**70)),
        "completion_tokens": draw(st.integers(0, 2**40)),
        "cached_tokens": 0,
        "latency_ms": draw(st.floats(allow_nan=True, allow_infinity=True)),
        "ttft_ms": None,
        "cost_usd": draw(st.floats(allow_nan=True, allow_infinity=True)),
        "teacher_cost_usd": 0.0,
        "cache_hit": False,
        "feedback": None,
        "shadow": draw(st.one_of(st.none(), st.dictionaries(TEXT, JSONISH, max_size=2))),
    }


def strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from strings_in(k)
            yield from strings_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings_in(v)


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Database, Database]]:
    sqlite = create_database(f"sqlite:///{tmp_path_factory.mktemp('serialise') / 'db.sqlite'}")
    with fresh_postgres_database() as url:
        postgres = create_database(url)
        try:
            yield sqlite, postgres
        finally:
            postgres.dispose()
            sqlite.dispose()


@pytest.mark.postgres
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(row=rows())
def test_any_row_is_encoded_and_stored_by_sqlite_and_postgres(
    stores: tuple[Database, Database], row: dict[str, Any]
) -> None:
    sqlite, postgres = stores
    out = storable_row(row)
    for name in ("request", "response", "shadow", "feedback"):
        orjson.dumps(out[name])  # the spool's and the COPY's encoder
    for text in strings_in([out[k] for k in out if k != "created_at"]):
        assert "\x00" not in text and text == clean_text(text)
    for name, width in TEXT_WIDTHS.items():
        if width is not None and out.get(name) is not None:
            assert len(out[name]) <= width
    with sqlite.engine.begin() as conn:
        conn.execute(insert(RECORD_TABLE), [out])
    with postgres.engine.begin() as conn:
        conn.execute(insert(RECORD_TABLE), [out])
    copied = dict(out, id=out["id"] + "-copy")
    with postgres.engine.begin() as conn:
        _copy_rows(conn.connection.driver_connection, [copied])
    with postgres.engine.connect() as conn:
        stored = conn.execute(
            select(RECORD_TABLE.c.model, RECORD_TABLE.c.task).where(RECORD_TABLE.c.id == copied["id"])
        ).one()
    assert tuple(stored) == (out["model"], out["task"])


def test_nul_and_lone_surrogates_become_the_replacement_character() -> None:
    out = storable_row({"model": "a\x00b", "task": "t\ud800", "request": {"k\x00": ["x\udfff", {"\x00": 1}]}})
    assert out["model"] == "a\ufffdb" and out["task"] == "t\ufffd"
    assert out["request"] == {"k\ufffd": ["x\ufffd", {"\ufffd": 1}]}


def test_a_field_over_its_column_width_is_cut_with_a_marker() -> None:
    out = storable_row({"model": "m" * 300, "task": "t" * 199})
    assert len(out["model"]) == TEXT_WIDTHS["model"] == 200
    assert out["model"].endswith(CUT_MARKER) and out["task"] == "t" * 199


def test_nesting_orjson_cannot_encode_is_cut_at_the_depth_limit() -> None:
    deep = nested(1000, "leaf")
    out = storable_row({"request": {"messages": [], "x": deep}})
    orjson.dumps(out["request"])
    assert depth_of(out["request"]) == MAX_DEPTH
    assert DEPTH_MARKER in orjson.dumps(out["request"]).decode()
    shallow = {"x": nested(20, "leaf")}
    assert storable_row({"request": shallow})["request"] is shallow  # untouched, not rebuilt


def test_a_row_over_the_size_cap_keeps_its_metadata_and_drops_its_bodies(tmp_path: Path) -> None:
    out = storable_row(
        {"id": "r1", "model": "m", "request": {"p": "x" * (MAX_ROW_BYTES + 10)}, "response": {"a": 1}}
    )
    assert out["id"] == "r1" and out["model"] == "m"
    assert set(out["request"]) == {"_distillgate"} and "dropped" in out["request"]["_distillgate"]
    assert set(out["response"]) == {"_distillgate"}


def test_integers_are_clamped_to_their_column_and_non_finite_floats_zeroed() -> None:
    out = storable_row(
        {"prompt_tokens": 2**70, "status": -(2**40), "cost_usd": float("inf"), "latency_ms": float("nan")}
    )
    assert out["prompt_tokens"] == 2**31 - 1 and out["status"] == -(2**31)
    assert out["cost_usd"] == 0.0 and out["latency_ms"] == 0.0
    assert storable_row({"request": {"n": 2**70}})["request"] == {"n": str(2**70)}
