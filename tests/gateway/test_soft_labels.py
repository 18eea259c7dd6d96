"""Stripping captured logprobs gives the bytes an answer without them has, whatever the spelling."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.soft_labels import capture_top_k, strip_json, strip_sse

text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
token = st.fixed_dictionaries(
    {
        "token": text,
        "logprob": st.floats(-30, 0),
        "bytes": st.lists(st.integers(0, 255), max_size=4),
        "top_logprobs": st.lists(
            st.fixed_dictionaries({"token": text, "logprob": st.floats(-30, 0), "bytes": st.none()}),
            max_size=3,
        ),
    }
)
logprobs = st.fixed_dictionaries({"content": st.lists(token, max_size=5), "refusal": st.none()})
extra = st.dictionaries(
    text.filter(lambda k: k not in {"logprobs", "choices"}),
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**53), 2**53) | text,
        lambda c: st.lists(c, max_size=3),
        max_leaves=6,
    ),
    max_size=3,
)


def _choice(i: int, lp: dict[str, Any] | None, more: dict[str, Any]) -> dict[str, Any]:
    return {
        "index": i,
        "message": {"role": "assistant", "content": 'say "logprobs": {x}'},
        "logprobs": lp,
        **more,
        "finish_reason": "stop",
    }


answers = st.builds(
    lambda lps, more, top: {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        **top,
        "choices": [_choice(i, lp, more) for i, lp in enumerate(lps)],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    },
    st.lists(logprobs, min_size=1, max_size=3),
    extra,
    extra,
)

dumps = [
    lambda d: orjson.dumps(d),
    lambda d: json.dumps(d).encode(),
    lambda d: json.dumps(d, indent=2, ensure_ascii=False).encode(),
    lambda d: json.dumps(d, separators=(",", ":"), ensure_ascii=True).encode(),
]


def _without(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "choices": [{**c, "logprobs": None} for c in doc["choices"]]}


@settings(max_examples=150, deadline=None)
@given(answers, st.sampled_from(range(len(dumps))))
def test_stripped_answer_is_the_answer_without_logprobs_byte_for_byte(
    doc: dict[str, Any], style: int
) -> None:
    dump = dumps[style]
    assert strip_json(dump(doc)) == dump(_without(doc))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_anything_else_passes_through_or_stays_json(data: bytes) -> None:
    out = strip_json(data)
    if out != data:  # only ever an edit of a real answer's logprobs
        orjson.loads(out)


def test_stream_events_are_stripped_per_data_line() -> None:
    chunk: dict[str, Any] = {
        "id": "c",
        "object": "chat.completion.chunk",
        "choices": [
            {
                "index": 0,
                "delta": {"content": "hi"},
                "logprobs": {
                    "content": [{"token": "hi", "logprob": -0.1, "bytes": None, "top_logprobs": []}]
                },
                "finish_reason": None,
            }
        ],
    }
    plain = {**chunk, "choices": [{**chunk["choices"][0], "logprobs": None}]}
    block = b"data: " + orjson.dumps(chunk) + b"\n\ndata: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n"
    expected = b"data: " + orjson.dumps(plain) + b"\n\ndata: " + orjson.dumps(plain) + b"\n\ndata: [DONE]\n\n"
    assert strip_sse(block) == expected
    assert strip_sse(b": ping\n\n") == b": ping\n\n"


def test_capture_is_sampled_and_never_overrides_the_client() -> None:
    body: dict[str, Any] = {"model": "m", "messages": []}
    assert capture_top_k(body, "chat.completions", 0.5, 5, draw=0.2) == 5
    assert capture_top_k(body, "chat.completions", 0.5, 5, draw=0.7) is None
    assert capture_top_k({**body, "logprobs": True}, "chat.completions", 1.0, 5, draw=0.0) is None
    assert capture_top_k({**body, "top_logprobs": 2}, "chat.completions", 1.0, 5, draw=0.0) is None
    assert capture_top_k(body, "embeddings", 1.0, 5, draw=0.0) is None
    assert capture_top_k(body, "chat.completions", 0.0, 5, draw=0.0) is None
