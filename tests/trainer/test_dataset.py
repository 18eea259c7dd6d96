"""Dataset building: every filter, dedup, the stable held-out split, snapshots in a real DB, JSONL export."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.store.db import Database
from gateway.store.models import DatasetSnapshot, Record
from tests.trainer.conftest import (
    INTENT_SYSTEM,
    WEATHER_TOOL,
    add_records,
    chat_response,
    intent_records,
    make_record,
    weather_call,
    weather_records,
)
from trainer.dataset import (
    DatasetOptions,
    build_snapshot,
    canonical_prompt,
    export_jsonl,
    is_holdout,
    is_negative_feedback,
    prompt_key,
    rejection,
    select_examples,
    snapshot_examples,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": INTENT_SYSTEM}, {"role": "user", "content": text}]


def good(text: str = "hello", answer: str = "billing", **fields: Any) -> Record:
    return make_record("intent", user(text), chat_response(answer), **fields)


OPTIONS = DatasetOptions(holdout=0.0)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"status": 500}, "status"),
        ({"status": 429}, "status"),
        ({"error": "stream cut"}, "status"),
        ({"finish_reason": "length"}, "finish_reason"),
        ({"finish_reason": "content_filter"}, "finish_reason"),
        ({"finish_reason": None}, "finish_reason"),
        ({"stored": False}, "opted_out"),
        ({"target": "cache", "cache_hit": True}, "not_teacher"),
        ({"cache_hit": True}, "not_teacher"),
        ({"target": "student:intent@v1"}, "not_teacher"),
        ({"feedback": {"score": -1}}, "negative_feedback"),
        ({"feedback": {"label": "Bad"}}, "negative_feedback"),
        ({"feedback": {"exclude": True}}, "negative_feedback"),
    ],
)
def test_each_filter_drops_its_records(fields: dict[str, Any], reason: str) -> None:
    assert rejection(good(**fields), OPTIONS) == reason
    selection = select_examples([good(**fields)], OPTIONS)
    assert selection.train == [] and selection.dropped[reason] == 1


def test_usable_teacher_answers_pass_every_filter() -> None:
    tool_record = make_record(
        "w",
        [{"role": "user", "content": "weather in Oslo?"}],
        chat_response(None, [weather_call("Oslo")], "tool_calls"),
        tools=[WEATHER_TOOL],
    )
    for record in (good(), good(feedback={"score": 1}), good(feedback={"label": "good"}), tool_record):
        assert rejection(record, OPTIONS) is None
    assert len(select_examples([good(), tool_record], OPTIONS).train) == 2


def test_negative_feedback_convention() -> None:
    assert is_negative_feedback({"score": -0.5})
    assert is_negative_feedback({"label": "thumbs_down"})
    assert not is_negative_feedback({"score": 0})
    assert not is_negative_feedback({"score": True})  # a boolean is not a score
    assert not is_negative_feedback({"label": "great"})
    assert not is_negative_feedback(None)


def test_length_limits_drop_long_prompts_and_answers() -> None:
    options = DatasetOptions(holdout=0.0, max_prompt_tokens=100, max_completion_tokens=10)
    assert rejection(good(prompt_tokens=101), options) == "too_long"
    assert rejection(good(completion_tokens=11), options) == "too_long"
    assert rejection(good(prompt_tokens=100, completion_tokens=10), options) is None


def test_records_without_a_usable_body_are_malformed() -> None:
    no_choices = good()
    no_choices.response = {"choices": []}
    empty_answer = make_record("intent", user("x"), chat_response(""))
    selection = select_examples([no_choices, empty_answer], OPTIONS)
    assert selection.dropped["malformed"] == 2


def test_duplicates_keep_the_newest_answer() -> None:
    old = good("same prompt", "support", created_at=T0)
    new = good("  same prompt ", "billing", created_at=T0 + timedelta(minutes=1))
    other = good("another prompt", "sales", created_at=T0)
    selection = select_examples([new, old, other], OPTIONS)  # newest first, as the store reads them
    assert [ex.answer["content"] for ex in selection.train] == ["billing", "sales"]
    assert selection.dropped["duplicate"] == 1


def test_canonical_prompt_ignores_sampling_ids_and_spacing_but_not_content() -> None:
    a = {
        "model": "m1",
        "temperature": 0,
        "messages": [
            {"role": "user", "content": "hi "},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
                ],
            },
        ],
    }
    b = {
        "model": "m2",
        "temperature": 1,
        "metadata": {"task": "t"},
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_b", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}
                ],
            },
        ],
    }
    assert canonical_prompt(a) == canonical_prompt(b)
    assert prompt_key({**a, "tools": [WEATHER_TOOL]}) != prompt_key(a)
    assert prompt_key({**a, "response_format": {"type": "json_object"}}) != prompt_key(a)
    assert prompt_key({"messages": [{"role": "user", "content": "hi!"}]}) != prompt_key(
        {"messages": [{"role": "user", "content": "hi"}]}
    )


def test_split_is_stable_across_runs_and_added_records() -> None:
    options = DatasetOptions(holdout=0.25)
    first = select_examples(list(reversed(intent_records("intent", 200))), options)
    again = select_examples(list(reversed(intent_records("intent", 200))), options)
    held = {ex.prompt_key for ex in first.holdout}
    assert held == {ex.prompt_key for ex in again.holdout}
    assert first.content_hash() == again.content_hash()
    assert 25 <= len(first.holdout) <= 75  # about a quarter of 200

    grown = select_examples(list(reversed(intent_records("intent", 400))), options)
    grown_held = {ex.prompt_key for ex in grown.holdout}
    grown_train = {ex.prompt_key for ex in grown.train}
    assert held <= grown_held  # nothing held out before is trained on now
    assert {ex.prompt_key for ex in first.train} <= grown_train
    assert grown.content_hash() != first.content_hash()


def test_is_holdout_reads_the_hash_as_a_share() -> None:
    assert is_holdout("0" * 64, 0.1) and not is_holdout("f" * 64, 0.9)
    assert not is_holdout("0" * 64, 0.0)


def test_max_records_keeps_the_newest() -> None:
    records = list(reversed(intent_records("intent", 50)))  # newest first
    selection = select_examples(records, DatasetOptions(holdout=0.0, max_records=10))
    assert [ex.record_id for ex in selection.train] == [r.id for r in records[:10]]
    assert selection.examined == 10


def test_tool_call_answers_become_assistant_messages_with_tool_calls() -> None:
    (example,) = select_examples(weather_records("w", 1), OPTIONS).train
    assert example.tools == [WEATHER_TOOL]
    assert example.answer == {"role": "assistant", "content": None, "tool_calls": [weather_call("Paris")]}


def test_snapshot_is_stored_and_reloads_the_same_examples(store: Database) -> None:
    task = f"snap-{store.dialect}"
    opted_out = make_record(task, user("y"), chat_response("y"), stored=False, created_at=T0)
    opted_out.request = opted_out.response = None  # the recorder keeps no content for these
    records = [
        *intent_records(task, 60),
        make_record(task, user("x"), chat_response("x"), status=500, created_at=T0),
        opted_out,
    ]
    dup = intent_records(task, 1, base_time=T0 - timedelta(days=1))[0]  # an older copy of prompt 0
    add_records(store, [*records, dup])

    snapshot, _ = build_snapshot(store, task, DatasetOptions(holdout=0.2))
    assert snapshot.id is not None
    counts = snapshot.counts
    assert counts["examined"] == 63 and counts["kept"] == 60
    assert counts["dropped"]["status"] == 1 and counts["dropped"]["opted_out"] == 1
    assert counts["dropped"]["duplicate"] == 1
    assert len(snapshot.train_ids) + len(snapshot.holdout_ids) == 60
    assert dup.id not in snapshot.train_ids + snapshot.holdout_ids

    with store.session() as session:
        stored = session.get(DatasetSnapshot, snapshot.id)
    assert stored is not None and stored.train_ids == snapshot.train_ids
    train, holdout = snapshot_examples(store, stored)
    assert [ex.record_id for ex in train] == snapshot.train_ids
    assert [ex.record_id for ex in holdout] == snapshot.holdout_ids

    second, _ = build_snapshot(store, task, DatasetOptions(holdout=0.2))
    assert second.id != snapshot.id and second.content_hash == snapshot.content_hash
    assert second.holdout_ids == snapshot.holdout_ids


def test_export_writes_openai_fine_tuning_jsonl(tmp_path: Path) -> None:
    records = intent_records("intent", 3) + weather_records("w", 1)
    selection = select_examples(records, OPTIONS)
    path = tmp_path / "train.jsonl"
    assert export_jsonl(selection.train, path) == 4
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {
        "messages": [*user(lines[0]["messages"][1]["content"]), {"role": "assistant", "content": "billing"}]
    }
    tool_line = lines[3]
    assert tool_line["tools"] == [WEATHER_TOOL]
    assert tool_line["messages"][-1]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
    }
    assert all(set(line) <= {"messages", "tools"} for line in lines)
