"""Retention on SQLite and PostgreSQL: bodies cleared after a task's days unless a snapshot holds
them (the metered row stays), whole months dropped (one partition each on PostgreSQL, never row
by row), migration 0002 moving existing records into the partitions, and ``distillgate db prune``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from alembic import command
from sqlalchemy import text
from sqlmodel import select
from typer.testing import CliRunner

from gateway.cli import app as cli
from gateway.report import ledger
from gateway.retention import prune
from gateway.settings import RetentionSettings
from gateway.store import partitions
from gateway.store.db import Database, alembic_config
from gateway.store.models import DatasetSnapshot, Record, Task
from router.policy import parse_policy
from tests.servers import fresh_postgres_database

NOW = datetime.now(UTC)
POLICY = parse_policy(
    {"teacher": {"base_url": "http://t/v1"}, "tasks": {"short": {"retention": {"body_days": 7}}}}
)


def _record(task: str, age: timedelta, **fields: object) -> Record:
    return Record(
        task=task,
        created_at=NOW - age,
        request={"messages": [{"role": "user", "content": f"{task} {age}"}]},
        response={"choices": [{"message": {"role": "assistant", "content": "ok"}}]},
        cost_usd=1.0,
        **fields,  # type: ignore[arg-type]
    )


def _fill(db: Database) -> dict[str, str]:
    """Records of two tasks at several ages; one old record held by a snapshot."""
    if db.dialect == "postgresql":
        with db.engine.begin() as conn:
            partitions.ensure_partitions(conn, since=partitions.add_months(NOW, -5))
    rows = {
        "short_new": _record("short", timedelta(days=1)),
        "short_old": _record("short", timedelta(days=10)),
        "short_held": _record("short", timedelta(days=11)),
        "long_old": _record("long", timedelta(days=10)),
        "ancient": _record("short", timedelta(days=130)),
    }
    with db.session() as session:
        session.add_all([Task(key="short"), Task(key="long")])
        session.add_all(rows.values())
        session.commit()
        ids = {name: row.id for name, row in rows.items()}
        session.add(DatasetSnapshot(task="short", train_ids=[ids["short_held"]], content_hash="x"))
        session.commit()
    return ids


def _bodies(db: Database) -> dict[str, bool]:
    with db.session() as session:
        return {r.id: r.request is not None for r in session.exec(select(Record))}


def test_bodies_go_after_their_days_unless_a_snapshot_holds_them(database_url: str) -> None:
    db = Database(database_url)
    db.migrate()
    ids = _fill(db)
    result = prune(db, POLICY, RetentionSettings(batch_size=2))  # batches smaller than the work
    bodies = _bodies(db)
    assert result.bodies_cleared == {"short": 2}  # short_old and ancient
    assert result.bodies_held == 1
    assert bodies[ids["short_old"]] is False and bodies[ids["ancient"]] is False
    assert bodies[ids["short_held"]] and bodies[ids["short_new"]] and bodies[ids["long_old"]]
    # The metered rows stay: the ledger still counts every exchange's cost.
    assert sum(row.spend_usd for row in ledger(db, since=NOW - timedelta(days=365))) == pytest.approx(5.0)
    assert prune(db, POLICY, RetentionSettings()).bodies_cleared == {}  # again: nothing left to do


def test_old_months_are_dropped_whole(database_url: str) -> None:
    db = Database(database_url)
    db.migrate()
    ids = _fill(db)
    result = prune(db, None, RetentionSettings(records_months=3))
    remaining = set(_bodies(db))
    assert ids["ancient"] not in remaining and ids["short_old"] in remaining and len(remaining) == 4
    if db.dialect == "postgresql":
        ancient = partitions.partition_name(partitions.month_start(NOW - timedelta(days=130)))
        assert ancient in result.partitions_dropped and result.rows_deleted == 0  # no row-by-row delete
        with db.engine.connect() as conn:
            left = partitions.month_partitions(conn)
        assert (
            partitions.month_start(NOW) in left
            and partitions.add_months(partitions.month_start(NOW), 2) in left
        )
    else:
        assert result.rows_deleted == 1


@pytest.mark.postgres
def test_migration_0002_moves_existing_records_into_month_partitions_and_back() -> None:
    with fresh_postgres_database() as url:
        config = alembic_config(url)
        command.upgrade(config, "0001")
        db = Database(url)
        with db.engine.begin() as conn:
            for age in (0, 40):
                conn.execute(
                    text(
                        "INSERT INTO record (id, created_at, task, endpoint, model, target, stream, stored, status,"
                        " prompt_tokens, completion_tokens, cached_tokens, latency_ms, cost_usd, teacher_cost_usd,"
                        " cache_hit) VALUES (:id, :at, 't', 'chat.completions', 'm', 'teacher', false, true, 200,"
                        " 1, 1, 0, 1.0, 0.5, 0.5, false)"
                    ),
                    {"id": f"r{age}", "at": NOW - timedelta(days=age)},
                )
        command.upgrade(config, "head")
        with db.engine.connect() as conn:
            assert partitions.is_partitioned(conn)
            months = partitions.month_partitions(conn)
            placed: dict[str, str] = dict(
                conn.execute(text("SELECT id, tableoid::regclass::text FROM record")).all()
            )
        assert partitions.month_start(NOW - timedelta(days=40)) in months
        assert placed["r0"] == partitions.partition_name(partitions.month_start(NOW))
        assert placed["r40"] == partitions.partition_name(partitions.month_start(NOW - timedelta(days=40)))
        command.downgrade(config, "0001")
        with db.engine.connect() as conn:
            assert not partitions.is_partitioned(conn)
            assert conn.execute(text("SELECT count(*) FROM record")).scalar() == 2
        db.dispose()


def test_db_prune_command(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'dg.db'}"
    db = Database(url)
    db.migrate()
    _fill(db)
    (tmp_path / "policy.yaml").write_text(
        yaml.safe_dump(
            {"teacher": {"base_url": "http://t/v1"}, "tasks": {"short": {"retention": {"body_days": 7}}}}
        )
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"database_url": url, "policy_file": "policy.yaml"}))
    done = CliRunner().invoke(
        cli, ["db", "prune", "--config", str(tmp_path / "config.yaml"), "--keep-months", "3", "--json"]
    )
    assert done.exit_code == 0, done.output
    result = json.loads(done.output)
    assert result["bodies_cleared"] == {"short": 2} and result["rows_deleted"] == 1
