"""Training sets from records: which exchanges are usable teacher demonstrations, deduplicated,
split into train and held-out by a stable hash, stored as a versioned ``DatasetSnapshot``.

The filters, the canonical prompt and the split are pure functions of records; only
``build_snapshot``/``snapshot_examples`` touch the database.

Feedback convention (``Record.feedback``, attached after the fact): a record is excluded as
negative when ``feedback["score"]`` is a number below 0, or ``feedback["label"]`` is one of
``bad``, ``negative``, ``wrong``, ``thumbs_down`` (any case), or ``feedback["exclude"]`` is true.
Anything else (no feedback, ``score >= 0``, ``label: "good"``) keeps the record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from gateway.store.db import Database
from gateway.store.models import AnswerCheck, DatasetSnapshot, Record
from trainer.kd import TeacherToken, teacher_tokens

USABLE_FINISH_REASONS = frozenset({"stop", "tool_calls"})
NEGATIVE_LABELS = frozenset({"bad", "negative", "wrong", "thumbs_down"})

# The filters in the order they are applied; a record is counted under the first one it fails.
FILTERS = (
    "status",
    "opted_out",
    "redacted",
    "not_teacher",
    "finish_reason",
    "negative_feedback",
    "failed_validation",
    "too_long",
    "malformed",
    "duplicate",
)


@dataclass(frozen=True)
class DatasetOptions:
    """What makes a record usable, and how the set is split and capped."""

    holdout: float = 0.1
    """Share of distinct prompts kept out of training for evaluation (by hash: stable)."""
    max_records: int = 20_000
    """Newest usable distinct prompts kept; older ones are left out."""
    max_prompt_tokens: int | None = None
    """Drop exchanges whose prompt was longer than this (as the teacher counted tokens)."""
    max_completion_tokens: int | None = None
    """Drop exchanges whose answer was longer than this (as the teacher counted tokens)."""
    train_on_redacted: bool = False
    """Keep records redaction changed (the policy's ``redact.train_on_redacted``): by default
    they are left out, since the teacher saw what the stored copy lacks."""
    failed_checks: frozenset[str] = frozenset()
    """Records whose answers failed their check by a second model (``trainer.validation``):
    kept in the store, left out of training."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError("holdout must be in [0, 1)")
        if self.max_records < 1:
            raise ValueError("max_records must be at least 1")


@dataclass(frozen=True)
class Example:
    """One teacher demonstration: the prompt messages plus the teacher's assistant answer."""

    record_id: str
    messages: list[dict[str, Any]]
    """The request's messages followed by the answer (OpenAI message dicts)."""
    tools: list[dict[str, Any]] | None
    prompt_key: str
    """SHA-256 of the canonical prompt: the dedup key and the split key."""
    request: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The request body as recorded (model, response_format …): what scorers and the routing
    envelope read; not part of the exported example."""
    teacher: list[TeacherToken] | None = field(default=None, repr=False, compare=False)
    """The answer's tokens with the teacher's top-k (``trainer.kd``), when the record captured
    them: training's soft labels; not part of the exported example nor of its content hash (the
    same demonstration with or without them is the same data to dedupe and split)."""

    @property
    def prompt_messages(self) -> list[dict[str, Any]]:
        return self.messages[:-1]

    @property
    def answer(self) -> dict[str, Any]:
        return self.messages[-1]

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI fine-tuning JSONL line: ``{"messages": [...], "tools": [...]}``."""
        line: dict[str, Any] = {"messages": self.messages}
        if self.tools:
            line["tools"] = self.tools
        return line


@dataclass
class Selection:
    """The outcome of ``select_examples``: kept examples (newest first) and why others were dropped."""

    train: list[Example] = field(default_factory=list)
    holdout: list[Example] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTERS, 0))
    examined: int = 0
    """Records looked at; reading stops once ``max_records`` distinct prompts are kept."""

    def counts(self) -> dict[str, Any]:
        return {
            "examined": self.examined,
            "dropped": dict(self.dropped),
            "kept": len(self.train) + len(self.holdout),
            "train": len(self.train),
            "holdout": len(self.holdout),
        }

    def content_hash(self) -> str:
        """SHA-256 over what the model would see (prompts, answers, split), not over record ids."""
        h = hashlib.sha256()
        rows = sorted(
            [("train", ex.prompt_key, _dumps(ex.answer)) for ex in self.train]
            + [("holdout", ex.prompt_key, _dumps(ex.answer)) for ex in self.holdout]
        )
        for split, key, answer in rows:
            h.update(f"{split}\t{key}\t{answer}\n".encode())
        return h.hexdigest()


# -- pure filters --------------------------------------------------------------------------


def is_negative_feedback(feedback: dict[str, Any] | None) -> bool:
    """True when attached feedback marks the answer as bad (see the module docstring)."""
    if not feedback:
        return False
    score = feedback.get("score")
    if isinstance(score, int | float) and not isinstance(score, bool) and score < 0:
        return True
    label = feedback.get("label")
    if isinstance(label, str) and label.strip().lower() in NEGATIVE_LABELS:
        return True
    return feedback.get("exclude") is True


def rejection(record: Record, options: DatasetOptions) -> str | None:
    """The first filter ``record`` fails, or ``None`` when it is a usable demonstration.

    Only columns are read here (not the request/response bodies), so this is cheap.
    """
    if record.status != 200 or record.error:
        return "status"
    if not record.stored:
        return "opted_out"
    if record.redacted and not options.train_on_redacted:
        return "redacted"
    if record.target != "teacher" or record.cache_hit:
        return "not_teacher"
    if record.finish_reason not in USABLE_FINISH_REASONS:
        return "finish_reason"
    if is_negative_feedback(record.feedback):
        return "negative_feedback"
    if record.id in options.failed_checks:
        return "failed_validation"
    if options.max_prompt_tokens is not None and record.prompt_tokens > options.max_prompt_tokens:
        return "too_long"
    if options.max_completion_tokens is not None and record.completion_tokens > options.max_completion_tokens:
        return "too_long"
    return None


def canonical_prompt(request: dict[str, Any]) -> str:
    """The part of a request that determines the teacher's answer, as normalised JSON.

    Messages (role, text content stripped of outer whitespace, names, tool calls with parsed
    arguments; tool-call ids dropped because they are random), tools and ``response_format``,
    with sorted keys. Sampling parameters, metadata and the model name are left out: the same
    prompt asked twice is one demonstration.
    """
    messages = [_canonical_message(m) for m in request.get("messages") or [] if isinstance(m, dict)]
    return _dumps(
        {
            "messages": messages,
            "tools": request.get("tools") or None,
            "response_format": request.get("response_format") or None,
        }
    )


def prompt_key(request: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_prompt(request).encode()).hexdigest()


def is_holdout(key: str, share: float) -> bool:
    """Whether the prompt with SHA-256 ``key`` is held out: its hash, read as a number in [0, 1),
    falls below ``share``. Depends on nothing but the prompt, so it is stable across runs and
    never flips when records are added."""
    return int(key[:16], 16) / float(1 << 64) < share


def to_example(record: Record) -> Example | None:
    """The demonstration in ``record`` (prompt + the teacher's first choice), or ``None`` when the
    stored bodies do not hold one."""
    request, response = record.request, record.response
    if not isinstance(request, dict) or not isinstance(response, dict):
        return None
    messages = request.get("messages")
    choices = response.get("choices")
    if not isinstance(messages, list) or not messages or not isinstance(choices, list) or not choices:
        return None
    first = choices[0]
    message = first.get("message") if isinstance(first, dict) else None
    if not isinstance(message, dict):
        return None
    answer: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    tool_calls = message.get("tool_calls")
    if tool_calls:
        answer["tool_calls"] = [
            {
                "id": c.get("id"),
                "type": "function",
                "function": {
                    "name": (c.get("function") or {}).get("name"),
                    "arguments": (c.get("function") or {}).get("arguments", "{}"),
                },
            }
            for c in tool_calls
            if isinstance(c, dict)
        ]
    if not answer["content"] and not answer.get("tool_calls"):
        return None
    tools = request.get("tools") or None
    return Example(
        record_id=record.id,
        messages=[*messages, answer],
        tools=tools,
        prompt_key=prompt_key(request),
        request=request,
        teacher=teacher_tokens(response),
    )


def select_examples(records: Iterable[Record], options: DatasetOptions) -> Selection:
    """Filter, deduplicate and split ``records``, which must come newest first.

    The newest answer to a prompt wins (the teacher's latest behaviour). Reading stops once
    ``options.max_records`` distinct prompts are kept.
    """
    selection = Selection()
    seen: set[str] = set()
    for record in records:
        if len(seen) >= options.max_records:
            break
        selection.examined += 1
        reason = rejection(record, options)
        example = None
        if reason is None:
            example = to_example(record)
            if example is None:
                reason = "malformed"
            elif example.prompt_key in seen:
                reason = "duplicate"
        if reason is not None or example is None:
            selection.dropped[reason or "malformed"] += 1
            continue
        seen.add(example.prompt_key)
        (selection.holdout if is_holdout(example.prompt_key, options.holdout) else selection.train).append(
            example
        )
    return selection


def _canonical_message(message: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.get("role")}
    content = message.get("content")
    if isinstance(content, str):
        out["content"] = content.strip()
    elif isinstance(content, list):
        out["content"] = [
            {k: (v.strip() if k == "text" and isinstance(v, str) else v) for k, v in part.items()}
            if isinstance(part, dict)
            else part
            for part in content
        ]
    if message.get("name"):
        out["name"] = message["name"]
    calls = message.get("tool_calls")
    if calls:
        out["tool_calls"] = [_canonical_call(c) for c in calls if isinstance(c, dict)]
    return out


def _canonical_call(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function") or {}
    arguments: Any = fn.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = arguments.strip()
    return {"name": fn.get("name"), "arguments": arguments}


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# -- database shell ------------------------------------------------------------------------


def failed_checks(db: Database, task: str) -> frozenset[str]:
    """Records of ``task`` whose answers failed their check (``AnswerCheck.passed`` false)."""
    with db.session() as session:
        stmt = select(AnswerCheck.record_id).where(
            AnswerCheck.task == task, col(AnswerCheck.passed).is_(False)
        )
        return frozenset(session.exec(stmt))


def _task_records(db: Database, task: str, batch: int = 500) -> Generator[Record, None, None]:
    """The task's records, newest first, streamed in batches."""
    with db.session() as session:
        query = (
            select(Record)
            .where(Record.task == task)
            .order_by(col(Record.created_at).desc(), col(Record.id).desc())
            .execution_options(yield_per=batch)
        )
        yield from session.exec(query)


def build_snapshot(
    db: Database, task: str, options: DatasetOptions | None = None
) -> tuple[DatasetSnapshot, Selection]:
    """Select ``task``'s examples from the store and save them as a new ``DatasetSnapshot``."""
    options = options or DatasetOptions()
    failed = failed_checks(db, task)
    if failed:
        options = replace(options, failed_checks=options.failed_checks | failed)
    records = _task_records(db, task)
    try:
        selection = select_examples(records, options)
    finally:
        records.close()
    counts = selection.counts() | {
        "options": {
            "holdout": options.holdout,
            "max_records": options.max_records,
            "max_prompt_tokens": options.max_prompt_tokens,
            "max_completion_tokens": options.max_completion_tokens,
        }
    }
    snapshot = DatasetSnapshot(
        task=task,
        train_ids=[ex.record_id for ex in selection.train],
        holdout_ids=[ex.record_id for ex in selection.holdout],
        counts=counts,
        content_hash=selection.content_hash(),
    )
    with db.session() as session:
        session.add(snapshot)
        session.commit()
        session.refresh(snapshot)
    return snapshot, selection


def snapshot_examples(db: Database, snapshot: DatasetSnapshot) -> tuple[list[Example], list[Example]]:
    """The train and held-out examples of a stored snapshot, in the snapshot's order."""
    wanted = [*snapshot.train_ids, *snapshot.holdout_ids]
    found: dict[str, Example] = {}
    with db.session() as session:
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            for record in session.exec(select(Record).where(col(Record.id).in_(chunk))):
                example = to_example(record)
                if example is not None:
                    found[record.id] = example
    train = [found[i] for i in snapshot.train_ids if i in found]
    holdout = [found[i] for i in snapshot.holdout_ids if i in found]
    return train, holdout


def export_jsonl(examples: Iterable[Example], path: str | Path) -> int:
    """Write examples as OpenAI fine-tuning JSONL; returns the number of lines written."""
    n = 0
    with Path(path).open("w", encoding="utf-8") as fh:
        for example in examples:
            fh.write(json.dumps(example.to_openai(), ensure_ascii=False) + "\n")
            n += 1
    return n
