"""PII redaction of what the gateway stores: the detectors (and the validators that keep them from
redacting order numbers and dates), then redacted values absent from the database, the spool, the
shared cache tier and a built dataset, with the client's answer untouched."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from sqlmodel import select

from demo.teacher import ScriptedTeacher
from gateway.metrics import Metrics
from gateway.recorder import Exchange, Recorder
from gateway.redaction import Redactor
from gateway.settings import RecorderSettings
from gateway.store.db import Database
from gateway.store.models import CacheEntry, Record, new_id
from router.policy import Policy, PolicyError, parse_policy
from tests.conftest import ADMIN_KEY, make_policy, start_gateway
from tests.servers import ServerThread, free_port
from trainer.dataset import DatasetOptions, build_snapshot, snapshot_examples
from trainer.scheduler import usable_records_since

EMAIL = "jane.doe@example.org"
PHONE = "+44 20 7946 0958"
CARD = "4111 1111 1111 1111"
IBAN = "DE89 3704 0044 0532 0130 00"
IP = "203.0.113.42"
API_KEY = "sk-proj-Abcdefghijklmnop123456"
PATIENT = "PT-482913"
SECRETS = (EMAIL, PHONE, CARD, IBAN, IP, API_KEY, PATIENT, "4111111111111111", "7946 0958")
PII_TEXT = (
    f"Contact {EMAIL} or {PHONE}; card {CARD}; IBAN {IBAN}; from {IP}; key {API_KEY}; patient {PATIENT}."
)
REDACT = {"redact": {"enabled": True, "patterns": {"patient": r"PT-\d{6}"}}}


def policy_with_redaction(teacher_url: str, **redact: Any) -> Policy:
    return make_policy(teacher_url, defaults={"redact": {**REDACT["redact"], **redact}})


def test_each_detector_redacts_its_kind_and_spares_lookalikes() -> None:
    policy = parse_policy({"teacher": {"base_url": "http://t/v1"}, **{"defaults": REDACT}})
    metrics = Metrics()
    redactor = Redactor(lambda: policy, metrics)
    row = {"task": "t", "request": {"messages": [{"role": "user", "content": PII_TEXT}]}, "response": None}
    out = redactor.row(row)
    text = out["request"]["messages"][0]["content"]
    for secret in SECRETS:
        assert secret not in text
    for kind in ("email", "phone", "card", "iban", "ip", "api_key", "patient"):
        assert f"[REDACTED:{kind}]" in text
    assert out["redacted"] is True
    # Lookalikes stay: a number failing Luhn, a date, an order id, a version string.
    plain = "order 1234 5678 9012 3456 on 2024-05-01, ticket 12345, version 1.2.3, 3 items"
    kept = redactor.row({"task": "t", "request": {"text": plain}})
    assert kept["request"]["text"] == plain and kept["redacted"] is None
    (family,) = metrics.redactions.collect()
    counted = {s.labels["kind"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert counted["email"] == 1 and counted["card"] == 1


def test_redaction_is_off_unless_the_policy_turns_it_on() -> None:
    policy = parse_policy({"teacher": {"base_url": "http://t/v1"}})
    row = {"task": "t", "request": {"text": EMAIL}}
    assert Redactor(lambda: policy).row(row)["request"]["text"] == EMAIL


def test_a_bad_pattern_fails_the_policy_load_naming_it() -> None:
    with pytest.raises(PolicyError, match=r"defaults\.redact\.patterns"):
        parse_policy(
            {"teacher": {"base_url": "http://t/v1"}, "defaults": {"redact": {"patterns": {"x": "(a"}}}}
        )
    with pytest.raises(PolicyError, match=r"not a valid RE2"):
        # RE2 refuses what could backtrack without bound.
        parse_policy(
            {"teacher": {"base_url": "http://t/v1"}, "defaults": {"redact": {"patterns": {"x": r"(a)\1"}}}}
        )


def _stored_text(db: Database) -> str:
    with db.session() as session:
        records = session.exec(select(Record)).all()
        cache = session.exec(select(CacheEntry)).all()
        return json.dumps([r.model_dump(mode="json") for r in records]) + "".join(
            c.body.decode("utf-8", "replace") for c in cache
        )


def test_redacted_values_reach_neither_the_database_nor_the_shared_cache(
    teacher: tuple[ScriptedTeacher, ServerThread], database_url: str, tmp_path: Path
) -> None:
    _, teacher_server = teacher
    server, parts, key = start_gateway(database_url, policy_with_redaction(teacher_server.url), tmp_path)
    try:
        oa = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        for content in (PII_TEXT, "a clean question"):
            answer = oa.chat.completions.create(
                model="teacher-large", messages=[{"role": "user", "content": content}], temperature=0
            )
            assert answer.choices[0].message.content == f"You said: {content}"  # the client's answer is whole
        assert parts.recorder.flush(30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with parts.db.session() as session:
                if session.exec(select(CacheEntry)).all():
                    break
            time.sleep(0.05)
        stored = _stored_text(parts.db)
        for secret in SECRETS:
            assert secret not in stored
        assert "[REDACTED:email]" in stored and "a clean question" in stored  # the check sees content
        with parts.db.session() as session:
            flags = {
                (r.request or {})["messages"][0]["content"][:7]: r.redacted
                for r in session.exec(select(Record))
            }
            entries = session.exec(select(CacheEntry)).all()
        assert flags == {"Contact": True, "a clean": None}
        assert len(entries) == 1 and b"a clean question" in entries[0].body  # only the clean answer is shared
        assert parts.cache.kept_out == 1
        scrape = httpx.get(server.url + "/metrics").text
        assert 'distillgate_redactions_total{kind="email",task=' in scrape
        records = httpx.get(
            server.url + "/admin/records", headers={"authorization": f"Bearer {ADMIN_KEY}"}
        ).json()
        assert any(r["redacted"] for r in records["data"])
    finally:
        server.stop()


def test_the_spool_gets_only_redacted_rows(tmp_path: Path) -> None:
    """The database is away (nothing listens on its port): rows go to the spool, redacted."""
    policy = parse_policy({"teacher": {"base_url": "http://t/v1"}, "defaults": REDACT})
    db = Database(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none", connect_timeout_s=1)
    metrics = Metrics()
    recorder = Recorder(
        db,
        RecorderSettings(spool_dir=tmp_path / "spool", flush_interval_s=0.02),
        metrics,
        lambda: policy,
        redact=Redactor(lambda: policy, metrics).row,
    )
    recorder.start()
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": PII_TEXT}]}
        answer = {
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": PII_TEXT}, "finish_reason": "stop"}
            ]
        }
        recorder.submit(
            Exchange(
                id=new_id(),
                task="t",
                model="m",
                target="teacher",
                request=body,
                status=200,
                latency_s=0.01,
                body=json.dumps(answer).encode(),
            )
        )
        assert recorder.flush(30)
    finally:
        recorder.stop()
    spooled = "".join(p.read_text() for p in (tmp_path / "spool").glob("records-*.jsonl"))
    assert "[REDACTED:card]" in spooled and recorder.spooled == 1
    for secret in SECRETS:
        assert secret not in spooled


def test_redacted_records_are_not_trained_on_unless_the_policy_says_so(
    teacher: tuple[ScriptedTeacher, ServerThread], sqlite_url: str, tmp_path: Path
) -> None:
    _, teacher_server = teacher
    server, parts, key = start_gateway(sqlite_url, policy_with_redaction(teacher_server.url), tmp_path)
    try:
        oa = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        for content in (PII_TEXT, "clean one", "clean two"):
            oa.chat.completions.create(
                model="teacher-large",
                messages=[{"role": "user", "content": content}],
                metadata={"task": "ds"},
            )
        assert parts.recorder.flush(30)
    finally:
        server.stop()
    db = Database(sqlite_url)
    # The scheduler counts what it could train on the same way.
    assert usable_records_since(db, "ds", None, include_redacted=False) == 2
    assert usable_records_since(db, "ds", None) == 3
    snapshot, _ = build_snapshot(db, "ds", DatasetOptions(holdout=0.0))
    assert len(snapshot.train_ids) == 2 and snapshot.counts["dropped"]["redacted"] == 1
    snapshot, _ = build_snapshot(db, "ds", DatasetOptions(holdout=0.0, train_on_redacted=True))
    train, _ = snapshot_examples(db, snapshot)
    assert len(train) == 3
    text = json.dumps([ex.messages for ex in train])
    assert "[REDACTED:iban]" in text
    for secret in SECRETS:
        assert secret not in text
