"""Gateway API keys: generated once, stored as SHA-256, checked against an in-memory key ring.

Keys are 256-bit random tokens, so a fast hash is enough (no password stretching needed) and
lets every request be checked without a database round trip; the ring re-reads the keys changed
lately every ``refresh_s`` (1 s: the bound on how long a key revoked on another replica still
works, plus one query), evicts a key revoked here at once (``evict``), and looks a key up once on
a miss (negative answers are remembered briefly). Only
tokens shaped like our keys are looked up, at most ``MISS_LOOKUPS_PER_S`` a second: a flood of
made-up keys costs the database nothing (a key created moments ago is found by the next refresh).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import msgspec
from sqlmodel import col, select

from gateway.errors import AuthenticationFailed, PermissionDenied
from gateway.store.db import Database
from gateway.store.models import ApiKey, utcnow

KEY_PREFIX = "dg-"
KEY_LENGTH = len(KEY_PREFIX) + 43  # token_urlsafe(32)
MISS_LOOKUPS_PER_S = 10.0


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class TaskLimits(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """Limits of one key for one task (any left out: none)."""

    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None


class KeyLimits(msgspec.Struct, kw_only=True, frozen=True):
    """What ``gateway.limits`` enforces for a key: its own limits and those per task."""

    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None
    budget_period: str = "month"
    tasks: dict[str, TaskLimits] = msgspec.field(default_factory=dict)

    @classmethod
    def of(cls, row: ApiKey) -> KeyLimits | None:
        per_task = {
            task: msgspec.convert(value, TaskLimits) for task, value in (row.task_limits or {}).items()
        }
        if row.rpm is None and row.tpm is None and row.budget_usd is None and not per_task:
            return None
        return cls(
            rpm=row.rpm,
            tpm=row.tpm,
            budget_usd=row.budget_usd,
            budget_period=row.budget_period,
            tasks=per_task,
        )


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: a key id (None for the admin credential or no-auth mode), whether admin,
    and what the key may do (its task allow-list, its limits, when it expires)."""

    key_id: int | None
    admin: bool
    tasks: frozenset[str] | None = None
    """The tasks the key may call; None: any."""
    limits: KeyLimits | None = None
    expires_at: float | None = None
    """Unix time past which the key is refused."""

    @classmethod
    def of(cls, row: ApiKey) -> Caller:
        return cls(
            key_id=row.id,
            admin=row.admin,
            tasks=frozenset(row.tasks) if row.tasks is not None else None,
            limits=KeyLimits.of(row),
            expires_at=row.expires_at.timestamp() if row.expires_at is not None else None,
        )


ANONYMOUS = Caller(key_id=None, admin=False)
ADMIN = Caller(key_id=None, admin=True)

FULL_RELOAD_S = 60.0
"""Every so often the ring reloads every key, not only the changed ones (belt and braces)."""
CHANGE_OVERLAP_S = 5.0
"""Each incremental read goes back this far before the last one: a change committed late with an
earlier ``updated_at`` (clocks of replicas, long transactions) is still seen."""


class KeyRing:
    """The set of valid key hashes, kept in memory."""

    def __init__(
        self, db: Database, *, admin_key: str | None = None, required: bool = True, refresh_s: float = 1.0
    ) -> None:
        self.db = db
        self.required = required
        """Client routes need a gateway key (``auth.required``); admin routes always need the admin credential."""
        self._admin_hash = hash_key(admin_key) if admin_key else None
        self._keys: dict[str, Caller] = {}
        self._hashes: dict[int, str] = {}
        """Key id → hash, to evict a key by id."""
        self._changed_since: datetime | None = None
        self._full_at = 0.0
        self._misses: dict[str, float] = {}
        self.refresh_s = refresh_s
        self._inflight: dict[str, asyncio.Future[Caller | None]] = {}
        self._lookup_budget = MISS_LOOKUPS_PER_S
        self._budget_at = time.monotonic()
        self.lookups = 0
        """Database lookups made for keys missing from the ring (for tests and debugging)."""
        self._task: asyncio.Task[None] | None = None

    def load(self) -> None:
        """Every valid key, read anew."""
        read_at = utcnow()
        with self.db.session() as session:
            rows = session.exec(select(ApiKey).where(ApiKey.revoked_at == None)).all()  # noqa: E711
        keys, hashes = {}, {}
        for row in rows:
            if row.id is not None:
                keys[row.key_hash], hashes[row.id] = Caller.of(row), row.key_hash
        self._keys, self._hashes = keys, hashes
        self._misses.clear()
        self._changed_since = read_at
        self._full_at = time.monotonic()

    def refresh(self) -> int:
        """Re-read the keys changed since the last read (one indexed query on ``updated_at``);
        a full reload now and then. Returns how many rows were read."""
        if self._changed_since is None or time.monotonic() - self._full_at > FULL_RELOAD_S:
            self.load()
            return len(self._keys)
        read_at = utcnow()
        since = self._changed_since - timedelta(seconds=CHANGE_OVERLAP_S)
        with self.db.session() as session:
            rows = session.exec(select(ApiKey).where(col(ApiKey.updated_at) >= since)).all()
        for row in rows:
            if row.id is None:
                continue
            if row.revoked_at is not None:
                self.evict(row.id)
                self._hashes.pop(row.id, None)
                self._keys.pop(row.key_hash, None)
            else:
                self._keys[row.key_hash] = Caller.of(row)
                self._hashes[row.id] = row.key_hash
                self._misses.pop(row.key_hash, None)
        self._changed_since = read_at
        return len(rows)

    def evict(self, key_id: int) -> None:
        """Forget a key now (the replica that revoked it refuses it from the next request)."""
        digest = self._hashes.pop(key_id, None)
        if digest is not None:
            self._keys.pop(digest, None)
            self._misses[digest] = time.monotonic() + self.refresh_s * 5

    def holds_admin(self, key_id: int) -> bool:
        """Whether key ``key_id`` is a live admin key as of the last refresh (a console session
        opened with a key ends when the key is revoked or expires)."""
        digest = self._hashes.get(key_id)
        caller = self._keys.get(digest) if digest is not None else None
        if caller is None or not caller.admin:
            return False
        return caller.expires_at is None or caller.expires_at > time.time()

    async def start(self) -> None:
        await asyncio.to_thread(self._load_quietly)
        self._task = asyncio.create_task(self._refresh_forever(), name="distillgate-keyring")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await asyncio.to_thread(self._refresh_quietly)

    def _load_quietly(self) -> None:
        # A database outage keeps the last known keys working (the gateway keeps serving).
        try:
            self.load()
        except Exception:
            return

    def _refresh_quietly(self) -> None:
        try:
            self.refresh()
        except Exception:
            return

    async def caller(self, authorization: str | None) -> Caller:
        """Who calls a client route: ``authenticate``, or with ``required`` off anyone, as ``ANONYMOUS``
        unless they bring a valid credential (an admin credential still identifies an admin)."""
        if self.required:
            return await self.authenticate(authorization)
        if authorization:
            try:
                return await self.authenticate(authorization)
            except Exception:
                return ANONYMOUS
        return ANONYMOUS

    async def authenticate(self, authorization: str | None) -> Caller:
        """Check an ``Authorization: Bearer <key>`` header. The key never appears in errors."""
        if not authorization:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                code="missing_api_key",
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationFailed("The Authorization header must be 'Bearer <key>'.")
        digest = hash_key(token)
        if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash):
            return ADMIN
        caller = self._keys.get(digest)
        if caller is not None:
            if caller.expires_at is not None and time.time() >= caller.expires_at:
                raise AuthenticationFailed("The API key provided has expired.")
            return caller
        pending = self._inflight.get(digest)
        if pending is not None:  # the same new key, asked for at once: one lookup serves all
            try:
                caller = await asyncio.shield(pending)
            except asyncio.CancelledError:
                if not pending.cancelled():
                    raise  # this request was cancelled, not the lookup
                caller = await self._look_up_once(digest)  # its first asker left mid-lookup
        else:
            now = time.monotonic()
            if (
                self._misses.get(digest, 0.0) > now
                or len(token) != KEY_LENGTH
                or not token.startswith(KEY_PREFIX)
                or not self._may_look_up(now)
            ):
                raise AuthenticationFailed("Incorrect API key provided.")
            caller = await self._look_up_once(digest)
        if caller is None:
            if len(self._misses) > 10_000:
                self._misses.clear()
            self._misses[digest] = time.monotonic() + self.refresh_s
            raise AuthenticationFailed("Incorrect API key provided.")
        self._keys[digest] = caller
        if caller.key_id is not None:
            self._hashes[caller.key_id] = digest
        if caller.expires_at is not None and time.time() >= caller.expires_at:
            raise AuthenticationFailed("The API key provided has expired.")
        return caller

    async def _look_up_once(self, digest: str) -> Caller | None:
        future: asyncio.Future[Caller | None] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        self.lookups += 1
        try:
            caller = await asyncio.to_thread(self._lookup, digest)  # never raises but cancellation
        except BaseException:
            future.cancel()
            raise
        else:
            future.set_result(caller)
            return caller
        finally:
            del self._inflight[digest]

    def _may_look_up(self, now: float) -> bool:
        """A token bucket of ``MISS_LOOKUPS_PER_S`` (burst of as many) database lookups."""
        self._lookup_budget = min(
            MISS_LOOKUPS_PER_S, self._lookup_budget + (now - self._budget_at) * MISS_LOOKUPS_PER_S
        )
        self._budget_at = now
        if self._lookup_budget < 1.0:
            return False
        self._lookup_budget -= 1.0
        return True

    def _lookup(self, digest: str) -> Caller | None:
        try:
            with self.db.session() as session:
                row = session.exec(select(ApiKey).where(ApiKey.key_hash == digest)).first()
        except Exception:
            return None
        if row is None or row.revoked_at is not None:
            return None
        return Caller.of(row)


def require_admin(caller: Caller) -> None:
    if not caller.admin:
        raise PermissionDenied("This endpoint needs the admin credential.")
