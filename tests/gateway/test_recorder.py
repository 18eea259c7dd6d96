"""The recorder never makes the client wait on the database, and loses nothing when it goes away."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlmodel import func, select

from gateway.metrics import Metrics
from gateway.recorder import Exchange, Recorder
from gateway.settings import RecorderSettings
from gateway.store.db import Database
from gateway.store.models import Record
from tests.conftest import ADMIN_KEY, TEACHER_KEY, make_policy, start_gateway
from tests.servers import TcpProxy, fresh_postgres_database, wait_until


def count_records(url: str) -> int:
    db = Database(url)
    try:
        with db.session() as session:
            return int(session.exec(select(func.count()).select_from(Record)).one())
    finally:
        db.dispose()


@pytest.mark.postgres
def test_database_outage_mid_traffic_loses_no_record(teacher, tmp_path: Path) -> None:
    _, teacher_server = teacher
    with fresh_postgres_database() as real_url:
        proxy = TcpProxy(5432).start()
        url = real_url.replace(":5432/", f":{proxy.port}/")
        server, gw, key = start_gateway(url, make_policy(teacher_server.url), tmp_path)
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
            sent = 0

            def burst(n: int, stream: bool = False) -> None:
                nonlocal sent
                for i in range(n):
                    if stream:
                        text = "".join(
                            c.choices[0].delta.content or ""
                            for c in client.chat.completions.create(
                                model="m", messages=[{"role": "user", "content": f"s{i}"}], stream=True
                            )
                            if c.choices
                        )
                        assert text == f"You said: s{i}"
                    else:
                        r = client.chat.completions.create(
                            model="m", messages=[{"role": "user", "content": f"q{i}"}]
                        )
                        assert r.choices[0].message.content == f"You said: q{i}"
                    sent += 1

            burst(10)
            assert gw.recorder.flush(30)
            proxy.cut()  # the database is gone
            burst(15)
            burst(5, stream=True)
            assert gw.recorder.flush(30)
            wait_until(lambda: gw.recorder.spooled > 0, 10)
            assert count_records(real_url) < sent
            proxy = TcpProxy(5432, port=proxy.port).start()  # and back
            wait_until(lambda: count_records(real_url) == sent, 30)
            burst(5)
            assert gw.recorder.flush(30)
            assert count_records(real_url) == sent == 35
            assert not list((tmp_path / "spool").glob("*.jsonl"))
        finally:
            server.stop()
            proxy.close()


def test_dead_database_at_start_still_serves_then_catches_up(teacher, tmp_path: Path) -> None:
    """A gateway whose database does not answer at all keeps serving; a restart replays the spool."""
    _, teacher_server = teacher
    dead = "postgresql://postgres@127.0.0.1:1/nothing"

    from gateway.app import create_app
    from gateway.settings import Settings
    from tests.servers import ServerThread

    settings = Settings(
        database_url=dead,
        auth={"required": False, "admin_key": ADMIN_KEY},
        recorder={"spool_dir": tmp_path / "spool", "flush_interval_s": 0.05},
    )
    app = create_app(settings, policy=make_policy(teacher_server.url))
    server = ServerThread(app).start()
    try:
        for i in range(7):
            r = httpx.post(
                server.url + "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": f"x{i}"}]},
            )
            assert r.status_code == 200
        assert app.state.parts.recorder.flush(30)
        assert app.state.parts.recorder.spooled == 7
        ready = httpx.get(server.url + "/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"] is False
    finally:
        server.stop()
    # The operator fixes the URL; the next start replays what was spooled.
    good = f"sqlite:///{tmp_path / 'recovered.db'}"
    server2, _, _ = start_gateway(good, make_policy(teacher_server.url), tmp_path)
    try:
        wait_until(lambda: count_records(good) == 7, 20)
    finally:
        server2.stop()


def test_client_does_not_wait_for_a_slow_database(teacher, tmp_path: Path) -> None:
    """A database write lock held elsewhere delays records, never responses."""
    _, teacher_server = teacher
    url = f"sqlite:///{tmp_path / 'slow.db'}"
    server, gw, key = start_gateway(url, make_policy(teacher_server.url), tmp_path)
    try:
        import sqlite3

        blocker = sqlite3.connect(tmp_path / "slow.db", check_same_thread=False)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            client = httpx.Client(base_url=server.url + "/v1", headers={"Authorization": f"Bearer {key}"})
            for i in range(5):
                r = client.post(
                    "/chat/completions",
                    json={"model": "m", "messages": [{"role": "user", "content": str(i)}]},
                    timeout=5,
                )
                assert r.status_code == 200
        finally:
            threading.Timer(0.5, blocker.rollback).start()
        assert gw.recorder.flush(60)
        wait_until(lambda: count_records(url) == 5, 40)
    finally:
        server.stop()


def test_secrets_appear_in_no_record_log_metric_or_error(
    gateway, teacher, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    state, _ = teacher
    secrets = [TEACHER_KEY, gateway.key, ADMIN_KEY]
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key, max_retries=0)
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}])
    list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
    for status in (400, 500):
        with pytest.raises(openai.APIStatusError):
            client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": f"!error {status}"}]
            )
    bad = httpx.post(
        gateway.v1 + "/chat/completions",
        headers={"Authorization": f"Bearer {TEACHER_KEY}"},
        json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
    )
    texts = [bad.text]
    # The teacher did get its key, and only its key.
    assert set(state.stats.authorizations) == {f"Bearer {TEACHER_KEY}"}
    gateway.flush()
    metrics = httpx.get(gateway.url + "/metrics").text
    texts.append(metrics)
    records = httpx.get(
        gateway.url + "/admin/records?limit=1000", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ).text
    texts.append(records)
    texts.extend(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    texts.extend(p.read_text() for p in tmp_path.rglob("*.jsonl"))
    with gateway.db().engine.connect() as conn:
        from sqlalchemy import text

        for table in ("record", "apikey", "task"):
            texts.append(str(conn.execute(text(f"SELECT * FROM {table}")).fetchall()))
    blob = "\n".join(texts)
    assert '"request"' in records and "hello" in blob  # the check does look at content
    for secret in secrets:
        assert secret not in blob


# -- the recorder itself, on a real database: it cannot die, and it redacts before any write ----
def recorder_on(url: str, spool: Path, **settings: Any) -> Recorder:
    db = Database(url)
    db.migrate()
    recorder = Recorder(
        db,
        RecorderSettings(spool_dir=spool, flush_interval_s=0.01, retry_interval_s=0.1, **settings),
        Metrics(),
        lambda: None,
    )
    recorder.start()
    return recorder


def exchange(i: int, **fields: Any) -> Exchange:
    values: dict[str, Any] = {
        "id": f"ex-{i}-{uuid.uuid4().hex[:8]}",
        "task": "t",
        "model": "m",
        "target": "teacher",
        "request": {"messages": [{"role": "user", "content": f"secret-{i}"}]},
        "status": 200,
        "latency_s": 0.01,
        "body": orjson.dumps({"choices": [{"message": {"content": f"answer-{i}"}}]}),
    }
    values.update(fields)
    return Exchange(**values)


@pytest.fixture(scope="module")
def sqlite_recorder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorder]:
    """One recorder for every example of a hypothesis test (fixtures are per test, not per example)."""
    where = tmp_path_factory.mktemp("recorder")
    recorder = recorder_on(f"sqlite:///{where / 'db.sqlite'}", where / "spool")
    try:
        yield recorder
    finally:
        recorder.stop()
        recorder.db.dispose()


BODIES = st.one_of(
    st.binary(max_size=64),
    st.recursive(
        st.one_of(st.none(), st.integers(-(2**80), 2**80), st.text(max_size=6), st.just("\x00\ud800")),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
        ),
        max_leaves=12,
    ).map(
        lambda v: (
            json.dumps({"choices": [v]}).encode()
            if not isinstance(v, str)
            else v.encode("utf-8", "surrogatepass")
        )
    ),
)


@given(
    batch=st.lists(
        st.tuples(st.text(max_size=300), st.text(max_size=300), BODIES, st.booleans(), st.integers(100, 599)),
        min_size=1,
        max_size=8,
    )
)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_no_exchange_kills_the_recorder_or_is_lost(sqlite_recorder: Recorder, batch: list[Any]) -> None:
    """Any task, model and answer bytes (JSON, SSE or garbage, with NUL and surrogates): every
    exchange is stored, none quarantined, no thread restarted."""
    recorder = sqlite_recorder
    before = recorder.written
    for i, (task, model, body, sse, status) in enumerate(batch):
        recorder.submit(exchange(i, task=task, model=model, body=body, sse=sse, status=status))
    assert recorder.flush(30)
    assert recorder.written - before == len(batch)
    assert recorder.restarts == 0 and recorder.quarantined == 0 and recorder.dropped == 0


def test_a_thread_that_dies_is_restarted_logged_once_and_loses_nothing(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "distillgate.recorder")
    recorder = recorder_on(sqlite_url, tmp_path / "spool")
    deaths: list[int] = []

    def dies_once(rows: list[dict[str, Any]]) -> None:
        if not deaths:
            deaths.append(len(rows))
            raise SystemExit("a listener that takes the thread down")  # not an Exception: escapes

    recorder.listeners.append(dies_once)
    try:
        for i in range(5):
            recorder.submit(exchange(i))
        wait_until(lambda: recorder.restarts == 1, 10)
        for i in range(5, 10):
            recorder.submit(exchange(i))
        assert recorder.flush(30)
        assert count_records(sqlite_url) == 10
    finally:
        recorder.stop()
        recorder.db.dispose()
    died = [r for r in caplog.records if "thread died" in r.getMessage()]
    assert len(died) == 1 and died[0].levelname == "ERROR" and "writer" in died[0].getMessage()
    assert 'distillgate_recorder_restarts_total{thread="writer"} 1.0' in recorder.metrics.render().decode()


def test_redaction_applies_before_the_database_and_the_spool(tmp_path: Path) -> None:
    def redact(row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "request": {"redacted": True}, "response": None}

    with fresh_postgres_database() as real_url:
        proxy = TcpProxy(5432).start()
        url = real_url.replace(":5432/", f":{proxy.port}/")
        db = Database(url)
        db.migrate()
        recorder = Recorder(
            db,
            RecorderSettings(spool_dir=tmp_path / "spool", flush_interval_s=0.01, retry_interval_s=0.1),
            Metrics(),
            lambda: None,
            redact=redact,
        )
        recorder.start()
        try:
            recorder.submit(exchange(0))
            assert recorder.flush(30)
            proxy.cut()
            recorder.submit(exchange(1))
            assert recorder.flush(30)
            spooled = b"".join(p.read_bytes() for p in (tmp_path / "spool").glob("records-*"))
            assert b"redacted" in spooled and b"secret" not in spooled and b"answer" not in spooled
            proxy = TcpProxy(5432, port=proxy.port).start()
            wait_until(lambda: count_records(real_url) == 2, 30)
        finally:
            recorder.stop()
            db.dispose()
            proxy.close()
        stored = Database(real_url)
        try:
            with stored.engine.connect() as conn:
                from sqlalchemy import text

                rows = conn.execute(text("SELECT request::text, response FROM record")).all()
        finally:
            stored.dispose()
        assert rows == [('{"redacted": true}', None)] * 2
