"""Teacher and student answers side by side, line by line, for a person to see where they differ.

An answer whose text is JSON (JSON mode, tool arguments) is laid out with sorted keys first, so the
diff shows differing fields rather than differing whitespace or key order.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Any, Literal

Tag = Literal["equal", "replace", "delete", "insert"]


@dataclass(frozen=True, slots=True)
class DiffRow:
    """One line of each side (``None`` where that side has no line here)."""

    tag: Tag
    teacher: str | None
    student: str | None


def _pretty(text: str) -> str:
    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        return text
    if isinstance(value, dict | list):
        return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    return text


def answer_text(response: dict[str, Any] | None) -> str:
    """What a chat completion's first choice says: its text and its tool calls, JSON laid out."""
    if not response:
        return ""
    choices = response.get("choices") or []
    message = (choices[0].get("message") or {}) if choices and isinstance(choices[0], dict) else {}
    parts = []
    content = message.get("content")
    if isinstance(content, str) and content:
        parts.append(_pretty(content))
    for call in message.get("tool_calls") or []:
        function = (call or {}).get("function") or {}
        parts.append(f"tool {function.get('name', '?')}:\n{_pretty(str(function.get('arguments', '')))}")
    return "\n".join(parts)


def is_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict | list)
    except (ValueError, TypeError):
        return False


def side_by_side(teacher: str, student: str) -> list[DiffRow]:
    """The two texts aligned line by line, each line tagged as difflib's opcodes tag it."""
    left, right = teacher.splitlines() or [""], student.splitlines() or [""]
    rows: list[DiffRow] = []
    matcher = difflib.SequenceMatcher(a=left, b=right, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        a, b = left[i1:i2], right[j1:j2]
        for k in range(max(len(a), len(b))):
            rows.append(DiffRow(tag, a[k] if k < len(a) else None, b[k] if k < len(b) else None))
    return rows
