"""Every query the gateway, the trainer, the report and the admin API make reads through an index
on PostgreSQL: each statement is captured as the real code runs it, then ``EXPLAIN``ed with
sequential scans priced out (``enable_seqscan = off``): a plan that still scans a table whole has
no index to use. A few reads are whole-table by design (every task, every valid key: small tables
read in full once a second or a minute); they are named below with the reason."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event

from gateway.auth import KeyRing
from gateway.cache import PromptCache
from gateway.errors import AuthenticationFailed
from gateway.keys import KeySettings, create_key, get_key, list_keys, revoke_key
from gateway.limits import Limiter
from gateway.metrics import Metrics
from gateway.report import ledger
from gateway.retention import prune
from gateway.settings import RetentionSettings
from gateway.store.db import Database
from gateway.store.models import Adapter, DatasetSnapshot, Record, ShadowPair, Stage, Task, TaskTransition
from gateway.store.queries import attach_feedback, recent_records, record
from gateway.task_table import TaskTable
from router.policy import parse_policy
from router.promotion import Promoter
from router.stages import last_transition
from router.tasks import recent_pairs, task_detail, task_rows
from tests.servers import fresh_postgres_database
from trainer.dataset import build_snapshot, snapshot_examples
from trainer.registry import get_adapter, list_adapters, list_runs, next_version
from trainer.scheduler import usable_records_since

pytestmark = pytest.mark.postgres

WHOLE_TABLE_READS = {
    "task": "the task table is read whole every second (TaskTable): one row per task",
    "apikey": "the key ring reloads every valid key once a minute (the changed ones every second use an index)",
}

POLICY = parse_policy(
    {
        "teacher": {"base_url": "http://t/v1", "model": "m"},
        "tasks": {"t": {"retention": {"body_days": 1}}},
    }
)


def _seed(db: Database) -> dict[str, Any]:
    now = datetime.now(UTC)
    with db.session() as session:
        session.add(Task(key="t", stage=Stage.shadow, adapter="t@v1"))
        records = [
            Record(
                task="t",
                created_at=now - timedelta(hours=i),
                request={"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]},
                response={
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "a"},
                            "finish_reason": "stop",
                        }
                    ]
                },
                finish_reason="stop",
                api_key_id=1,
            )
            for i in range(30)
        ]
        session.add_all(records)
        session.add_all(
            ShadowPair(record_id=r.id, task="t", adapter="t@v1", score=1.0, passed=True) for r in records[:5]
        )
        session.add(
            TaskTransition(task="t", from_stage=Stage.collecting, to_stage=Stage.shadow, adapter="t@v1")
        )
        session.add(Adapter(name="t@v1", task="t", version=1, path="/x", base_model="b"))
        session.commit()
        return {"record_id": records[0].id, "since": now - timedelta(days=1)}


def _exercise(db: Database, seeded: dict[str, Any]) -> None:
    """What the gateway, the trainer, the report and the admin API run against the database."""
    row, secret = create_key(db, "app", settings=KeySettings(rpm=10, budget_usd=1.0, task_limits=None))
    assert row.id is not None
    ring = KeyRing(db)
    ring.load()
    ring.refresh()
    ring._changed_since = None
    ring.refresh()

    with contextlib.suppress(AuthenticationFailed):
        asyncio.run(ring.authenticate("Bearer dg-" + "x" * 43))  # a well-shaped unknown key: one lookup
    asyncio.run(_gateway_side(db, ring, secret, row.id))
    TaskTable(db, Metrics(), lambda: POLICY).load()
    revoke_key(db, row.id)
    list_keys(db)
    get_key(db, row.id)
    # The admin API and the report.
    recent_records(db)
    recent_records(db, task="t")
    record(db, seeded["record_id"])
    attach_feedback(db, seeded["record_id"], {"score": 1}, key_id=None, admin=True)
    ledger(db, since=seeded["since"], task="t")
    ledger(db, since=seeded["since"])
    task_rows(db)
    task_detail(db, "t")
    recent_pairs(db, "t")
    recent_pairs(db, "t", kind="shadow", adapter="t@v1")
    # The gate.
    promoter = Promoter(db, lambda: POLICY)
    with db.session() as session:
        task = session.get(Task, "t")
    assert task is not None
    promoter.evidence(task, ["shadow"], seeded["since"])
    promoter.window(task, ["audit"], seeded["since"], 50)
    last_transition(db, "t")
    # The trainer.
    usable_records_since(db, "t", None)
    usable_records_since(db, "t", seeded["since"])
    snapshot, _ = build_snapshot(db, "t")
    with db.session() as session:
        stored = session.get(DatasetSnapshot, snapshot.id)
    assert stored is not None
    snapshot_examples(db, stored)
    next_version(db, "t")
    list_adapters(db)
    list_adapters(db, "t")
    get_adapter(db, "t@v1")
    list_runs(db)
    list_runs(db, "t")
    # Retention.
    prune(db, POLICY, RetentionSettings(records_months=2, batch_size=10))


async def _gateway_side(db: Database, ring: KeyRing, secret: str, key_id: int) -> None:
    caller = await ring.authenticate(f"Bearer {secret}")
    limiter = Limiter(db)
    limiter.admit(caller, "t")
    limiter.charge_rows([{"api_key_id": key_id, "task": "t", "prompt_tokens": 3, "cost_usd": 0.1}])
    await limiter.sync()
    await limiter.sync()
    cache = PromptCache(db)
    cache.put("k" * 64, "t", b'{"choices":[]}', 60, 1 << 20)
    await cache.drain()
    cache._lru.clear()
    await cache.get("k" * 64)


def _seq_scans(plan: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(plan, dict):
        if plan.get("Node Type") == "Seq Scan" and not str(plan.get("Relation Name", "")).startswith("pg_"):
            found.add(str(plan.get("Relation Name")))
        for value in plan.values():
            found |= _seq_scans(value)
    elif isinstance(plan, list):
        for value in plan:
            found |= _seq_scans(value)
    return found


def test_every_query_uses_an_index() -> None:
    with fresh_postgres_database() as url:
        db = Database(url)
        db.migrate()
        seeded = _seed(db)
        captured: list[tuple[str, Any]] = []

        def capture(
            conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
        ) -> None:
            verb = statement.lstrip().split(None, 1)[0].upper()
            if verb in ("SELECT", "UPDATE", "DELETE") and not many:
                captured.append((statement, parameters))

        event.listen(db.engine, "before_cursor_execute", capture)
        _exercise(db, seeded)
        event.remove(db.engine, "before_cursor_execute", capture)
        assert len(captured) > 40  # the exercise did reach the database
        problems: dict[str, str] = {}
        raw = db.engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("SET enable_seqscan = off")
            for statement, parameters in {s: p for s, p in captured}.items():
                cursor.execute("EXPLAIN (FORMAT JSON) " + statement, parameters)
                fetched = cursor.fetchone()
                assert fetched is not None
                scans = _seq_scans(fetched[0]) - set(WHOLE_TABLE_READS)
                if scans:
                    problems[" ".join(statement.split())[:300]] = ", ".join(sorted(scans))
            raw.rollback()
        finally:
            raw.close()
            db.dispose()
        assert problems == {}, "\n".join(f"{tables}: {sql}" for sql, tables in problems.items())
