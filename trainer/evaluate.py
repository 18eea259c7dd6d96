"""Offline evaluation: answer held-out prompts with a local student and score agreement with the
teacher's recorded answers.

Answers are generated greedily through ``trainer.generation`` (the code the embedded student
server runs: all held-out prompts batched, each answer capped a few tokens past the teacher's),
and both sides are compared as OpenAI chat completion responses, so any scorer
from ``router.scorers`` applies; the default is an exact match after normalising whitespace
and case (tool calls: same names and same parsed arguments).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from trainer.chat_format import parse_arguments
from trainer.collate import IGNORE_INDEX, tokenize_example
from trainer.dataset import Example
from trainer.generation import ChatResult, SamplingParams, StudentModels, split_answer

ScoreFunction = Callable[[dict[str, Any], dict[str, Any]], float]
"""(teacher response, student response) → score in [0, 1]."""


@dataclass
class EvalSample:
    record_id: str
    score: float
    teacher: str
    student: str


@dataclass
class EvalResult:
    """Agreement of a student with the teacher on held-out prompts."""

    model: str
    scorer: str
    n: int
    agreement: float
    """Mean score."""
    pass_rate: float
    """Share of prompts whose score reached ``pass_score``."""
    latency_ms_p50: float
    samples: list[EvalSample] = field(default_factory=list)
    """The first few comparisons, to show what the student says."""
    wall_s: float = 0.0
    """The whole evaluation, batched: every prompt answered."""
    completion_tokens: int = 0

    def metrics(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "scorer": self.scorer,
            "n": self.n,
            "agreement": round(self.agreement, 4),
            "pass_rate": round(self.pass_rate, 4),
            "latency_ms_p50": round(self.latency_ms_p50, 2),
            "wall_s": round(self.wall_s, 2),
            "completion_tokens": self.completion_tokens,
        }


def response_of(message: dict[str, Any], finish_reason: str = "stop") -> dict[str, Any]:
    """An assistant message as a one-choice chat completion response (what scorers read)."""
    return {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
    }


def exact_match(teacher: dict[str, Any], student: dict[str, Any]) -> float:
    """1.0 when the first choices agree: text equal after collapsing whitespace and case, and
    the same tool calls (names and parsed arguments, in order); else 0.0."""
    a, b = _first_message(teacher), _first_message(student)
    if (
        " ".join(str(a.get("content") or "").split()).casefold()
        != " ".join(str(b.get("content") or "").split()).casefold()
    ):
        return 0.0
    return float(_calls(a) == _calls(b))


def _first_message(response: dict[str, Any]) -> dict[str, Any]:
    choices = response.get("choices") or [{}]
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    return message if isinstance(message, dict) else {}


def _calls(message: dict[str, Any]) -> list[tuple[Any, Any]]:
    out = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function") or {}
        out.append((fn.get("name"), parse_arguments(fn.get("arguments"))))
    return out


def resolve_scorer(
    scorer: str | ScoreFunction,
) -> tuple[str, Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], float]]:
    """A scorer name (``exact`` built in; others from ``router.scorers``) or a callable, as
    ``(name, f(teacher, student, request))``."""
    if callable(scorer):
        function = scorer
        return getattr(scorer, "__name__", "custom"), lambda t, s, _r: function(t, s)
    if scorer == "exact":
        return "exact", lambda t, s, _r: exact_match(t, s)
    from router import scorers

    name = scorer
    return name, lambda t, s, r: scorers.score(name, t, s, request=r).score


ANSWER_SLACK_TOKENS = 8
"""Tokens an answer may run past the teacher's before it is cut: enough to see the end-of-turn
token after a matching answer (or a different tokenisation of the same text), so an exact or
JSON score is decided, while an untrained base model that rambles stops early."""


def teacher_answer_tokens(tokenizer: Any, example: Example) -> int:
    """The teacher's answer in the student's tokens, as the trainer labels it (end-of-turn included)."""
    tokenized = tokenize_example(tokenizer, example.messages, example.tools)
    return sum(1 for label in tokenized.labels if label != IGNORE_INDEX)


def evaluate(
    models: StudentModels,
    model: str,
    examples: Sequence[Example],
    *,
    scorer: str | ScoreFunction = "exact",
    pass_score: float = 1.0,
    max_tokens: int = 512,
    answer_slack: int | None = ANSWER_SLACK_TOKENS,
    keep_samples: int = 5,
) -> EvalResult:
    """Answer every example's prompt with ``model`` (the base name or a loaded adapter) greedily
    and score each answer against the teacher's. Blocking.

    All prompts are submitted at once, so the decode loop answers them in batches. Each answer
    is capped at the teacher's length plus ``answer_slack`` tokens (``None``: ``max_tokens``
    only); ``latency_ms_p50`` is an answer's own decode time, without its wait in the queue.
    """
    return evaluate_many(
        models,
        [model],
        examples,
        scorer=scorer,
        pass_score=pass_score,
        max_tokens=max_tokens,
        answer_slack=answer_slack,
        keep_samples=keep_samples,
    )[0]


def evaluate_many(
    models: StudentModels,
    names: Sequence[str],
    examples: Sequence[Example],
    *,
    scorer: str | ScoreFunction = "exact",
    pass_score: float = 1.0,
    max_tokens: int = 512,
    answer_slack: int | None = ANSWER_SLACK_TOKENS,
    keep_samples: int = 5,
) -> list[EvalResult]:
    """``evaluate`` for several models of ``models`` at once (the base and a candidate adapter):
    every model's prompts go into the same decode batches, so the whole comparison costs about
    what the slowest model's answers cost alone. One result per name, in order; each ``wall_s``
    runs from the common start to that model's last answer."""
    function_name, function = resolve_scorer(scorer)
    started = time.perf_counter()
    submitted: list[list[Future[ChatResult]]] = []
    for model in names:
        tokenizer = models.tokenizer_for(model)
        futures: list[Future[ChatResult]] = []
        for example in examples:
            room = (
                models.max_model_len
                - 1
                - len(models.prompt_ids(model, example.prompt_messages, example.tools))
            )
            limit = min(max_tokens, room)
            if answer_slack is not None:
                limit = min(limit, teacher_answer_tokens(tokenizer, example) + answer_slack)
            params = SamplingParams(temperature=0.0, max_tokens=max(1, limit))
            futures.append(models.submit(model, example.prompt_messages, example.tools, params))
        submitted.append(futures)
    results = []
    for model, futures in zip(names, submitted, strict=True):
        results.append(
            _collect(model, function_name, function, examples, futures, pass_score, keep_samples, started)
        )
    return results


def _collect(
    model: str,
    scorer_name: str,
    function: Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], float],
    examples: Sequence[Example],
    futures: Sequence[Future[ChatResult]],
    pass_score: float,
    keep_samples: int,
    started: float,
) -> EvalResult:
    scores: list[float] = []
    latencies: list[float] = []
    samples: list[EvalSample] = []
    tokens = 0
    for example, future in zip(examples, futures, strict=True):
        result = future.result()
        latencies.append(result.decode_s * 1000.0)
        generation = result.choices[0]
        tokens += generation.completion_tokens
        request = example.request or {"messages": example.prompt_messages, "tools": example.tools}
        answer = split_answer(generation.text, bool(example.tools))
        message = {"role": "assistant", "content": answer.content, "tool_calls": answer.tool_calls or None}
        finish = "tool_calls" if answer.tool_calls else generation.finish_reason
        value = float(function(response_of(example.answer), response_of(message, finish), request))
        scores.append(value)
        if len(samples) < keep_samples:
            samples.append(EvalSample(example.record_id, value, _show(example.answer), _show(message)))
    n = len(scores)
    ordered = sorted(latencies)
    return EvalResult(
        model=model,
        scorer=scorer_name,
        n=n,
        agreement=sum(scores) / n if n else 0.0,
        pass_rate=sum(1 for s in scores if s >= pass_score - 1e-12) / n if n else 0.0,
        latency_ms_p50=ordered[len(ordered) // 2] if ordered else 0.0,
        samples=samples,
        wall_s=time.perf_counter() - started,
        completion_tokens=tokens,
    )


def evaluate_adapter(
    base_model: str,
    adapter_path: str | None,
    examples: Sequence[Example],
    **kwargs: Any,
) -> EvalResult:
    """Load ``base_model`` (and the adapter or full model at ``adapter_path``, if any) and ``evaluate``."""
    with StudentModels(base_model) as models:
        model = models.base_name
        if adapter_path is not None:
            models.load("candidate", adapter_path)
            model = "candidate"
        return evaluate(models, model, examples, **kwargs)


def evaluate_base_and_adapter(
    base_model: str,
    adapter_path: str,
    examples: Sequence[Example],
    **kwargs: Any,
) -> tuple[EvalResult, EvalResult]:
    """The untuned base and the adapter (or full model) at ``adapter_path`` on the same prompts,
    answered together: one model load, shared decode batches (``evaluate_many``)."""
    with StudentModels(base_model) as models:
        models.load("candidate", adapter_path)
        base, tuned = evaluate_many(models, [models.base_name, "candidate"], examples, **kwargs)
        return base, tuned


def _show(message: dict[str, Any]) -> str:
    if message.get("tool_calls"):
        return json.dumps([(c.get("function") or {}) for c in message["tool_calls"]], ensure_ascii=False)
    return str(message.get("content") or "")
