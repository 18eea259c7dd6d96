"""Soft labels captured live: the teacher is asked for its top-k logprobs on a sampled share of the
requests that did not ask for them, the record keeps them, and the client gets the bytes it would
have got without the capture.

A choice of an answer that was not asked for logprobs carries ``"logprobs": null`` (OpenAI, vLLM
and the embedded student alike). So stripping a captured answer is one edit per choice: the value
of its ``logprobs`` member replaced by ``null``, every other byte left where it was. The edit is
done on the bytes, by a scanner that knows JSON's strings and nesting, never by parsing and
dumping again (which would change spacing, key order and number spelling: the client would see a
re-serialised answer, not the teacher's).
"""

from __future__ import annotations

import random
from typing import Any

_WS = b" \t\r\n"


class _Scan:
    """Positions in one JSON text; every method returns the index just past what it read."""

    __slots__ = ("text",)

    def __init__(self, text: bytes) -> None:
        self.text = text

    def ws(self, i: int) -> int:
        text, n = self.text, len(self.text)
        while i < n and text[i] in _WS:
            i += 1
        return i

    def string(self, i: int) -> int:
        """``i`` at an opening quote."""
        text = self.text
        j = i + 1
        while True:
            q = text.index(b'"', j)
            k = q - 1
            backslashes = 0
            while text[k] == 0x5C:  # a quote is escaped by an odd run of backslashes before it
                backslashes += 1
                k -= 1
            if backslashes % 2 == 0:
                return q + 1
            j = q + 1

    def value(self, i: int) -> int:
        """``i`` at the first byte of a value."""
        text = self.text
        c = text[i]
        if c == 0x22:  # "
            return self.string(i)
        if c in b"{[":
            depth = 0
            n = len(text)
            while i < n:
                c = text[i]
                if c == 0x22:
                    i = self.string(i)
                    continue
                if c in b"{[":
                    depth += 1
                elif c in b"}]":
                    depth -= 1
                    if depth == 0:
                        return i + 1
                i += 1
            raise ValueError("unterminated JSON value")
        n = len(text)
        while i < n and text[i] not in b",}] \t\r\n":
            i += 1
        return i

    def members(self, i: int) -> list[tuple[bytes, int, int]]:
        """``i`` at ``{``: each member's raw key and the span of its value."""
        text = self.text
        out: list[tuple[bytes, int, int]] = []
        i = self.ws(i + 1)
        if text[i] == 0x7D:  # }
            return out
        while True:
            key_end = self.string(i)
            key = text[i + 1 : key_end - 1]
            i = self.ws(key_end)
            if text[i] != 0x3A:  # :
                raise ValueError("expected ':'")
            start = self.ws(i + 1)
            end = self.value(start)
            out.append((key, start, end))
            i = self.ws(end)
            if text[i] == 0x2C:  # ,
                i = self.ws(i + 1)
                continue
            if text[i] == 0x7D:
                return out
            raise ValueError("expected ',' or '}'")

    def elements(self, i: int) -> list[tuple[int, int]]:
        """``i`` at ``[``: the span of each element."""
        text = self.text
        out: list[tuple[int, int]] = []
        i = self.ws(i + 1)
        if text[i] == 0x5D:  # ]
            return out
        while True:
            end = self.value(i)
            out.append((i, end))
            i = self.ws(end)
            if text[i] == 0x2C:
                i = self.ws(i + 1)
                continue
            if text[i] == 0x5D:
                return out
            raise ValueError("expected ',' or ']'")


def strip_json(data: bytes) -> bytes:
    """The answer less its choices' logprobs (each value replaced by ``null``), byte for byte
    otherwise. Anything that is not an object with a ``choices`` array comes back unchanged."""
    if b'"logprobs"' not in data:
        return data
    scan = _Scan(data)
    try:
        start = scan.ws(0)
        if start >= len(data) or data[start] != 0x7B:
            return data
        edits: list[tuple[int, int]] = []
        for key, v_start, _v_end in scan.members(start):
            if key != b"choices" or data[v_start] != 0x5B:
                continue
            for c_start, _c_end in scan.elements(v_start):
                if data[c_start] != 0x7B:
                    continue
                for c_key, lp_start, lp_end in scan.members(c_start):
                    if c_key == b"logprobs" and data[lp_start:lp_end] != b"null":
                        edits.append((lp_start, lp_end))
    except (ValueError, IndexError):
        return data
    if not edits:
        return data
    out = bytearray()
    last = 0
    for s, e in edits:
        out += data[last:s]
        out += b"null"
        last = e
    out += data[last:]
    return bytes(out)


def strip_sse(block: bytes) -> bytes:
    """Whole SSE events (a block ending in a blank line) with each ``data:`` payload stripped."""
    if b'"logprobs"' not in block:
        return block
    out = bytearray()
    for line in block.splitlines(keepends=True):
        if line.startswith(b"data:"):
            body_end = len(line.rstrip(b"\r\n"))
            head = 6 if line[5:6] == b" " else 5
            out += line[:head] + strip_json(line[head:body_end]) + line[body_end:]
        else:
            out += line
    return bytes(out)


def capture_top_k(
    body: dict[str, Any], endpoint: str, rate: float, top_k: int, draw: float | None = None
) -> int | None:
    """The top-k to ask the teacher for on this request, or None: only chat completions that did
    not ask for logprobs themselves (theirs are kept and stored as they are), sampled at ``rate``."""
    if endpoint != "chat.completions" or rate <= 0.0 or top_k <= 0:
        return None
    if body.get("logprobs") or body.get("top_logprobs") is not None:
        return None
    if (random.random() if draw is None else draw) >= rate:
        return None
    return top_k


def with_logprobs(body: dict[str, Any], top_k: int) -> dict[str, Any]:
    return {**body, "logprobs": True, "top_logprobs": top_k}


__all__ = ["capture_top_k", "strip_json", "strip_sse", "with_logprobs"]
