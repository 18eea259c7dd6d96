"""The chat format: template-ready messages and tool calls parsed back out of generated text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from tests.trainer.conftest import WEATHER_TOOL, weather_call
from trainer.chat_format import content_text, parse_arguments, parse_tool_calls, template_messages


def test_a_tool_call_block_becomes_an_openai_tool_call() -> None:
    parsed = parse_tool_calls(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    assert parsed.content is None
    (call,) = parsed.tool_calls
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_several_calls_and_leading_text() -> None:
    text = (
        'Checking both. <tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": "{\\"x\\": 1}"}</tool_call>'
    )
    parsed = parse_tool_calls(text)
    assert parsed.content == "Checking both."
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["a", "b"]
    assert parsed.tool_calls[1]["function"]["arguments"] == '{"x": 1}'
    assert parsed.tool_calls[0]["id"] != parsed.tool_calls[1]["id"]


def test_an_unterminated_last_block_still_parses() -> None:
    parsed = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"k": "v"}}')
    assert [c["function"]["name"] for c in parsed.tool_calls] == ["f"]


def test_broken_calls_stay_text() -> None:
    for text in (
        '<tool_call>{"name": "f", "arguments": {</tool_call>',
        "<tool_call>[1, 2]</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',
        "no call here",
    ):
        parsed = parse_tool_calls(text)
        assert parsed.content == text and parsed.tool_calls == []


def test_template_messages_normalise_content_and_arguments() -> None:
    messages: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a"},
                {"type": "image_url", "image_url": {}},
                {"type": "text", "text": "b"},
            ],
        },
        {"role": "assistant", "content": None, "tool_calls": [weather_call("Rome")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    out = template_messages(messages)
    assert out[0] == {"role": "user", "content": "ab"}
    assert out[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Rome"}}
    assert out[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    assert content_text(None) is None
    assert parse_arguments("") == {} and parse_arguments("not json") == "not json"


def test_rendering_does_not_depend_on_how_the_teacher_spaced_arguments(tiny_model: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)

    def render(arguments: str) -> str:
        call = {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
        messages: list[dict[str, Any]] = [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ]
        return str(
            tokenizer.apply_chat_template(template_messages(messages), tools=[WEATHER_TOOL], tokenize=False)
        )

    compact, spaced = render('{"city":"Oslo"}'), render('{ "city" :  "Oslo" }')
    assert compact == spaced
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'
        in compact
    )
    # The rendered block parses back to the same call.
    start = compact.rindex("<tool_call>")  # the answer's block (the system prompt shows the format too)
    block = compact[start : compact.index("<|im_end|>", start)]
    (call,) = parse_tool_calls(block).tool_calls
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
