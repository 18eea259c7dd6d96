"""A real pretrained student through the whole loop: the gateway, pointed at SmolLM2-135M-Instruct
as a GGUF file inside an installed package, records traffic, trains a LoRA adapter on it,
evaluates it offline, publishes it to the embedded student server, shadows it and serves it.

Kept short for the suite's budget: 48 records, a few dozen optimizer steps, single-word answers.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import openai
import pytest

from demo.teacher import ScriptedTeacher
from gateway.store.models import Stage, Task
from router.decide import StudentEnvelope, estimate_prompt_tokens
from router.policy import parse_policy
from tests.conftest import start_gateway
from tests.servers import ServerThread, wait_until
from tests.trainer.conftest import INTENT_SYSTEM, intent_email
from tests.trainer.test_end_to_end import TASK, intent_teacher, send_traffic
from trainer.generation import StudentModels
from trainer.scheduler import Scheduler
from trainer.student_server import create_student_app


def gguf_policy(teacher_url: str, student_url: str, base_model: str) -> dict[str, Any]:
    return {
        "teacher": {
            "base_url": teacher_url + "/v1",
            "api_key_env": "TEACHER_API_KEY",
            "model": "teacher-large",
        },
        "student": {
            "base_url": student_url + "/v1",
            "base_model": base_model,
            "engine": "embedded",
            "timeout": "60s",
        },
        "prices": {
            "teacher-large": {"input": 2.5, "output": 10.0},
            "student": {"input": 0.05, "output": 0.1},
        },
        "defaults": {
            "cache": {"enabled": False},
            # The default train policy but for what keeps this test short: fewer records, shorter
            # micro-batches (more steps from few records), answers of a word.
            "train": {
                "min_new_records": 40,
                "holdout": 0.25,
                "batch_tokens": 256,
                "max_seq_len": 256,
                "epochs": 4,
                "min_offline_score": 0.75,
                "max_completion_tokens": 4,
            },
            "shadow": {"rate": 1.0, "max_concurrency": 4},
            "promote": {"scorer": "exact", "threshold": 0.5, "min_samples": 8},
            "canary": [1.0],
            "audit": {"rate": 0.0},
        },
    }


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_gateway_on_a_gguf_base_trains_publishes_and_serves_a_lora_student(
    teacher: tuple[ScriptedTeacher, ServerThread], database_url: str, smollm2: str, tmp_path: Path
) -> None:
    teacher_state, teacher_server = teacher
    teacher_state.answer_fn = intent_teacher
    student = ServerThread(create_student_app(StudentModels(smollm2))).start()
    policy = parse_policy(gguf_policy(teacher_server.url, student.url, smollm2))
    server, gw, key = start_gateway(database_url, policy, tmp_path)
    try:
        send_traffic(server.url + "/v1", key, 48)
        wait_until(lambda: gw.admission.in_flight == 0, 10)
        assert gw.recorder.flush(30)
        scheduler = Scheduler(gw.db, lambda: policy, tmp_path / "adapters")
        scheduler.on_task.append(gw.tasks.apply)

        (event,) = scheduler.tick()
        assert event.outcome == "shadow", event.reason
        assert event.numbers["finetuned"] >= 0.75 > event.numbers["baseline"]
        adapter = event.numbers["adapter"]
        assert adapter == f"{TASK}@v1"
        with gw.db.session() as session:
            row = session.get(Task, TASK)
        assert row is not None and row.stage == Stage.shadow.value
        envelope = StudentEnvelope.from_features(row.features)
        assert envelope is not None and envelope.max_prompt_tokens is not None

        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        served: list[tuple[str, str, str]] = []
        for i in range(1000, 1300):  # fresh emails until the student serves (shadow → serving)
            email, label = intent_email(i, random.Random(i))
            messages = [{"role": "system", "content": INTENT_SYSTEM}, {"role": "user", "content": email}]
            if estimate_prompt_tokens(messages) > envelope.max_prompt_tokens:
                continue  # longer than any trained on: the student is not asked (router/decide.py)
            raw = client.chat.completions.with_raw_response.create(
                model="teacher-large",
                messages=messages,  # type: ignore[arg-type]
                metadata={"task": TASK},
                temperature=0,
                max_tokens=4,
            )
            target = raw.headers.get("x-distillgate-target", "")
            served.append((target, raw.parse().choices[0].message.content or "", label))
            if target == "teacher":
                # Each answer's shadow pair before the next request: the teacher answers in
                # milliseconds, the student in a second, and pairs past max_concurrency are dropped.
                wait_until(lambda: gw.shadow.in_flight(TASK) == 0, 60)
            if target == f"student:{adapter}" and len([s for s in served if s[0] != "teacher"]) >= 3:
                break
    finally:
        server.stop()
        student.stop()
    by_student = [s for s in served if s[0] == f"student:{adapter}"]
    assert len(by_student) >= 3, f"the student never served: {served[-5:]}, shadow {gw.shadow.counters}"
    assert sum(answer.strip() == label for _, answer, label in by_student) >= 2
