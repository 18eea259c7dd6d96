"""Scorers: how close a student answer is to the teacher's answer for the same request.

Each takes two OpenAI chat completion response dicts (the first choice is compared) and
returns a score in [0, 1]; ``auto`` picks one by the shape of the teacher's answer.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

ScorerName = Literal["auto", "exact", "json_valid", "json_fields", "tool_call", "similarity", "judge"]
Response = Mapping[str, Any] | None

JudgeCall = Callable[[dict[str, Any]], Awaitable[Any]]
"""Sends a chat completions body to the teacher; returns the response dict (or an
``httpx.Response``, whose JSON is read)."""

LABEL_MAX_CHARS: Final = 64
LABEL_MAX_WORDS: Final = 5


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: Any
    """Parsed JSON arguments; the raw string when they are not valid JSON."""
    valid: bool


@dataclass(frozen=True)
class Answer:
    """The first choice of a chat completion, reduced to what scorers compare."""

    content: str
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class ScoreResult:
    scorer_used: str
    score: float
    passed: bool
    detail: str | None = None
    """Why a score is what it is when that is not obvious (e.g. an unreadable judge answer)."""


def answer_of(response: Response) -> Answer:
    """Read the first choice's text and tool calls; anything malformed reads as empty."""
    if not isinstance(response, Mapping):
        return Answer("")
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        return Answer("")
    message = choices[0].get("message")
    if not isinstance(message, Mapping):
        text = choices[0].get("text")  # legacy completions
        return Answer(text if isinstance(text, str) else "")
    content = message.get("content")
    if isinstance(content, list):
        content = "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    calls: list[ToolCall] = []
    raw_calls = message.get("tool_calls")
    if not raw_calls and isinstance(message.get("function_call"), Mapping):
        raw_calls = [{"function": message["function_call"]}]
    for call in raw_calls if isinstance(raw_calls, list) else []:
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            continue
        raw_args = function.get("arguments")
        try:
            args, valid = (json.loads(raw_args), True) if isinstance(raw_args, str) else (raw_args, False)
        except ValueError:
            args, valid = raw_args, False
        calls.append(ToolCall(str(function.get("name", "")), args, valid))
    return Answer(content if isinstance(content, str) else "", tuple(calls))


def normalise(text: str) -> str:
    """Strip, collapse runs of whitespace to one space, and casefold."""
    return " ".join(text.split()).casefold()


def parse_json(text: str) -> tuple[bool, Any]:
    """``(True, value)`` when ``text`` (surrounding whitespace aside) is one JSON document.

    Strict on purpose: a client asking for JSON cannot parse prose or Markdown fences around it.
    """
    try:
        return True, json.loads(text.strip())
    except ValueError:
        return False, None


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: 1 == 1.0, but ``true`` is not 1 and key order does not matter."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def exact(teacher: Response, student: Response) -> float:
    """1 when the two texts are equal after ``normalise``, else 0."""
    return float(normalise(answer_of(teacher).content) == normalise(answer_of(student).content))


def json_valid(teacher: Response, student: Response) -> float:
    """1 when the student's text is one valid JSON document, else 0 (the teacher is not read)."""
    return float(parse_json(answer_of(student).content)[0])


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list) and value:
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))
    else:
        yield path, value


def json_fields(teacher: Response, student: Response) -> float:
    """Field-level agreement of two JSON answers: matching leaves / all leaf paths of either.

    Leaves are addressed by their path (object keys, list indexes). A leaf matches when the
    student has the same path with an equal value (``json_equal``). The denominator is the
    union of both answers' paths, so with no extra student fields this is the share of the
    teacher's fields the student got right, and invented fields (e.g. a hallucinated extra
    entity) lower the score. Invalid student JSON scores 0; when the teacher's answer is not
    JSON there are no fields to compare and the texts are compared with ``exact``.
    """
    t_ok, t_value = parse_json(answer_of(teacher).content)
    if not t_ok:
        return exact(teacher, student)
    s_ok, s_value = parse_json(answer_of(student).content)
    if not s_ok:
        return 0.0
    t_leaves = dict(_leaves(t_value))
    s_leaves = dict(_leaves(s_value))
    paths = t_leaves.keys() | s_leaves.keys()
    matched = sum(1 for p in t_leaves if p in s_leaves and json_equal(t_leaves[p], s_leaves[p]))
    return matched / len(paths)


def _same_call(a: ToolCall, b: ToolCall) -> bool:
    if a.name != b.name or a.valid != b.valid:
        return False
    return json_equal(a.arguments, b.arguments)


def tool_call(teacher: Response, student: Response) -> float:
    """Share of tool calls that agree: same function name and equal JSON arguments.

    Calls are matched regardless of order (parallel calls have none), each at most once;
    the score is matches / the larger of the two call counts, so a missing or an extra call
    both cost. Arguments that are not valid JSON only match the identical invalid string.
    With no tool calls on either side the texts are compared with ``exact``.
    """
    t_calls = answer_of(teacher).tool_calls
    s_calls = list(answer_of(student).tool_calls)
    if not t_calls and not s_calls:
        return exact(teacher, student)
    matched = 0
    for call in t_calls:
        for i, candidate in enumerate(s_calls):
            if _same_call(call, candidate):
                matched += 1
                del s_calls[i]
                break
    return matched / max(len(t_calls), len(answer_of(student).tool_calls))


def chrf(
    hypothesis: str, reference: str, *, char_order: int = 6, beta: float = 2.0, whitespace: bool = False
) -> float:
    """chrF (Popović 2015) in [0, 1], as sacreBLEU 2 computes it by default.

    For each n in 1..``char_order`` count character n-grams of both strings (whitespace
    removed unless ``whitespace``); precision_n = matched / hypothesis n-grams, recall_n =
    matched / reference n-grams, matches clipped by counts. Average precision and recall over
    the orders where both strings have n-grams ("effective order"), then
    F_β = (1 + β²)·P·R / (β²·P + R): β = 2 weighs recall twice as much as precision.
    """
    if not whitespace:
        hypothesis = "".join(hypothesis.split())
        reference = "".join(reference.split())
    precision = recall = 0.0
    effective = 0
    for n in range(1, char_order + 1):
        hyp = Counter(hypothesis[i : i + n] for i in range(len(hypothesis) - n + 1))
        ref = Counter(reference[i : i + n] for i in range(len(reference) - n + 1))
        n_hyp, n_ref = sum(hyp.values()), sum(ref.values())
        if n_hyp and n_ref:
            common = sum((hyp & ref).values())
            precision += common / n_hyp
            recall += common / n_ref
            effective += 1
    if effective == 0:
        return 1.0 if hypothesis == reference else 0.0
    precision /= effective
    recall /= effective
    if precision + recall == 0:
        return 0.0
    b2 = beta * beta
    return (1 + b2) * precision * recall / (b2 * precision + recall)


def _as_text(answer: Answer) -> str:
    if not answer.tool_calls:
        return answer.content
    calls = [{"name": c.name, "arguments": c.arguments} for c in answer.tool_calls]
    return (answer.content + "\n" if answer.content else "") + json.dumps(calls, sort_keys=True)


def similarity(teacher: Response, student: Response) -> float:
    """chrF of the student's text against the teacher's (tool calls rendered as JSON)."""
    return chrf(_as_text(answer_of(student)), _as_text(answer_of(teacher)))


JUDGE_RUBRIC: Final = (
    "You grade a candidate answer against a reference answer written by an expert for the same "
    "request. Judge whether the candidate would serve the user as well as the reference: the same "
    "facts, decisions, labels, values and required format. Ignore differences in wording that do "
    "not change the meaning. Do not reward length. Reply with exactly one line, `SCORE: <integer "
    "from 0 to 10>`, where 10 means as good as the reference and 0 means wrong or unusable."
)
JUDGE_MAX_CHARS: Final = 6000
"""Each part of the judge prompt is cut to this many characters to bound its cost."""

_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?))?", re.IGNORECASE)
_BARE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?))?\s*\.?\s*$")


def parse_judge_score(text: str) -> float | None:
    """Read the judge's ``SCORE: n`` (0 to 10, or ``n/d``) as a score in [0, 1]; ``None`` for junk.

    The last ``score`` mention wins (judges sometimes reason first); a bare number is accepted.
    Values outside the scale are junk, not clamped, since they show the rubric was not followed.
    """
    matches = list(_SCORE.finditer(text))
    match = matches[-1] if matches else _BARE.match(text)
    if match is None:
        return None
    value = float(match.group(1))
    scale = float(match.group(2)) if match.group(2) else 10.0
    if scale <= 0 or not 0 <= value <= scale:
        return None
    return value / scale


def _judge_prompt(teacher: Answer, student: Answer, request: Mapping[str, Any] | None) -> str:
    parts = []
    messages = request.get("messages") if isinstance(request, Mapping) else None
    if isinstance(messages, list):
        shown = []
        for message in messages[-6:]:
            if isinstance(message, Mapping):
                content = message.get("content")
                text = content if isinstance(content, str) else json.dumps(content)
                shown.append(f"[{message.get('role', '?')}] {text}")
        parts.append("## Request\n" + "\n".join(shown)[-JUDGE_MAX_CHARS:])
    parts.append("## Reference answer\n" + _as_text(teacher)[:JUDGE_MAX_CHARS])
    parts.append("## Candidate answer\n" + _as_text(student)[:JUDGE_MAX_CHARS])
    return "\n\n".join(parts)


async def judge(
    call: JudgeCall,
    teacher: Response,
    student: Response,
    *,
    model: str,
    request: Mapping[str, Any] | None = None,
) -> tuple[float, str | None]:
    """Ask the teacher model to grade the student's answer with the fixed ``JUDGE_RUBRIC``.

    Returns ``(score, detail)``: an unreadable judge answer scores 0 with ``detail`` saying so
    (a failed grade must not help a candidate pass). Transport errors propagate to the caller.
    """
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": JUDGE_RUBRIC},
            {"role": "user", "content": _judge_prompt(answer_of(teacher), answer_of(student), request)},
        ],
        "temperature": 0,
        "max_tokens": 16,
    }
    result = await call(body)
    if hasattr(result, "json") and hasattr(result, "raise_for_status"):
        result.raise_for_status()
        result = result.json()
    text = answer_of(result).content
    value = parse_judge_score(text)
    if value is None:
        return 0.0, f"unreadable judge answer: {text[:80]!r}"
    return value, None


def is_label(text: str) -> bool:
    """A short single-line answer (a class name, a yes/no): compared exactly."""
    stripped = text.strip()
    return (
        bool(stripped)
        and "\n" not in stripped
        and len(stripped) <= LABEL_MAX_CHARS
        and len(stripped.split()) <= LABEL_MAX_WORDS
    )


def pick_scorer(teacher: Response, request: Mapping[str, Any] | None = None) -> ScorerName:
    """``auto``: choose by the shape of the teacher's answer (and the request's response_format).

    Tool calls → ``tool_call``; a JSON object or array (or a request for JSON output) →
    ``json_fields``; a short single-line label → ``exact``; anything else → ``similarity``.
    """
    answer = answer_of(teacher)
    if answer.tool_calls:
        return "tool_call"
    fmt = request.get("response_format") if isinstance(request, Mapping) else None
    if isinstance(fmt, Mapping) and fmt.get("type") in ("json_object", "json_schema"):
        return "json_fields"
    ok, value = parse_json(answer.content)
    if ok and isinstance(value, dict | list):
        return "json_fields"
    if is_label(answer.content):
        return "exact"
    return "similarity"


_SYNC_SCORERS: Final[dict[str, Callable[[Response, Response], float]]] = {
    "exact": exact,
    "json_valid": json_valid,
    "json_fields": json_fields,
    "tool_call": tool_call,
    "similarity": similarity,
}


def _result(scorer: str, value: float, pass_score: float, detail: str | None = None) -> ScoreResult:
    value = min(1.0, max(0.0, value)) if math.isfinite(value) else 0.0
    return ScoreResult(scorer, value, value >= pass_score - 1e-12, detail)


def score(
    scorer: ScorerName | str,
    teacher: Response,
    student: Response,
    *,
    pass_score: float = 0.9,
    request: Mapping[str, Any] | None = None,
) -> ScoreResult:
    """Score with a synchronous scorer (``auto`` resolves first); a pair passes at ``>= pass_score``.

    ``judge`` needs a call to the teacher: use ``score_pair``.
    """
    name = pick_scorer(teacher, request) if scorer == "auto" else scorer
    if name == "judge":
        raise ValueError("the judge scorer calls the teacher: use score_pair(..., judge_call=...)")
    function = _SYNC_SCORERS.get(name)
    if function is None:
        raise ValueError(f"unknown scorer {scorer!r} (one of auto, judge, {', '.join(_SYNC_SCORERS)})")
    return _result(name, function(teacher, student), pass_score)


async def score_pair(
    scorer: ScorerName | str,
    teacher: Response,
    student: Response,
    *,
    pass_score: float = 0.9,
    request: Mapping[str, Any] | None = None,
    judge_call: JudgeCall | None = None,
    judge_model: str | None = None,
) -> ScoreResult:
    """``score`` for every scorer including ``judge`` (which needs ``judge_call`` and ``judge_model``)."""
    if scorer != "judge":
        return score(scorer, teacher, student, pass_score=pass_score, request=request)
    if judge_call is None or not judge_model:
        raise ValueError("the judge scorer needs judge_call and judge_model (the teacher)")
    value, detail = await judge(judge_call, teacher, student, model=judge_model, request=request)
    return _result("judge", value, pass_score, detail)
