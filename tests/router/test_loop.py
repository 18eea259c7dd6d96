"""The router's pieces together, without the gateway: decide → mirror → score → store → gate → stage.

A stand-in student that agrees with the teacher walks shadow → canary → serving, with the
student's share of traffic at each canary step matching the policy; one that disagrees stays
in shadow.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.store.db import Database
from gateway.store.models import Stage, Task
from router.decide import RequestFeatures, StudentEnvelope, TaskState, decide
from router.policy import Policy, parse_policy
from router.promotion import Promoter
from router.shadow import ScoredPair, ShadowJob, ShadowMirror

LABELS = ["billing", "refund", "shipping", "account"]


def reply(content: str) -> dict[str, Any]:
    return {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ]
    }


def make_policy() -> Policy:
    return parse_policy(
        {
            "teacher": {"base_url": "http://teacher/v1", "model": "gpt-big"},
            "student": {"base_url": "http://student/v1", "base_model": "tiny"},
            "defaults": {
                "shadow": {"rate": 0.5, "max_concurrency": 1000},
                "promote": {"scorer": "exact", "threshold": 0.8, "min_samples": 40},
                "canary": [0.2, 1.0],
                "audit": {"rate": 0.1, "min_samples": 20},
            },
        }
    )


@pytest.fixture
def db(sqlite_url: str) -> Iterator[Database]:
    database = Database(sqlite_url)
    database.create_all()
    envelope = StudentEnvelope(models=frozenset({"gpt-big"}), max_prompt_tokens=1000)
    with database.session() as session:
        session.add(
            Task(key="classify", stage=Stage.shadow, adapter="classify@v1", features=envelope.to_features())
        )
        session.commit()
    yield database
    database.dispose()


async def run_traffic(db: Database, agree: bool, rounds: int, per_round: int = 100) -> dict[str, Any]:
    policy = make_policy()
    rng = random.Random(7)

    async def student(adapter: str, body: dict[str, Any]) -> dict[str, Any]:
        label = body["messages"][-1]["content"].split(":")[1]
        return reply(label if agree else "spam")

    async def teacher(body: dict[str, Any]) -> dict[str, Any]:
        return reply(body["messages"][-1]["content"].split(":")[1])

    promoter = Promoter(db, lambda: policy)
    mirror = ShadowMirror(db, lambda: policy, student, teacher, max_in_flight=1000)

    def gate(batch: list[ScoredPair]) -> None:
        promoter.check_many(p.job.task for p in batch)

    mirror.on_stored.append(gate)
    served: dict[tuple[str, int], list[str]] = {}
    features = RequestFeatures(model="gpt-big", prompt_tokens=20)
    n = 0
    for _ in range(rounds):
        with db.session() as session:
            task = session.get(Task, "classify")
        assert task is not None
        state = TaskState.from_task(task, policy.student)
        for _ in range(per_round):
            n += 1
            label = LABELS[n % len(LABELS)]
            request = {"model": "gpt-big", "messages": [{"role": "user", "content": f"label:{label}"}]}
            d = decide(state, policy.for_task("classify"), features, rng.random())
            served.setdefault((state.stage.value, state.canary_step), []).append(d.target)
            if d.mirror:
                job = ShadowJob(
                    f"r{n}",
                    "classify",
                    d.adapter or "",
                    d.pair_kind or "shadow",
                    state.stage,
                    request,
                    teacher_response=reply(label),
                )
                mirror.submit(job)
            elif d.audit:
                answer = reply(label if agree else "spam")
                job = ShadowJob(
                    f"r{n}",
                    "classify",
                    d.adapter or "",
                    d.pair_kind or "audit",
                    state.stage,
                    request,
                    student_response=answer,
                )
                mirror.submit(job)
        await mirror.drain()
    with db.session() as session:
        final = session.get(Task, "classify")
    return {"task": final, "served": served, "dropped": mirror.counters.dropped}


async def test_an_agreeing_student_walks_to_serving_with_the_policys_traffic_shares(db: Database) -> None:
    result = await run_traffic(db, agree=True, rounds=6, per_round=400)
    assert result["task"].stage == Stage.serving.value and result["dropped"] == 0
    served = result["served"]
    assert set(served[("shadow", 0)]) == {"teacher"}
    canary = served[("canary", 0)]
    share = canary.count("student") / len(canary)
    assert abs(share - 0.2) < 5 * math.sqrt(0.2 * 0.8 / len(canary))
    assert set(served[("canary", 1)]) == {"student"}  # the last step is 100%
    assert set(served[("serving", 0)]) == {"student"}


async def test_a_disagreeing_student_never_leaves_shadow(db: Database) -> None:
    result = await run_traffic(db, agree=False, rounds=5)
    assert result["task"].stage == Stage.shadow.value
    assert set(result["served"]) == {("shadow", 0)}
