"""The distillation step end to end: traffic through the gateway → records → dataset → fine-tune on CPU →
``task@v1`` → published to the embedded student server over HTTP → the student answers through the SDK."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, cast

import openai
from openai.types.chat import ChatCompletionMessageParam

from demo.teacher import ScriptedTeacher, last_user_text
from gateway.store.models import Task
from router.policy import TaskPolicy, parse_policy
from tests.conftest import RunningGateway, make_policy, start_gateway
from tests.servers import ServerThread
from tests.trainer.conftest import INTENT_SYSTEM, INTENTS, intent_email
from trainer.dataset import snapshot_examples
from trainer.publish import StudentPublisher, publish_adapter
from trainer.registry import get_adapter, train_task

TASK = "classify-email"


def intent_teacher(body: dict[str, Any]) -> dict[str, Any] | None:
    """The stand-in teacher labels an email by its keywords (what a real teacher would be asked to do)."""
    if not body.get("messages") or body["messages"][0].get("content") != INTENT_SYSTEM:
        return None
    text = last_user_text(body).lower()
    label = next((name for name, words in INTENTS.items() if any(w in text.split() for w in words)), "spam")
    return {"role": "assistant", "content": label}


def openai_messages(messages: list[dict[str, Any]]) -> list[ChatCompletionMessageParam]:
    """Recorded messages as the SDK types them: they are OpenAI messages, which the dataset keeps as dicts."""
    return cast(list[ChatCompletionMessageParam], messages)


def send_traffic(base_url: str, key: str, n: int) -> list[str]:
    """``n`` labelled emails through the gateway (a quarter streamed), plus two opted-out ones and a repeat."""
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
    rng = random.Random(3)
    emails = []
    for i in range(n):
        email, label = intent_email(i, rng)
        messages: list[ChatCompletionMessageParam] = [
            {"role": "system", "content": INTENT_SYSTEM},
            {"role": "user", "content": email},
        ]
        if i % 4 == 0:
            chunks = client.chat.completions.create(
                model="teacher-large",
                messages=messages,
                metadata={"task": TASK},
                temperature=0,
                stream=True,
            )
            answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            answer = (
                client.chat.completions.create(
                    model="teacher-large",
                    messages=messages,
                    metadata={"task": TASK},
                    temperature=0,
                )
                .choices[0]
                .message.content
                or ""
            )
        assert answer == label
        emails.append(email)
    for store in (False, False):
        client.chat.completions.create(
            model="teacher-large",
            metadata={"task": TASK},
            store=store,
            messages=[
                {"role": "system", "content": INTENT_SYSTEM},
                {"role": "user", "content": "private: refund my invoice"},
            ],
        )
    client.chat.completions.create(
        model="teacher-large",
        metadata={"task": TASK},
        temperature=0.7,
        messages=[{"role": "system", "content": INTENT_SYSTEM}, {"role": "user", "content": emails[1]}],
    )
    return emails


def task_policy(**train: Any) -> TaskPolicy:
    values = {
        "holdout": 0.2,
        "max_seq_len": 256,
        "batch_tokens": 1024,
        "learning_rate": 2e-2,
        "lora_rank": 8,
        "lora_alpha": 16,
        "epochs": 2,
    }
    values.update(train)
    return parse_policy(
        {"teacher": {"base_url": "http://unused.invalid/v1"}, "defaults": {"train": values}}
    ).for_task(TASK)


def test_recorded_traffic_becomes_a_served_lora_adapter(
    teacher: tuple[ScriptedTeacher, ServerThread],
    gateway: RunningGateway,
    student: ServerThread,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    teacher[0].answer_fn = intent_teacher
    send_traffic(gateway.v1, gateway.key, 80)
    gateway.flush()
    db = gateway.db()

    outcome = train_task(db, TASK, task_policy(), str(tiny_model), tmp_path / "adapters")
    counts = outcome.snapshot.counts
    assert counts["examined"] == 83 and counts["kept"] == 80
    assert counts["dropped"]["opted_out"] == 2 and counts["dropped"]["duplicate"] == 1
    assert outcome.result.eval_loss_before is not None and outcome.result.eval_loss_after is not None
    assert outcome.result.eval_loss_after < outcome.result.eval_loss_before  # the held-out loss fell
    adapter = outcome.adapter
    assert adapter.name == f"{TASK}@v1" and outcome.run.status == "succeeded"

    with StudentPublisher(student.url + "/v1") as publisher:
        assert publish_adapter(db, publisher, adapter, adapters_dir=tmp_path / "adapters")
        assert publisher.loaded() == {adapter.name: adapter.path}
    published = get_adapter(db, adapter.name)
    assert published is not None and published.status == "published"
    with db.session() as session:
        task_row = session.get(Task, TASK)
    assert task_row is not None and task_row.features == adapter.metrics["features"]
    assert task_row.features is not None and task_row.features["models"] == ["teacher-large"]

    _, holdout = snapshot_examples(db, outcome.snapshot)
    prompt = openai_messages(holdout[0].prompt_messages)
    client = openai.OpenAI(base_url=student.url + "/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=adapter.name,
        messages=prompt,
        temperature=0,
        max_tokens=4,
    )
    assert reply.model == adapter.name and isinstance(reply.choices[0].message.content, str)
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage is not None
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=adapter.name,
            messages=prompt,
            temperature=0,
            max_tokens=4,
            stream=True,
        )
        if c.choices
    )
    assert streamed == reply.choices[0].message.content


def test_a_student_trained_from_scratch_agrees_with_the_teacher_on_held_out_traffic(
    teacher: tuple[ScriptedTeacher, ServerThread],
    sqlite_url: str,
    student: ServerThread,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    """The offline demo's path: no pretrained weights, so the whole tiny model is trained (method full),
    loaded as an "adapter" (our extension of the contract) and asked the held-out prompts."""
    teacher_state, teacher_server = teacher
    teacher_state.answer_fn = intent_teacher
    server, gw, key = start_gateway(sqlite_url, make_policy(teacher_server.url), tmp_path)
    try:
        send_traffic(server.url + "/v1", key, 160)
        assert gw.recorder.flush(30)
        outcome = train_task(
            gw.db,
            TASK,
            task_policy(method="full", learning_rate=2e-3, epochs=15),
            str(tiny_model),
            tmp_path / "adapters",
        )
    finally:
        server.stop()
    assert outcome.adapter.method == "full" and (Path(outcome.adapter.path) / "config.json").is_file()
    with StudentPublisher(student.url) as publisher:
        publisher.publish(outcome.adapter.name, outcome.adapter.path)
    client = openai.OpenAI(base_url=student.url + "/v1", api_key="unused", max_retries=0)
    holdout = outcome.selection.holdout
    agree = 0
    for example in holdout:
        reply = client.chat.completions.create(
            model=outcome.adapter.name,
            messages=openai_messages(example.prompt_messages),
            temperature=0,
            max_tokens=4,
        )
        agree += (reply.choices[0].message.content or "").strip() == example.answer["content"]
    assert len(holdout) >= 20
    assert agree / len(holdout) >= 0.9, f"{agree}/{len(holdout)} held-out answers agree"
