"""The reference workload and its traffic generator: deterministic teacher answers, varied inputs,
and replays through the real openai SDK against the scripted teacher and the gateway."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import openai
import pytest
from sqlmodel import select

from demo import workload
from demo.teacher import ScriptedTeacher, create_teacher_app, default_answer
from demo.traffic import Outcome, replay, replay_to
from demo.workload import (
    ADE_PATTERNS,
    ADE_TEMPLATES,
    CLASSIFY_EMAIL,
    CRUD_API,
    CRUD_PATTERNS,
    CRUD_TEMPLATES,
    EMAIL_CONTEXT,
    EMAIL_LABELS,
    EMAIL_SENTENCES,
    EXTRACT_ADE,
    FAMILIES,
    classify_email,
    crud_call,
    extract_ade,
    generate_ade_sentence,
    generate_crud_request,
)
from gateway.protocol import check_chat, task_key
from gateway.store.models import Record
from tests.conftest import RunningGateway
from tests.servers import serve


def test_answers_are_a_function_of_the_request() -> None:
    rng = random.Random(7)
    for family in FAMILIES:
        for _ in range(50):
            body = family.request(rng)
            first = workload.answer(json.loads(json.dumps(body)))
            assert first == workload.answer(body) == family.answer(body)
            assert first is not None and first["role"] == "assistant" and first["content"]


def test_json_families_answer_valid_json() -> None:
    rng = random.Random(8)
    for family in (CRUD_API, EXTRACT_ADE):
        for _ in range(100):
            assert isinstance(json.loads(family.answer(family.request(rng))["content"]), dict)


def test_every_email_sentence_matches_its_own_label_and_no_other() -> None:
    rng = random.Random(1)
    for label, sentences in EMAIL_SENTENCES.items():
        for template in sentences:
            for _ in range(5):
                sentence = workload._fill_email(template, rng)
                matched = [name for name, p in workload._EMAIL_PATTERNS.items() if p.search(sentence)]
                assert matched == ([] if label == "other" else [label]), (label, sentence)
    for template in EMAIL_CONTEXT:
        assert classify_email(workload._fill_email(template, rng)) == "other"


def test_email_touching_several_teams_goes_to_the_first_in_priority_order() -> None:
    assert classify_email("My package is late. Also I was charged twice.") == "billing"
    assert classify_email("I was charged twice, please refund me.") == "refund"
    assert classify_email("I cannot log in and the app crashes with error 500.") == "account"
    assert classify_email("The parcel never came and the website is not loading.") == "technical"
    assert classify_email("Do you sell gift cards?") == "other"
    assert EMAIL_LABELS[-1] == "other"


def test_generated_emails_cover_every_label() -> None:
    labels = {classify_email(text) for text in CLASSIFY_EMAIL.inputs(seed=3, n=300)}
    assert labels == set(EMAIL_LABELS)


@pytest.mark.parametrize("index", range(len(CRUD_TEMPLATES)))
def test_each_crud_request_is_parsed_by_its_own_template(index: int) -> None:
    rng = random.Random(index)
    for _ in range(30):
        text = generate_crud_request(rng, index)
        normalised = " ".join(text.split())
        first = next(i for i, (pattern, _) in enumerate(CRUD_PATTERNS) if pattern.match(normalised))
        assert first == index, text
        call = crud_call(text)
        assert call["method"] in {"GET", "POST", "PATCH", "DELETE"}
        assert call["path"].startswith("/")
        # Every number the user wrote reaches the call (ids in the path, values in the body).
        rendered = json.dumps(call)
        for number in re.findall(r"\d+(?:\.\d+)?", text):
            assert number.rstrip("0").rstrip(".") in rendered, (text, call)


def test_crud_examples() -> None:
    assert crud_call("Please cancel order 4521.") == {"method": "DELETE", "path": "/orders/4521"}
    assert crud_call("could you change the email of customer 88 to ana.lopez@example.com, thanks!") == {
        "method": "PATCH",
        "path": "/customers/88",
        "body": {"email": "ana.lopez@example.com"},
    }
    assert crud_call("Fetch the details of client 12") == {"method": "GET", "path": "/customers/12"}
    assert crud_call("Add a product called Blue Mug priced at 12.50") == {
        "method": "POST",
        "path": "/products",
        "body": {"name": "Blue Mug", "price": 12.5},
    }
    assert crud_call("Write me a poem about orders") == {"error": "unsupported request"}


@pytest.mark.parametrize("index", range(len(ADE_TEMPLATES)))
def test_each_ade_sentence_yields_its_templates_pairs(index: int) -> None:
    rng = random.Random(100 + index)
    expected_pairs = len(ADE_TEMPLATES[index][1])
    for _ in range(30):
        text = generate_ade_sentence(rng, index)
        first = next(i for i, (pattern, _) in enumerate(ADE_PATTERNS) if pattern.match(text))
        assert first == index, text
        pairs = extract_ade(text)["pairs"]
        assert len(pairs) == expected_pairs
        for pair in pairs:
            assert pair["drug"] in text.lower() and pair["event"] in text.lower()


def test_ade_leaves_out_negated_and_prior_events() -> None:
    text = "A 61-year-old woman taking warfarin reported major bleeding but denied alopecia."
    assert extract_ade(text) == {"pairs": [{"drug": "warfarin", "event": "major bleeding"}]}
    assert extract_ade("No rash was observed in the patient treated with amoxicillin.") == {"pairs": []}
    assert extract_ade("The patient with a history of gout was started on lithium for depression.") == {
        "pairs": []
    }
    assert extract_ade("The weather was fine.") == {"pairs": []}


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_inputs_vary_and_other_seeds_give_other_inputs(family: workload.TaskFamily) -> None:
    train = family.inputs(seed=1, n=1000)
    held_out = family.inputs(seed=2, n=300)
    assert len(set(train)) == 1000
    assert len(set(held_out) - set(train)) >= 290
    assert family.inputs(seed=1, n=50) == train[:50]
    # Not a handful of templates with a number swapped: answers vary too (emails have six labels;
    # a fifth of case-report sentences state no pair).
    minimum = {"classify-email": 6, "crud-api": 900, "extract-ade": 600}[family.name]
    assert len({family.answer_text(text) for text in train}) >= minimum


def test_dispatcher_finds_the_family_by_metadata_or_system_prompt() -> None:
    crud = CRUD_API.request_for("Delete order 7")
    assert "metadata" not in crud
    assert workload.answer(crud) == {
        "role": "assistant",
        "content": '{"method": "DELETE", "path": "/orders/7"}',
    }
    reformatted = {
        **crud,
        "messages": [
            {"role": "system", "content": "  " + CRUD_API.system_prompt.replace(" ", "\n ")},
            crud["messages"][1],
        ],
    }
    assert workload.answer(reformatted) == workload.answer(crud)
    tagged_only = {
        "metadata": {"task": "classify-email"},
        "messages": [{"role": "user", "content": "My parcel is lost."}],
    }
    assert workload.answer(tagged_only) == {"role": "assistant", "content": "shipping"}
    assert workload.answer({"messages": [{"role": "user", "content": "hello"}]}) is None
    teacher = ScriptedTeacher(answer_fn=workload.answer)
    plain = {"messages": [{"role": "user", "content": "hello"}]}
    assert teacher.answer(plain) == default_answer(plain)


def test_task_keys_are_the_gateways() -> None:
    rng = random.Random(0)
    for family in FAMILIES:
        body = family.request(rng)
        assert task_key(body.get("metadata"), None, check_chat(body)) == family.task_key
        assert workload.family(family.task_key) is family
    assert CRUD_API.task_key.startswith("sys-") and CLASSIFY_EMAIL.task_key == "classify-email"
    assert workload.SCORERS == {
        "classify-email": "exact",
        "crud-api": "json_fields",
        "extract-ade": "json_fields",
    }


def test_traffic_is_reproducible_from_its_seed() -> None:
    first = [body for _, body in workload.traffic(5, 40)]
    assert first == [body for _, body in workload.traffic(5, 40)]
    assert first != [body for _, body in workload.traffic(6, 40)]
    assert {f.name for f, _ in workload.traffic(5, 60)} == set(workload.TASK_NAMES)


async def test_replay_against_the_scripted_teacher() -> None:
    state = ScriptedTeacher(answer_fn=workload.answer)
    outcomes: list[Outcome] = []
    with serve(create_teacher_app(state)) as server:
        report = await replay_to(
            server.url + "/v1", "sk-any", n=45, seed=3, concurrency=4, on_outcome=outcomes.append
        )
    assert report.sent == report.ok == 45 and report.failed == 0 and not report.errors
    assert sorted(o.index for o in outcomes) == list(range(45))
    for name, counts in report.tasks.items():
        assert counts.sent > 0, name
        assert counts.agreement == 1.0, name
    # Tagged families carry metadata.task; crud-api is recognised by its system prompt alone.
    for body in state.stats.bodies:
        found = workload.family_of(body)
        assert found is not None
        assert ("metadata" in body) == found.tagged
        assert body["temperature"] == 0 and body["max_tokens"] == found.max_tokens
        assert ("response_format" in body) == found.json_mode


async def test_failures_are_counted_not_raised() -> None:
    state = ScriptedTeacher(answer_fn=workload.answer)
    state.fail_next = [500, 500, 503]
    with serve(create_teacher_app(state)) as server:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="sk-any", max_retries=0) as client:
            report = await replay(client, n=12, seed=4, concurrency=1)
    assert (report.sent, report.ok, report.failed) == (12, 9, 3)
    assert len(report.errors) == 3 and all(
        "InternalServerError 500" in e or " 503" in e for e in report.errors
    )


async def test_unreachable_endpoint_counts_every_request_as_failed() -> None:
    async with openai.AsyncOpenAI(
        base_url="http://127.0.0.1:9/v1", api_key="sk-any", max_retries=0, timeout=5
    ) as client:
        report = await replay(client, n=5, seed=1, concurrency=2)
    assert report.failed == 5 and report.ok == 0 and "APIConnectionError" in report.errors[0]


async def test_replay_through_the_gateway_groups_tasks(
    gateway: RunningGateway, teacher: tuple[ScriptedTeacher, object], tmp_path: Path
) -> None:
    state, _ = teacher
    state.answer_fn = workload.answer
    report = await replay_to(gateway.v1, gateway.key, n=30, seed=9, concurrency=4)
    assert report.failed == 0 and report.ok == 30
    assert all(counts.targets == {"teacher": counts.ok} for counts in report.tasks.values())
    assert all(counts.agreement == 1.0 for counts in report.tasks.values())
    # Teacher answers agree with the teacher; they say nothing of a student that answered nobody.
    assert all(counts.student_agreement is None for counts in report.tasks.values())
    gateway.flush()
    with gateway.db().session() as session:
        keys = {record.task for record in session.exec(select(Record))}
    assert keys == {family.task_key for family in FAMILIES}
