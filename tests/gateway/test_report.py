"""``distillgate report``: spend, teacher-equivalent cost and savings per task and target, over a window.

Known traffic goes through a real gateway (teacher with provider prompt caching, the cache, a
stand-in student), then the real CLI reads the ledger back, on SQLite and on PostgreSQL.
Prices are ``tests.conftest.make_policy``'s (USD per million tokens): teacher-large input 2.50,
cached_input 1.25, output 10.00; student input 0.05, output 0.10. The teacher counts a word as a token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from sqlalchemy import update
from sqlmodel import col
from typer.testing import CliRunner

from demo.teacher import ScriptedTeacher, create_teacher_app
from gateway.cli import app
from gateway.store.models import Record, Stage, Task
from router.decide import StudentEnvelope
from tests.conftest import ADMIN_KEY, TEACHER_KEY, make_policy, start_gateway
from tests.servers import flush, fresh_postgres_database, serve, wait_until

ALPHA = (1 * 2.5 + 1 * 1.25 + 4 * 10.0) / 1e6  # "alpha beta": 2 prompt tokens (1 cached), 4 completion
GAMMA = (
    1 * 2.5 + 3 * 10.0
) / 1e6  # "gamma": 1 prompt token (none cached: half of 1 rounds down), 3 completion
STUDENT = (2 * 0.05 + 4 * 0.1) / 1e6  # "hello student": 2 prompt, 4 completion at the student's price
STUDENT_AS_TEACHER = (2 * 2.5 + 4 * 10.0) / 1e6  # the student reports no cached prompt tokens

runner = CliRunner()


@dataclass
class Ledger:
    config: Path


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ledger]:
    """A database holding the records of known traffic, and a settings file pointing at it."""
    tmp_path = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("TEACHER_API_KEY", TEACHER_KEY)
        if request.param == "sqlite":
            yield _ledger(f"sqlite:///{tmp_path / 'distillgate.db'}", tmp_path)
        else:
            with fresh_postgres_database() as url:
                yield _ledger(url, tmp_path)


def _ledger(database_url: str, tmp_path: Path) -> Ledger:
    teacher = ScriptedTeacher(api_key=TEACHER_KEY, cached_ratio=0.5)
    with (
        serve(create_teacher_app(teacher)) as teacher_server,
        serve(create_teacher_app(ScriptedTeacher(model="tiny-base"))) as student_server,
    ):
        policy = make_policy(
            teacher_server.url,
            student={"base_url": student_server.url + "/v1", "base_model": "tiny-base"},
            defaults={"audit": {"rate": 0.0}},
        )
        server, gw, key = start_gateway(database_url, policy, tmp_path)
        try:
            with gw.db.session() as session:
                session.add(
                    Task(
                        key="student",
                        stage=Stage.serving,
                        adapter="student@v1",
                        student_ratio=1.0,
                        features=StudentEnvelope().to_features(),
                    )
                )
                session.commit()
            wait_until(lambda: "student" in gw.tasks.task_states, 10)
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)

            def ask(task: str, text: str, **extra: Any) -> Any:
                return client.chat.completions.with_raw_response.create(
                    model="teacher-large",
                    messages=[{"role": "user", "content": text}],
                    metadata={"task": task},
                    **extra,
                )

            assert ask("email", "alpha beta", temperature=0).headers["x-distillgate-target"] == "teacher"
            assert ask("email", "alpha beta", temperature=0).headers["x-distillgate-target"] == "cache"
            assert ask("email", "gamma").headers["x-distillgate-target"] == "teacher"
            with pytest.raises(openai.BadRequestError):
                ask("broken", "!error 400")
            assert ask("student", "hello student").headers["x-distillgate-target"] == "student:student@v1"
            # A new adapter version: the ledger still reports one "student" target for the task.
            with gw.db.session() as session:
                session.execute(update(Task).where(col(Task.key) == "student").values(adapter="student@v2"))
                session.commit()
            wait_until(lambda: gw.tasks.task_states["student"].adapter == "student@v2", 10)
            assert ask("student", "hi student").headers["x-distillgate-target"] == "student:student@v2"
            old = ask("old", "gamma").headers["x-distillgate-request-id"]
            flush(server.url, ADMIN_KEY)
            # Traffic from two days ago: outside the default 24 h window.
            with gw.db.session() as session:
                record = session.get(Record, old)
                assert record is not None
                record.created_at -= timedelta(days=2)
                session.add(record)
                session.commit()
        finally:
            server.stop()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"database_url": database_url}))
    return Ledger(config)


def report_json(ledger: Ledger, *args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["report", "--config", str(ledger.config), "--json", *args])
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def by_task_target(data: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(row["task"], row["target"]): row for row in data["rows"]}


def test_json_gives_spend_teacher_equivalent_and_savings_per_task_and_target(ledger: Ledger) -> None:
    data = report_json(ledger)
    assert [(row["task"], row["target"]) for row in data["rows"]] == [
        ("broken", "teacher"),
        ("email", "cache"),
        ("email", "teacher"),
        ("student", "student"),
    ]
    rows = by_task_target(data)
    counts = {
        key: (r["requests"], r["errors"], r["prompt_tokens"], r["completion_tokens"], r["cached_tokens"])
        for key, r in rows.items()
    }
    assert counts == {
        ("broken", "teacher"): (1, 1, 0, 0, 0),
        ("email", "cache"): (1, 0, 2, 4, 1),
        ("email", "teacher"): (2, 0, 3, 7, 1),
        ("student", "student"): (2, 0, 4, 8, 0),  # two adapter versions, one target
    }
    expected = {  # (spend, teacher-equivalent, savings)
        ("broken", "teacher"): (0.0, 0.0, 0.0),
        ("email", "cache"): (0.0, ALPHA, ALPHA),  # a hit costs nothing and saves what the teacher charged
        ("email", "teacher"): (ALPHA + GAMMA, ALPHA + GAMMA, 0.0),
        ("student", "student"): (2 * STUDENT, 2 * STUDENT_AS_TEACHER, 2 * (STUDENT_AS_TEACHER - STUDENT)),
    }
    for key, (spend, teacher, savings) in expected.items():
        row = rows[key]
        assert row["spend_usd"] == pytest.approx(spend, rel=1e-9, abs=1e-15), key
        assert row["teacher_usd"] == pytest.approx(teacher, rel=1e-9, abs=1e-15), key
        assert row["savings_usd"] == pytest.approx(savings, rel=1e-9, abs=1e-15), key
        assert row["latency_ms_avg"] > 0
    totals = data["totals"]
    assert totals["requests"] == 6
    assert totals["spend_usd"] == pytest.approx(ALPHA + GAMMA + 2 * STUDENT, rel=1e-9)
    assert totals["teacher_usd"] == pytest.approx(2 * ALPHA + GAMMA + 2 * STUDENT_AS_TEACHER, rel=1e-9)
    assert totals["savings_usd"] == pytest.approx(ALPHA + 2 * (STUDENT_AS_TEACHER - STUDENT), rel=1e-9)


def test_window_reaches_back_as_far_as_since(ledger: Ledger) -> None:
    assert ("old", "teacher") not in by_task_target(report_json(ledger, "--since", "24h"))
    week = report_json(ledger, "--since", "3d")
    old = by_task_target(week)[("old", "teacher")]
    assert old["requests"] == 1
    assert old["spend_usd"] == pytest.approx(GAMMA, rel=1e-9)
    assert week["totals"]["requests"] == 7
    assert report_json(ledger, "--since", "1ms")["rows"] == []


def test_task_option_reports_one_task(ledger: Ledger) -> None:
    data = report_json(ledger, "--task", "email")
    assert [(row["task"], row["target"]) for row in data["rows"]] == [
        ("email", "cache"),
        ("email", "teacher"),
    ]
    assert data["totals"]["requests"] == 3
    assert data["totals"]["savings_usd"] == pytest.approx(ALPHA, rel=1e-9)


def test_table_lists_every_task_and_target_with_totals(ledger: Ledger) -> None:
    result = runner.invoke(app, ["report", "--config", str(ledger.config)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "distillgate spend since" in result.stdout

    def line_of(*words: str) -> str:
        found = [line for line in lines if all(f" {w} " in line for w in words)]
        assert len(found) == 1, (words, result.stdout)
        return found[0]

    assert "0.0001" in line_of("email", "teacher")  # 76.25 micro-dollars, four decimals
    line_of("email", "cache")
    line_of("student", "student")
    line_of("broken", "teacher")
    assert " 6 " in line_of("total")
    assert "old" not in result.stdout


@pytest.mark.parametrize("since", ["yesterday", "-1h", "", "5 days"])
def test_bad_since_is_a_clear_error_with_exit_2(since: str) -> None:
    result = runner.invoke(app, ["report", "--since", since, "--json"])
    assert result.exit_code == 2
    assert "not a duration" in result.output and "1h" in result.output
    assert "Traceback" not in result.output


def test_since_too_far_back_is_a_clear_error_with_exit_2() -> None:
    result = runner.invoke(app, ["report", "--since", "99999999999d", "--json"])
    assert result.exit_code == 2, result.output
    assert "invalid --since" in result.output and "Traceback" not in result.output


def test_empty_database_reports_zero(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"database_url": f"sqlite:///{tmp_path / 'empty.db'}"}))
    data = report_json(Ledger(config))
    assert data["rows"] == []
    assert data["totals"] == {"spend_usd": 0, "teacher_usd": 0, "savings_usd": 0, "requests": 0}
