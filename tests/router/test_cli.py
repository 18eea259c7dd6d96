"""``policy check`` and ``tasks`` through typer's runner on an app the router registers into."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from gateway.store.db import Database
from gateway.store.models import ShadowPair, Stage, Task
from router.cli import register

POLICY = """\
teacher: {base_url: https://api.example.com/v1, api_key_env: TEACHER_API_KEY, model: big-model}
student: {base_url: http://vllm:8000/v1, base_model: Qwen/Qwen2.5-1.5B-Instruct}
defaults:
  shadow: {rate: 0.2}
  promote: {scorer: auto, threshold: 0.95, min_samples: 200}
tasks:
  classify-email: {promote: {scorer: exact}}
  extract-ade: {promote: {scorer: json_fields, threshold: 0.9}, canary: [0.1, 1.0]}
"""


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """A stand-in for the distillgate entry point."""

    register(app)
    return app


def test_policy_check_prints_ok_and_each_tasks_resolved_settings(app: typer.Typer, tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    result = CliRunner().invoke(app, ["policy", "check", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"OK {path}")
    for text in ("(defaults)", "classify-email", "extract-ade", "json_fields", "10/100"):
        assert text in result.output


def test_policy_check_json_is_one_object(app: typer.Typer, tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    result = CliRunner().invoke(app, ["policy", "check", str(path), "--json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["ok"] is True
    tasks = {row["task"]: row for row in data["tasks"]}
    assert tasks["extract-ade"]["threshold"] == 0.9 and tasks["extract-ade"]["canary"] == [0.1, 1.0]
    assert tasks["classify-email"]["scorer"] == "exact" and tasks["classify-email"]["threshold"] == 0.95


def test_policy_check_names_the_bad_key_and_exits_1(app: typer.Typer, tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.replace("threshold: 0.9}", "treshold: 0.9}"))
    result = CliRunner().invoke(app, ["policy", "check", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "tasks.extract-ade.promote.treshold: unknown key" in result.output
    as_json = CliRunner().invoke(app, ["policy", "check", str(path), "--json"])
    assert as_json.exit_code == 1
    assert "treshold" in json.loads(as_json.output)["error"]


def test_policy_check_of_a_missing_file_exits_1(app: typer.Typer, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["policy", "check", str(tmp_path / "nope.yaml"), "--json"])
    assert result.exit_code == 1
    assert "cannot read" in json.loads(result.output)["error"]


def test_tasks_lists_stored_tasks_with_their_shadow_scores(app: typer.Typer, database_url: str) -> None:
    db = Database(database_url)
    db.create_all()
    with db.session() as session:
        session.add(
            Task(
                key="classify",
                stage=Stage.canary,
                adapter="classify@v2",
                canary_step=1,
                student_ratio=0.25,
                reason="gate: lower 0.97",
            )
        )
        session.add(Task(key="extract", stage=Stage.collecting))
        for passed in (True, True, True, False):
            session.add(
                ShadowPair(
                    record_id="r", task="classify", adapter="classify@v2", score=float(passed), passed=passed
                )
            )
        session.add(
            ShadowPair(record_id="r", task="classify", adapter="classify@v1", score=0.0, passed=False)
        )
        session.commit()
    db.dispose()
    result = CliRunner().invoke(app, ["tasks", "--database-url", database_url, "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["task"]: row for row in json.loads(result.output)["tasks"]}
    assert rows["classify"]["stage"] == "canary" and rows["classify"]["student_ratio"] == 0.25
    assert rows["classify"]["pairs"] == 4 and rows["classify"]["pass_rate"] == 0.75
    assert rows["extract"]["pairs"] == 0 and rows["extract"]["pass_rate"] is None
    table = CliRunner().invoke(app, ["tasks", "--database-url", database_url], env={"COLUMNS": "200"})
    assert table.exit_code == 0
    assert "canary 1" in table.output and "classify@v2" in table.output and "0.750" in table.output
