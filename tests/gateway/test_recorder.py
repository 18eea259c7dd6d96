"""The recorder never makes the client wait on the database, and loses nothing when it goes away."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import httpx
import openai
import pytest
from sqlmodel import func, select

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
