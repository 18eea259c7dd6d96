"""Teacher answers checked by a second model before they become training data.

A task whose policy has a ``validate`` section has its recorded teacher answers scored by a
checking model (the teacher itself with a checking prompt unless the section names another): a
share (``rate``) of them, chosen by record id so the same records are chosen on every replica
and every pass. Each verdict is an ``AnswerCheck`` row, made once per record and kept (the cache:
no record is checked twice); answers scored under ``min_score`` stay in ``record``, marked, and
``trainer.dataset`` leaves them out (``failed_validation`` in its counts). Calls run with bounded
concurrency; each is metered in the ledger as a ``record`` row with target ``validator`` and no
content, so its spend shows beside the teacher's, the student's and the judge's.

A reply with no score in it is not a verdict: nothing is stored for it and the record is tried
again on a later pass (counted as ``unscored``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import exists
from sqlmodel import col, select

from gateway.store import usage
from gateway.store.db import Database
from gateway.store.models import AnswerCheck, Record, new_id, utcnow
from router.policy import Policy, ValidatePolicy, token_cost

log = logging.getLogger("distillgate.validation")

VALIDATOR_TARGET = "validator"

CHECK_PROMPT = """You check another assistant's answer before it is used to train a smaller model.
Score how correct and complete the ANSWER is as a reply to the CONVERSATION, from 0 (wrong) to 10 \
(fully correct). Reply with the score only, for example: 7

CONVERSATION:
{conversation}

ANSWER:
{answer}"""

_SCORE = re.compile(r"(?<![\d.])(10|\d)(?:\.\d+)?(?:\s*/\s*10)?(?![\d])")


def parse_score(text: str) -> float | None:
    """The first score 0..10 in the checker's reply, as 0..1; None when there is none."""
    match = _SCORE.search(text or "")
    if match is None:
        return None
    value = float(match.group(0).split("/")[0])
    return max(0.0, min(1.0, value / 10.0))


def chosen(record_id: str, rate: float) -> bool:
    """Whether ``record_id`` is in the checked share: a hash, so every pass and replica agree."""
    if rate >= 1.0:
        return True
    digest = hashlib.sha256(record_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def check_messages(request: dict[str, Any], response: dict[str, Any]) -> list[dict[str, str]] | None:
    """The checking prompt for one recorded exchange; None when it has no answer to check."""
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message") or {}
    answer = _text(message.get("content"))
    if message.get("tool_calls"):
        answer += "\n" + str(message["tool_calls"])
    if not answer.strip():
        return None
    conversation = "\n".join(
        f"{m.get('role', 'user')}: {_text(m.get('content'))}"
        for m in request.get("messages") or []
        if isinstance(m, dict)
    )
    return [{"role": "user", "content": CHECK_PROMPT.format(conversation=conversation, answer=answer)}]


@dataclass
class CheckCounts:
    """One pass over a task."""

    task: str
    checked: int = 0
    passed: int = 0
    failed: int = 0
    unscored: int = 0
    errors: int = 0
    cost_usd: float = 0.0
    scores: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "passed": self.passed,
            "failed": self.failed,
            "unscored": self.unscored,
            "errors": self.errors,
            "cost_usd": round(self.cost_usd, 6),
        }


def pending(db: Database, task: str, rate: float, limit: int) -> list[Record]:
    """The task's usable teacher answers with no verdict yet, newest first, in the checked share."""
    with db.session() as session:
        stmt = (
            select(Record)
            .where(
                Record.task == task,
                Record.target == "teacher",
                Record.status == 200,
                col(Record.stored).is_(True),
                col(Record.cache_hit).is_(False),
                ~exists().where(col(AnswerCheck.record_id) == Record.id),
            )
            .order_by(col(Record.created_at).desc())
            .limit(limit * 4 if rate < 1.0 else limit)
        )
        rows = [r for r in session.exec(stmt) if chosen(r.id, rate)]
    return rows[:limit]


def summary(db: Database, task: str) -> dict[str, int]:
    """Checked, passed and failed answers of ``task`` so far."""
    with db.session() as session:
        rows = session.exec(select(AnswerCheck.passed).where(AnswerCheck.task == task)).all()
    failed = sum(1 for passed in rows if not passed)
    return {"checked": len(rows), "passed": len(rows) - failed, "failed": failed}


class AnswerChecker:
    """Scores pending teacher answers of a task with its checking model."""

    def __init__(self, db: Database, policy: Policy, *, transport: httpx.AsyncBaseTransport | None = None):
        self.db = db
        self.policy = policy
        self.transport = transport

    def _endpoint(self, settings: ValidatePolicy) -> tuple[str, str | None, dict[str, str]]:
        teacher = self.policy.teacher
        base_url = (settings.base_url or teacher.base_url).rstrip("/")
        model = settings.model or teacher.model
        env = settings.api_key_env or (teacher.api_key_env if settings.base_url is None else None)
        headers = dict(teacher.headers) if settings.base_url is None else {}
        key = os.environ.get(env) if env else None
        if key:
            headers["authorization"] = f"Bearer {key}"
        return base_url, model, headers

    def run(self, task: str, limit: int = 500) -> CheckCounts | None:
        """Check up to ``limit`` pending answers of ``task`` now; None when it has no ``validate``."""
        settings = self.policy.for_task(task).validate_answers
        if settings is None:
            return None
        return asyncio.run(self._run(task, settings, limit))

    async def _run(self, task: str, settings: ValidatePolicy, limit: int) -> CheckCounts:
        counts = CheckCounts(task)
        records = await asyncio.to_thread(pending, self.db, task, settings.rate, limit)
        if not records:
            return counts
        base_url, model, headers = self._endpoint(settings)
        gate = asyncio.Semaphore(settings.max_concurrency)
        timeout = httpx.Timeout(self.policy.teacher.timeout, connect=10.0)
        async with httpx.AsyncClient(
            base_url=base_url, headers=headers, timeout=timeout, transport=self.transport
        ) as client:

            async def one(record: Record) -> tuple[AnswerCheck | None, Record | None]:
                messages = check_messages(record.request or {}, record.response or {})
                if messages is None:
                    return None, None
                body: dict[str, Any] = {"messages": messages, "max_tokens": 8, "temperature": 0}
                body["model"] = model or record.model
                async with gate:
                    try:
                        resp = await client.post("/chat/completions", json=body)
                    except httpx.HTTPError as exc:
                        log.warning("answer check of %s failed: %s", record.id, type(exc).__name__)
                        counts.errors += 1
                        return None, None
                try:
                    answer = resp.json()
                except ValueError:
                    answer = {}
                usage = answer.get("usage") or {} if isinstance(answer, dict) else {}
                prompt, completion = (
                    int(usage.get("prompt_tokens") or 0),
                    int(usage.get("completion_tokens") or 0),
                )
                cost = token_cost(self.policy.price(str(body["model"])), prompt, completion)
                ledger = Record(
                    id=new_id(),
                    api_key_id=record.api_key_id,  # the key whose traffic was checked pays for it
                    task=task,
                    model=str(body["model"])[:200],
                    target=VALIDATOR_TARGET,
                    stored=False,
                    status=resp.status_code,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    cost_usd=cost,
                    teacher_cost_usd=0.0,
                )
                counts.cost_usd += cost
                if resp.status_code != 200:
                    counts.errors += 1
                    return None, ledger
                reply = ""
                with contextlib.suppress(KeyError, IndexError, TypeError, AttributeError):
                    reply = _text(answer["choices"][0]["message"].get("content"))
                score = parse_score(reply)
                if score is None:
                    counts.unscored += 1
                    return None, ledger
                passed = score >= settings.min_score
                return (
                    AnswerCheck(
                        record_id=record.id,
                        task=task,
                        score=score,
                        passed=passed,
                        checker=str(body["model"])[:200],
                        detail=reply[:500],
                        cost_usd=cost,
                        created_at=utcnow(),
                    ),
                    ledger,
                )

            results = await asyncio.gather(*(one(r) for r in records))
        checks = [c for c, _ in results if c is not None]
        ledger = [entry for _, entry in results if entry is not None]
        for check in checks:
            counts.checked += 1
            counts.scores.append(check.score or 0.0)
            if check.passed:
                counts.passed += 1
            else:
                counts.failed += 1
        await asyncio.to_thread(self._save, checks, ledger)
        log.info(
            "checked %d answers of %s: %d passed, %d failed (%d unscored, %d errors)",
            counts.checked,
            task,
            counts.passed,
            counts.failed,
            counts.unscored,
            counts.errors,
        )
        return counts

    def _save(self, checks: list[AnswerCheck], ledger: list[Record]) -> None:
        with self.db.session() as session:
            for check in checks:
                session.merge(check)  # a verdict another pass stored meanwhile is the same verdict
            session.add_all(ledger)
            session.commit()
        # The checks count against the budgets of the keys whose answers they checked.
        usage.charge(self.db.engine, ledger)
