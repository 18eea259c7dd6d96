"""Server-sent events: assembling a streamed answer into one response, and replaying one as a stream.

Both directions are pure functions over bytes and dicts, so the recorder (assembly, off the
event loop) and the cache (replay) share one definition of the OpenAI stream format.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"


def iter_events(raw: bytes) -> Iterator[dict[str, Any]]:
    """Parse ``data:`` events of an SSE body; skips comments, ``[DONE]`` and undecodable events."""
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = b"".join(line[5:].lstrip() for line in block.split(b"\n") if line.startswith(b"data:"))
        if not data or data == b"[DONE]":
            continue
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict):
            yield event


def assemble_chat(raw: bytes) -> dict[str, Any]:
    """Merge ``chat.completion.chunk`` events into the ``chat.completion`` they stream."""
    choices: dict[int, dict[str, Any]] = {}
    out: dict[str, Any] = {"object": "chat.completion"}
    for event in iter_events(raw):
        if "error" in event and "choices" not in event:
            out["error"] = event["error"]
            continue
        for key in ("id", "created", "model", "system_fingerprint", "service_tier"):
            if key in event and event[key] is not None:
                out[key] = event[key]
        if event.get("usage"):
            out["usage"] = event["usage"]
        for delta_choice in event.get("choices") or ():
            index = delta_choice.get("index", 0)
            choice = choices.setdefault(
                index,
                {"index": index, "message": {"role": "assistant", "content": None}, "finish_reason": None},
            )
            _merge_delta(choice, delta_choice)
    out["choices"] = [choices[i] for i in sorted(choices)]
    for choice in out["choices"]:
        calls = choice["message"].get("tool_calls")
        if calls is not None:
            choice["message"]["tool_calls"] = [calls[i] for i in sorted(calls)]
    return out


def _merge_delta(choice: dict[str, Any], delta_choice: dict[str, Any]) -> None:
    message = choice["message"]
    delta = delta_choice.get("delta") or {}
    if delta.get("role"):
        message["role"] = delta["role"]
    if delta.get("content") is not None:
        message["content"] = (message.get("content") or "") + delta["content"]
    if delta.get("refusal") is not None:
        message["refusal"] = (message.get("refusal") or "") + delta["refusal"]
    for call in delta.get("tool_calls") or ():
        calls = message.setdefault("tool_calls", {})
        slot = calls.setdefault(
            call.get("index", len(calls)),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if call.get("id"):
            slot["id"] = call["id"]
        if call.get("type"):
            slot["type"] = call["type"]
        function = call.get("function") or {}
        if function.get("name"):
            slot["function"]["name"] += function["name"]
        if function.get("arguments"):
            slot["function"]["arguments"] += function["arguments"]
    if delta_choice.get("finish_reason") is not None:
        choice["finish_reason"] = delta_choice["finish_reason"]
    if delta_choice.get("logprobs") is not None:
        logprobs = choice.setdefault("logprobs", {"content": []})
        logprobs["content"].extend((delta_choice["logprobs"] or {}).get("content") or [])


def assemble_completion(raw: bytes) -> dict[str, Any]:
    """Merge legacy ``text_completion`` stream events."""
    choices: dict[int, dict[str, Any]] = {}
    out: dict[str, Any] = {"object": "text_completion"}
    for event in iter_events(raw):
        for key in ("id", "created", "model"):
            if key in event:
                out[key] = event[key]
        if event.get("usage"):
            out["usage"] = event["usage"]
        for part in event.get("choices") or ():
            index = part.get("index", 0)
            choice = choices.setdefault(index, {"index": index, "text": "", "finish_reason": None})
            choice["text"] += part.get("text") or ""
            if part.get("finish_reason") is not None:
                choice["finish_reason"] = part["finish_reason"]
    out["choices"] = [choices[i] for i in sorted(choices)]
    return out


def chat_to_events(response: dict[str, Any], *, include_usage: bool) -> Iterable[bytes]:
    """Replay a stored ``chat.completion`` as the SSE stream an upstream would have sent."""
    head = {
        "id": response.get("id"),
        "object": "chat.completion.chunk",
        "created": response.get("created"),
        "model": response.get("model"),
    }
    if response.get("system_fingerprint") is not None:
        head["system_fingerprint"] = response["system_fingerprint"]
    for choice in response.get("choices") or ():
        message = choice.get("message") or {}
        index = choice.get("index", 0)
        first: dict[str, Any] = {"role": message.get("role", "assistant"), "content": ""}
        if message.get("refusal") is not None:
            first["refusal"] = None
        yield _event(head, [{"index": index, "delta": first, "logprobs": None, "finish_reason": None}])
        if message.get("content"):
            yield _event(
                head,
                [
                    {
                        "index": index,
                        "delta": {"content": message["content"]},
                        "logprobs": choice.get("logprobs"),
                        "finish_reason": None,
                    }
                ],
            )
        for i, call in enumerate(message.get("tool_calls") or ()):
            yield _event(
                head,
                [
                    {
                        "index": index,
                        "delta": {"tool_calls": [{"index": i, **call}]},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            )
        yield _event(
            head,
            [{"index": index, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")}],
        )
    if include_usage and response.get("usage") is not None:
        yield _event(head, [], usage=response["usage"])
    yield DONE


def _event(head: dict[str, Any], choices: list[dict[str, Any]], **extra: Any) -> bytes:
    return b"data: " + orjson.dumps({**head, "choices": choices, **extra}) + b"\n\n"


def usage_of(response: dict[str, Any] | None) -> tuple[int, int, int]:
    """(prompt, completion, cached prompt) tokens from an OpenAI ``usage`` object."""
    usage = (response or {}).get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return (
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        int(details.get("cached_tokens") or 0),
    )


def finish_reason_of(response: dict[str, Any] | None) -> str | None:
    choices = (response or {}).get("choices") or []
    return choices[0].get("finish_reason") if choices else None
