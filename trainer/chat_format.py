"""The student's chat format: OpenAI messages made template-ready, the reference ChatML
template (with tools), and tool calls parsed back out of generated text.

Rendering and parsing live together because they must agree: a student trained on the
template's ``<tool_call>`` blocks answers with them, and the server turns them back into
OpenAI ``tool_calls``. The block format is the Hermes/Qwen one that vLLM's ``hermes``
tool parser also reads, so real base models behave the same way.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|endoftext|>"

# ChatML with tools, close to Qwen2.5's template so that data rendered for the tiny
# reference model looks like data rendered for a real base model.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0].role in ('system', 'developer') %}"
    "{{- messages[0].content ~ '\\n\\n' }}"
    "{%- endif %}"
    "{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' ~ (tool | tojson) }}{%- endfor %}"
    '{{- \'\\n</tools>\\nTo call a function, answer with <tool_call>{"name": ..., "arguments": ...}'
    "</tool_call> blocks.<|im_end|>\\n' }}"
    "{%- elif messages and messages[0].role in ('system', 'developer') %}"
    "{{- '<|im_start|>system\\n' ~ messages[0].content ~ '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if loop.first and message.role in ('system', 'developer') %}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- if message.tool_calls %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- set fn = tool_call.function if tool_call.function is defined else tool_call %}"
    "{%- if message.content or not loop.first %}{{- '\\n' }}{%- endif %}"
    '{{- \'<tool_call>\\n{"name": "\' ~ fn.name ~ \'", "arguments": \' }}'
    "{%- if fn.arguments is string %}{{- fn.arguments }}{%- else %}{{- fn.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' ~ message.role ~ '\\n' ~ (message.content or '') ~ '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_TOOL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def content_text(content: Any) -> str | None:
    """OpenAI message content (a string or a list of parts) as plain text; ``None`` stays ``None``."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return str(content)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates expect them: text content, tool-call arguments as objects.

    Arguments arrive as JSON strings (OpenAI's wire format); parsing them lets ``tojson``
    print every call the same way, whatever spacing the teacher used. Ids, names of tool
    calls and ``tool_call_id`` are kept for templates that render them.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        item: dict[str, Any] = {
            "role": message.get("role", "user"),
            "content": content_text(message.get("content")),
        }
        if message.get("name"):
            item["name"] = message["name"]
        if message.get("tool_call_id"):
            item["tool_call_id"] = message["tool_call_id"]
        calls = message.get("tool_calls")
        if calls:
            item["tool_calls"] = [_template_call(call) for call in calls]
        out.append(item)
    return out


def parse_arguments(arguments: Any) -> Any:
    """Tool-call arguments as a JSON value: strings are parsed (empty means ``{}``); a string
    that is not JSON comes back unchanged (rendered verbatim: the teacher produced it)."""
    if not isinstance(arguments, str):
        return arguments
    if not arguments.strip():
        return {}
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function") or {}
    arguments = parse_arguments(fn.get("arguments", {}))
    return {
        "id": call.get("id"),
        "type": "function",
        "function": {"name": fn.get("name", ""), "arguments": arguments},
    }


@dataclass(frozen=True)
class ParsedAnswer:
    """Generated text split into OpenAI message parts."""

    content: str | None
    tool_calls: list[dict[str, Any]]


def parse_tool_calls(text: str) -> ParsedAnswer:
    """Split ``<tool_call>{"name", "arguments"}</tool_call>`` blocks out of generated text.

    Text that does not hold a well-formed call stays content: a student that produced
    broken JSON answered in prose, as far as the client can tell.
    """
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return ParsedAnswer(text, [])
    calls: list[dict[str, Any]] = []
    for match in _TOOL_BLOCK.finditer(text, start):
        try:
            payload = json.loads(match.group(1))
        except json.JSONDecodeError:
            return ParsedAnswer(text, [])
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            return ParsedAnswer(text, [])
        arguments = payload.get("arguments", {})
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {
                    "name": payload["name"],
                    "arguments": arguments
                    if isinstance(arguments, str)
                    else json.dumps(arguments, ensure_ascii=False),
                },
            }
        )
    if not calls:
        return ParsedAnswer(text, [])
    prefix = text[:start].strip()
    return ParsedAnswer(prefix or None, calls)
