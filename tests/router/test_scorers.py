"""Scorers with known values: exact, JSON, tool calls, chrF (against sacreBLEU's published numbers), judge, auto."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from router.scorers import (
    JUDGE_RUBRIC,
    answer_of,
    chrf,
    exact,
    json_fields,
    json_valid,
    parse_judge_score,
    pick_scorer,
    score,
    score_pair,
    similarity,
    tool_call,
)


def reply(content: str | None = None, tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls is not None:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
    }


def call(name: str, arguments: str, call_id: str = "call_1") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def test_exact_ignores_case_and_whitespace_only() -> None:
    assert exact(reply("Billing Question"), reply("  billing   question\n")) == 1.0
    assert exact(reply("billing"), reply("billing question")) == 0.0
    assert exact(reply("Straße"), reply("STRASSE")) == 1.0  # casefold, not lower


def test_json_valid_reads_only_the_student() -> None:
    assert json_valid(reply("not json"), reply(' {"a": 1} ')) == 1.0
    assert json_valid(reply('{"a": 1}'), reply('```json\n{"a": 1}\n```')) == 0.0
    assert json_valid(reply('{"a": 1}'), reply('{"a": 1')) == 0.0


def test_json_fields_is_the_share_of_matching_leaves() -> None:
    teacher = reply('{"drug": "aspirin", "event": "nausea", "severity": 2, "meta": {"ok": true}}')
    assert (
        json_fields(
            teacher, reply('{"meta": {"ok": true}, "severity": 2.0, "event": "nausea", "drug": "aspirin"}')
        )
        == 1.0
    )
    assert (
        json_fields(
            teacher, reply('{"drug": "aspirin", "event": "rash", "severity": 2, "meta": {"ok": true}}')
        )
        == 0.75
    )
    # true is not 1, and a missing field counts as a miss.
    assert json_fields(teacher, reply('{"drug": "aspirin", "event": "nausea", "meta": {"ok": 1}}')) == 0.5


def test_json_fields_penalises_invented_fields_and_list_items() -> None:
    teacher = reply('{"pairs": [["aspirin", "nausea"]]}')
    student = reply('{"pairs": [["aspirin", "nausea"], ["ibuprofen", "rash"]]}')
    assert json_fields(teacher, student) == pytest.approx(2 / 4)


def test_json_fields_scores_invalid_student_json_zero_and_non_json_teachers_by_exact() -> None:
    assert json_fields(reply('{"a": 1}'), reply("{'a': 1}")) == 0.0
    assert json_fields(reply("plain words"), reply("Plain  words")) == 1.0
    assert json_fields(reply("{}"), reply("{}")) == 1.0
    assert json_fields(reply("{}"), reply('{"a": 1}')) == 0.0


def test_tool_call_compares_names_and_parsed_arguments_in_any_order() -> None:
    teacher = reply(
        None, [call("get_user", '{"id": 7, "fields": ["name"]}'), call("list_orders", '{"user": 7}', "c2")]
    )
    same = reply(
        None,
        [call("list_orders", '{ "user" : 7 }', "x"), call("get_user", '{"fields": ["name"], "id": 7.0}')],
    )
    assert tool_call(teacher, same) == 1.0
    one_wrong = reply(
        None, [call("get_user", '{"id": 8, "fields": ["name"]}'), call("list_orders", '{"user": 7}')]
    )
    assert tool_call(teacher, one_wrong) == 0.5
    extra = reply(
        None,
        [
            call("get_user", '{"id": 7, "fields": ["name"]}'),
            call("list_orders", '{"user": 7}'),
            call("delete_user", '{"id": 7}'),
        ],
    )
    assert tool_call(teacher, extra) == pytest.approx(2 / 3)
    assert tool_call(teacher, reply("I would call get_user")) == 0.0


def test_tool_call_with_invalid_arguments_matches_only_the_same_invalid_text() -> None:
    assert tool_call(reply(None, [call("f", "{bad")]), reply(None, [call("f", "{bad")])) == 1.0
    assert tool_call(reply(None, [call("f", '{"a": 1}')]), reply(None, [call("f", "{bad")])) == 0.0
    assert tool_call(reply("no calls"), reply("No calls")) == 1.0  # neither side called: exact on text


# Values published with sacreBLEU 2 (its test suite and the chrF metric card), default mode.
@pytest.mark.parametrize(
    ("hypothesis", "reference", "kwargs", "expected"),
    [
        (
            "The relationship between Obama and Netanyahu is not exactly friendly.",
            "The ties between Obama and Netanyahu are not particularly friendly.",
            {},
            61.576379378113785,
        ),
        (
            "Die Beziehung zwischen Obama und Netanjahu ist nicht gerade freundlich.",
            "Das Verhältnis zwischen Obama und Netanyahu ist nicht gerade freundschaftlich.",
            {"beta": 3, "whitespace": True},
            67.3481606,
        ),
        (
            "risk assessment must be made of those who are qualified and expertise in the sector - these are the "
            "scientists .",
            "risk assessment has to be undertaken by those who are qualified and expert in that area - that is the "
            "scientists .",
            {"beta": 3, "whitespace": True},
            65.2414427,
        ),
        ("a", "a", {"beta": 3}, 100.0),
        ("a b c", "abc", {"beta": 3}, 100.0),
        ("aa", "ab", {"beta": 3}, 25.0),
        ("", "reference", {"beta": 3}, 0.0),
        ("abcdefg", "hijklmnop", {}, 0.0),
    ],
)
def test_chrf_matches_sacrebleu(
    hypothesis: str, reference: str, kwargs: dict[str, Any], expected: float
) -> None:
    assert chrf(hypothesis, reference, **kwargs) * 100 == pytest.approx(expected, abs=1e-4)


def test_similarity_is_chrf_of_the_answers_and_is_not_symmetric() -> None:
    t, s = (
        reply("The ties between Obama and Netanyahu are not particularly friendly."),
        reply("The relationship between Obama and Netanyahu is not exactly friendly."),
    )
    assert similarity(t, s) == pytest.approx(0.61576379378113785)
    assert similarity(s, t) != pytest.approx(similarity(t, s))
    assert similarity(reply("same text"), reply("same text")) == 1.0
    assert similarity(reply(""), reply("")) == 1.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("SCORE: 8", 0.8),
        ("score: 10", 1.0),
        ("Reasoning first... Score = 3.", 0.3),
        ("SCORE: 7/10", 0.7),
        ("**Score:** 4 out of 10", 0.4),
        ("Score: 2\nOn reflection, SCORE: 9", 0.9),
        ("6", 0.6),
        ("0", 0.0),
        ("SCORE: 11", None),
        ("SCORE: 12/10", None),
        ("the candidate is fine", None),
        ("", None),
        ("SCORE: high", None),
    ],
)
def test_judge_answers_are_parsed_robustly(text: str, expected: float | None) -> None:
    value = parse_judge_score(text)
    assert value == (pytest.approx(expected) if expected is not None else None)


async def test_judge_calls_the_teacher_with_the_fixed_rubric_and_reads_its_score() -> None:
    seen: list[dict[str, Any]] = []

    async def teacher(body: dict[str, Any]) -> dict[str, Any]:
        seen.append(body)
        return reply("SCORE: 9")

    request = {
        "messages": [{"role": "system", "content": "Classify."}, {"role": "user", "content": "refund pls"}]
    }
    result = await score_pair(
        "judge",
        reply("refund"),
        reply("Refund."),
        pass_score=0.8,
        request=request,
        judge_call=teacher,
        judge_model="teacher-large",
    )
    assert (result.scorer_used, result.score, result.passed, result.detail) == ("judge", 0.9, True, None)
    body = seen[0]
    assert body["model"] == "teacher-large" and body["temperature"] == 0
    assert body["messages"][0] == {"role": "system", "content": JUDGE_RUBRIC}
    prompt = body["messages"][1]["content"]
    assert (
        "refund pls" in prompt
        and "## Reference answer\nrefund" in prompt
        and "## Candidate answer\nRefund." in prompt
    )


async def test_judge_junk_answer_fails_the_pair_with_a_reason() -> None:
    async def teacher(body: dict[str, Any]) -> dict[str, Any]:
        return reply("I cannot grade this.")

    result = await score_pair("judge", reply("a"), reply("a"), judge_call=teacher, judge_model="m")
    assert (result.score, result.passed) == (0.0, False)
    assert result.detail is not None and "unreadable judge answer" in result.detail


async def test_judge_accepts_an_httpx_client_call() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["messages"][0]["content"] == JUDGE_RUBRIC
        return httpx.Response(200, json=reply("SCORE: 5"))

    async with httpx.AsyncClient(
        transport=httpx.MockTransport(handler), base_url="http://teacher/v1"
    ) as client:
        result = await score_pair(
            "judge",
            reply("x"),
            reply("y"),
            pass_score=0.5,
            judge_call=lambda body: client.post("/chat/completions", json=body),
            judge_model="m",
        )
    assert (result.score, result.passed) == (0.5, True)


async def test_judge_without_a_teacher_call_is_a_usage_error() -> None:
    with pytest.raises(ValueError, match="judge_call"):
        await score_pair("judge", reply("a"), reply("a"))
    with pytest.raises(ValueError, match="score_pair"):
        score("judge", reply("a"), reply("a"))


@pytest.mark.parametrize(
    ("teacher", "request_body", "expected"),
    [
        (reply(None, [call("f", "{}")]), None, "tool_call"),
        (reply('{"intent": "refund"}'), None, "json_fields"),
        (reply('[{"drug": "a"}]'), None, "json_fields"),
        (reply("not json at all"), {"response_format": {"type": "json_object"}}, "json_fields"),
        (reply("billing_question"), None, "exact"),
        (reply("Refund request"), None, "exact"),
        (reply("42"), None, "exact"),
        (reply("Dear customer,\nthanks for writing. We will refund you."), None, "similarity"),
        (reply("This is a rather long single line answer with many words in it"), None, "similarity"),
    ],
)
def test_auto_picks_by_the_teachers_output_shape(
    teacher: dict[str, Any], request_body: dict[str, Any] | None, expected: str
) -> None:
    assert pick_scorer(teacher, request_body) == expected


def test_score_resolves_auto_and_applies_pass_score_inclusively() -> None:
    result = score("auto", reply('{"a": 1, "b": 2}'), reply('{"a": 1, "b": 3}'), pass_score=0.5)
    assert (result.scorer_used, result.score, result.passed) == ("json_fields", 0.5, True)
    assert not score(
        "json_fields", reply('{"a": 1, "b": 2}'), reply('{"a": 1, "b": 3}'), pass_score=0.51
    ).passed
    with pytest.raises(ValueError, match="unknown scorer"):
        score("bleu", reply("a"), reply("a"))


def test_malformed_responses_read_as_empty_answers() -> None:
    junk: Any
    for junk in (None, {}, {"choices": []}, {"choices": ["x"]}, {"choices": [{"message": "x"}]}):
        assert answer_of(junk).content == ""
    assert exact(reply("yes"), None) == 0.0
    assert (
        answer_of(
            {"choices": [{"message": {"content": [{"type": "text", "text": "a"}, {"text": "b"}]}}]}
        ).content
        == "ab"
    )
    legacy = {
        "choices": [{"message": {"content": None, "function_call": {"name": "f", "arguments": '{"x": 1}'}}}]
    }
    assert tool_call(legacy, reply(None, [call("f", '{"x": 1}')])) == 1.0
