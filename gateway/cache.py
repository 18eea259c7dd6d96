"""The prompt cache: exact-match answers keyed on a canonical form of the request, per task.

Two tiers: an in-process LRU per replica in front of the ``cacheentry`` table that all replicas
share. Concurrent identical misses are coalesced: one upstream call, every waiter gets its answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import delete
from sqlmodel import col, select

from gateway.protocol import ChatCompletionRequest, is_deterministic
from gateway.store.db import Database
from gateway.store.models import CacheEntry
from router.policy import CachePolicy

log = logging.getLogger("distillgate.cache")

# Fields that change how an answer is delivered or attributed, not what it says.
IGNORED_FIELDS = frozenset({"stream", "stream_options", "metadata", "user", "store", "service_tier"})


def cache_key(task: str, body: Mapping[str, Any]) -> str:
    """SHA-256 of the task and the request with key order and whitespace normalised."""
    canonical = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    blob = orjson.dumps([task, canonical], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()


def cache_directive(headers: Mapping[str, str]) -> tuple[bool, bool]:
    """(may read, may write) from the client's ``Cache-Control``: no-cache skips the read, no-store both."""
    value = headers.get("cache-control", "").lower()
    if not value:
        return True, True
    parts = {p.strip() for p in value.split(",")}
    if "no-store" in parts:
        return False, False
    return "no-cache" not in parts, True


def is_cacheable(req: ChatCompletionRequest, policy: CachePolicy) -> bool:
    if not policy.enabled or (req.n or 1) > 1:
        return False
    return is_deterministic(req) or not policy.only_deterministic


@dataclass(slots=True)
class Cached:
    body: bytes
    """The complete ``chat.completion`` JSON."""
    expires_at: float
    """Unix time."""


class PromptCache:
    """LRU in front of the shared table; lookups off the event loop, writes in the background."""

    def __init__(self, db: Database, *, max_entries: int = 10_000) -> None:
        self.db = db
        self.max_entries = max_entries
        self._lru: OrderedDict[str, Cached] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[bytes | None]] = {}
        self._writes: set[asyncio.Task[None]] = set()
        self.shared_tier = True
        self.keeps_out: Callable[[str, bytes], bool] | None = None
        """Answers this says yes to stay out of the shared tier (redaction: PII never reaches it)."""
        self.kept_out = 0

    # -- lookups -----------------------------------------------------------------------------
    async def get(self, key: str) -> bytes | None:
        entry = self._lru.get(key)
        now = time.time()
        if entry is not None:
            if entry.expires_at > now:
                self._lru.move_to_end(key)
                return entry.body
            del self._lru[key]
        if not self.shared_tier:
            return None
        shared = await asyncio.to_thread(self._get_shared, key)
        if shared is not None:
            self._remember(key, shared)
            return shared.body
        return None

    def _get_shared(self, key: str) -> Cached | None:
        try:
            with self.db.session() as session:
                row = session.get(CacheEntry, key)
        except Exception:
            return None  # the shared tier is an optimisation; a DB outage is a miss
        if row is None or row.expires_at <= datetime.now(UTC):
            return None
        return Cached(row.body, row.expires_at.timestamp())

    # -- coalescing --------------------------------------------------------------------------
    def lead_or_follow(self, key: str) -> asyncio.Future[bytes | None] | None:
        """None: the caller leads (must call ``settle``). Else a future with the leader's answer."""
        waiting = self._inflight.get(key)
        if waiting is not None:
            return waiting
        self._inflight[key] = asyncio.get_running_loop().create_future()
        return None

    def settle(self, key: str, body: bytes | None) -> None:
        future = self._inflight.pop(key, None)
        if future is not None and not future.done():
            future.set_result(body)

    # -- writes ------------------------------------------------------------------------------
    def put(self, key: str, task: str, body: bytes, ttl_s: float, max_bytes: int) -> None:
        if len(body) > max_bytes:
            return
        expires = time.time() + ttl_s
        self._remember(key, Cached(body, expires))
        if self.shared_tier:
            write = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self._put_shared, key, task, body, ttl_s)
            )
            self._writes.add(write)
            write.add_done_callback(self._writes.discard)

    def _put_shared(self, key: str, task: str, body: bytes, ttl_s: float) -> None:
        if self.keeps_out is not None and self.keeps_out(task, body):
            self.kept_out += 1
            return
        now = datetime.now(UTC)
        try:
            with self.db.session() as session:
                row = session.get(CacheEntry, key)
                if row is None:
                    row = CacheEntry(key=key, task=task, body=body, expires_at=now + timedelta(seconds=ttl_s))
                else:
                    row.body, row.created_at, row.expires_at = body, now, now + timedelta(seconds=ttl_s)
                session.add(row)
                session.commit()
        except Exception as exc:
            # Another replica may have written the same key at the same moment; either answer is right.
            log.debug("shared cache write skipped (%s)", type(exc).__name__)

    def _remember(self, key: str, entry: Cached) -> None:
        self._lru[key] = entry
        self._lru.move_to_end(key)
        while len(self._lru) > self.max_entries:
            self._lru.popitem(last=False)

    async def drain(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    def purge_expired(self) -> int:
        """Delete expired shared entries (run periodically)."""
        with self.db.session() as session:
            result = session.exec(delete(CacheEntry).where(col(CacheEntry.expires_at) <= datetime.now(UTC)))
            session.commit()
            return int(result.rowcount or 0)

    def clear(self, task: str | None = None) -> None:
        """Forget cached answers (all, or one task's) in this replica and the shared tier."""
        self._lru.clear()
        with self.db.session() as session:
            stmt = delete(CacheEntry)
            if task is not None:
                stmt = stmt.where(col(CacheEntry.task) == task)
            session.exec(stmt)
            session.commit()

    def entries(self, task: str) -> list[CacheEntry]:
        with self.db.session() as session:
            return list(session.exec(select(CacheEntry).where(CacheEntry.task == task)))
