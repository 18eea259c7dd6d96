"""Teacher answers checked by a second model: wrong ones are marked, kept, and left out of datasets."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from litestar import Litestar, Request, post
from prometheus_client.parser import text_string_to_metric_families
from sqlmodel import select

from gateway.settings import Settings
from gateway.store.db import Database
from gateway.store.models import AnswerCheck, Record, Task, Usage
from gateway.worker import create_worker_app
from router.policy import parse_policy
from tests.servers import ServerThread, serve, wait_until
from tests.trainer.conftest import INTENTS, add_records, intent_records
from trainer.dataset import DatasetOptions, build_snapshot, select_examples
from trainer.evaluate import evaluate_adapter
from trainer.finetune import FinetuneConfig, finetune
from trainer.validation import AnswerChecker, chosen, parse_score, summary


def true_label(email: str) -> str:
    words = set(re.findall(r"[a-z]+", email.lower()))
    return next(label for label, keys in INTENTS.items() if words & set(keys))


class Checker:
    """A stand-in second model: it knows the true label of every email it is shown."""

    def __init__(self) -> None:
        self.calls = 0
        self.bodies: list[dict[str, Any]] = []

    def app(self) -> Litestar:
        @post("/v1/chat/completions", status_code=200)
        async def chat(request: Request[Any, Any, Any]) -> dict[str, Any]:
            body = await request.json()
            self.calls += 1
            self.bodies.append(body)
            prompt = body["messages"][0]["content"]
            conversation = prompt.split("CONVERSATION:\n", 1)[1].split("\n\nANSWER:\n", 1)[0]
            answer = prompt.rsplit("ANSWER:\n", 1)[1].strip()
            email = conversation.splitlines()[-1]
            score = "10" if answer == true_label(email) else "1"
            return {
                "id": "chk",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": score}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101},
            }

        return Litestar([chat])


@pytest.fixture
def checker() -> Iterator[tuple[Checker, ServerThread]]:
    state = Checker()
    with serve(state.app()) as server:
        yield state, server


def wrong_on_a_share(task: str, n: int, every: int) -> tuple[list[Record], set[str]]:
    """Intent records whose teacher answer is wrong on every ``every``-th one."""
    records = intent_records(task, n)
    wrong: set[str] = set()
    labels = list(INTENTS)
    for i, record in enumerate(records):
        if i % every == 0:
            truth = record.response["choices"][0]["message"]["content"]  # type: ignore[index]
            record.response["choices"][0]["message"]["content"] = labels[(labels.index(truth) + 1) % 4]  # type: ignore[index]
            wrong.add(record.id)
    return records, wrong


def policy_for(checker_url: str, **validate: Any) -> Any:
    return parse_policy(
        {
            "teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "teacher-large"},
            "prices": {"checker-small": {"input": 0.5, "output": 1.5}},
            "tasks": {
                "intent": {
                    "validate": {"model": "checker-small", "base_url": checker_url + "/v1", **validate}
                }
            },
        }
    )


def test_wrong_answers_are_marked_kept_and_left_out_of_the_dataset(
    store: Database, checker: tuple[Checker, ServerThread]
) -> None:
    state, server = checker
    records, wrong = wrong_on_a_share("intent", 60, every=4)
    add_records(store, records)
    policy = policy_for(server.url, min_score=0.5, max_concurrency=3)

    counts = AnswerChecker(store, policy).run("intent")
    assert counts is not None
    assert (counts.checked, counts.failed, counts.passed) == (60, len(wrong), 60 - len(wrong))
    assert state.calls == 60
    assert {b["model"] for b in state.bodies} == {"checker-small"}

    with store.session() as session:
        failed = {c.record_id for c in session.exec(select(AnswerCheck).where(AnswerCheck.passed == False))}  # noqa: E712
        kept = session.exec(select(Record).where(Record.task == "intent", Record.target == "teacher")).all()
        ledger = session.exec(select(Record).where(Record.target == "validator")).all()
    assert failed == wrong
    assert len(kept) == 60  # marked, not deleted
    # The checks' spend is in the ledger as its own target, with no content.
    assert len(ledger) == 60
    assert all(r.request is None and r.response is None and not r.stored for r in ledger)
    assert sum(r.cost_usd for r in ledger) == pytest.approx(60 * (100 * 0.5 + 1.5) / 1e6)
    assert summary(store, "intent") == {"checked": 60, "passed": 60 - len(wrong), "failed": len(wrong)}

    # Verdicts are kept: a second pass calls the checker for nothing.
    again = AnswerChecker(store, policy).run("intent")
    assert again is not None and again.checked == 0 and state.calls == 60

    _, selection = build_snapshot(store, "intent", DatasetOptions(holdout=0.0))
    assert selection.dropped["failed_validation"] == len(wrong)
    assert {ex.record_id for ex in selection.train}.isdisjoint(wrong)
    assert len(selection.train) == 60 - len(wrong)


def test_checks_count_against_the_budget_of_the_key_whose_answers_they_checked(
    store: Database, checker: tuple[Checker, ServerThread]
) -> None:
    _, server = checker
    records = intent_records("intent", 8)
    for record in records:
        record.api_key_id = 7
    add_records(store, records)
    counts = AnswerChecker(store, policy_for(server.url)).run("intent")
    assert counts is not None and counts.checked == 8
    with store.session() as session:
        ledger = session.exec(
            select(Record).where(Record.target == "validator", Record.api_key_id == 7)
        ).all()
        month = session.exec(
            select(Usage).where(Usage.key_id == 7, Usage.task == "", Usage.window == "month")
        ).all()
    assert len(ledger) == 8
    # The gateway's limiter reads these counters back (gateway.limits): the budget sees the checks.
    assert sum(u.spend_usd for u in month) == pytest.approx(sum(r.cost_usd for r in ledger))
    assert sum(u.spend_usd for u in month) > 0


def test_a_workers_checks_are_on_its_metrics_by_verdict(
    checker: tuple[Checker, ServerThread], tmp_path: Path
) -> None:
    """``distillgate worker`` checks a collecting task's answers on its own and counts them in
    ``distillgate_answer_checks_total`` (the dashboard's "Answer checks by verdict")."""
    _, server = checker
    db_url = f"sqlite:///{tmp_path / 'worker.db'}"
    db = Database(db_url)
    db.create_all()
    records, wrong = wrong_on_a_share("intent", 20, every=4)
    add_records(db, records)
    with db.session() as session:
        session.add(Task(key="intent"))
        session.commit()
    db.dispose()
    policy = {
        "teacher": {"base_url": "http://127.0.0.1:9/v1", "model": "teacher-large"},
        "student": {"base_url": "http://student.invalid/v1", "base_model": "tiny"},  # 20 records: no training
        "tasks": {"intent": {"validate": {"model": "checker-small", "base_url": server.url + "/v1"}}},
    }
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    settings = Settings(database_url=db_url, policy_file=tmp_path / "policy.yaml", scheduler_interval_s=0.2)
    with serve(create_worker_app(settings)) as worker:

        def checks() -> dict[str, float]:
            text = httpx.get(worker.url + "/metrics", timeout=10).text
            family = next(
                f for f in text_string_to_metric_families(text) if f.name == "distillgate_answer_checks"
            )
            return {s.labels["verdict"]: s.value for s in family.samples if s.name.endswith("_total")}

        wait_until(lambda: sum(checks().values()) >= 20, timeout_s=30)
        counted = checks()
    assert counted == {"passed": 20 - len(wrong), "failed": len(wrong)}


def test_a_task_without_validate_is_not_checked(
    store: Database, checker: tuple[Checker, ServerThread]
) -> None:
    state, server = checker
    policy = policy_for(server.url)
    assert AnswerChecker(store, policy).run("other-task") is None
    assert state.calls == 0


def test_scores_are_read_from_what_checkers_say() -> None:
    assert parse_score("7") == pytest.approx(0.7)
    assert parse_score("Score: 9/10") == pytest.approx(0.9)
    assert parse_score("10") == 1.0
    assert parse_score("0") == 0.0
    assert parse_score("I think 8.5") == pytest.approx(0.85)
    assert parse_score("no idea") is None
    assert parse_score("") is None


def test_the_checked_share_is_the_same_everywhere() -> None:
    ids = [f"rec-{i}" for i in range(4000)]
    picked = [i for i in ids if chosen(i, 0.25)]
    assert picked == [i for i in ids if chosen(i, 0.25)]
    assert 0.2 < len(picked) / len(ids) < 0.3
    assert all(chosen(i, 1.0) for i in ids[:10])


def test_a_student_trained_on_validated_answers_agrees_more_with_the_truth(
    tiny_model: Path, checker: tuple[Checker, ServerThread], tmp_path: Path
) -> None:
    """The teacher calls most sales emails support: validation leaves those answers out, and the
    student trained on what is left gets sales right where one trained on everything does not."""
    _, server = checker
    db = Database(f"sqlite:///{tmp_path / 'store.db'}")
    db.create_all()
    records = intent_records("intent", 240)
    wrong = 0
    sales = [
        r.response
        for r in records
        if r.response and r.response["choices"][0]["message"]["content"] == "sales"
    ]
    for i, response in enumerate(sales):
        if i % 5 < 3:
            response["choices"][0]["message"]["content"] = "support"
            wrong += 1
    add_records(db, records)
    counts = AnswerChecker(db, policy_for(server.url)).run("intent")
    assert counts is not None and counts.failed == wrong == 36

    _, validated = build_snapshot(db, "intent", DatasetOptions(holdout=0.0))
    everything = select_examples(
        reversed(records), DatasetOptions(holdout=0.0)
    )  # the same records, checks ignored
    assert len(validated.train) == 240 - wrong and len(everything.train) == 240
    fresh = select_examples(
        reversed(intent_records("intent", 60, start=1000, seed=7)), DatasetOptions(holdout=0.0)
    ).train
    config = FinetuneConfig(method="full", epochs=20, batch_tokens=640, max_seq_len=320, learning_rate=1e-3)
    agreement = {}
    for name, selection in (("everything", everything), ("validated", validated)):
        out = tmp_path / name
        finetune(tiny_model, selection.train, [], out, config)
        agreement[name] = evaluate_adapter(str(tiny_model), str(out), fresh, scorer="exact").agreement
    assert agreement["validated"] > agreement["everything"], agreement
    db.dispose()


def test_the_admin_api_shows_a_tasks_answer_checks(
    checker: tuple[Checker, ServerThread], tmp_path: Path
) -> None:
    from gateway.store.models import Task
    from router.tasks import task_detail

    _, server = checker
    db = Database(f"sqlite:///{tmp_path / 'store.db'}")
    db.create_all()
    records, wrong = wrong_on_a_share("intent", 20, every=5)
    add_records(db, records)
    with db.session() as session:
        session.add(Task(key="intent"))
        session.commit()
    AnswerChecker(db, policy_for(server.url)).run("intent")
    checks = task_detail(db, "intent").answer_checks
    assert (checks.checked, checks.passed, checks.failed) == (20, 20 - len(wrong), len(wrong))
    db.dispose()
