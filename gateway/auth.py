"""Gateway API keys: generated once, stored as SHA-256, checked against an in-memory key ring.

Keys are 256-bit random tokens, so a fast hash is enough (no password stretching needed) and
lets every request be checked without a database round trip; the ring refreshes in the
background and looks a key up once on a miss (negative answers are remembered briefly). Only
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

from sqlmodel import select

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


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: a key id (None for the admin credential or no-auth mode) and whether admin."""

    key_id: int | None
    admin: bool


ANONYMOUS = Caller(key_id=None, admin=False)
ADMIN = Caller(key_id=None, admin=True)


def create_key(db: Database, name: str, *, admin: bool = False) -> tuple[ApiKey, str]:
    """Store a new key and return it with its secret, which is never retrievable again."""
    secret = generate_key()
    row = ApiKey(name=name, prefix=secret[:10], key_hash=hash_key(secret), admin=admin)
    with db.session() as session:
        session.add(row)
        session.commit()
        session.refresh(row)
    return row, secret


def revoke_key(db: Database, key_id: int) -> bool:
    with db.session() as session:
        row = session.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = utcnow()
        session.add(row)
        session.commit()
        return True


def list_keys(db: Database) -> list[ApiKey]:
    with db.session() as session:
        return list(session.exec(select(ApiKey).order_by(ApiKey.id)))  # type: ignore[arg-type]


class KeyRing:
    """The set of valid key hashes, kept in memory."""

    def __init__(
        self, db: Database, *, admin_key: str | None = None, required: bool = True, refresh_s: float = 5.0
    ) -> None:
        self.db = db
        self.required = required
        """Client routes need a gateway key (``auth.required``); admin routes always need the admin credential."""
        self._admin_hash = hash_key(admin_key) if admin_key else None
        self._keys: dict[str, Caller] = {}
        self._misses: dict[str, float] = {}
        self.refresh_s = refresh_s
        self._inflight: dict[str, asyncio.Future[Caller | None]] = {}
        self._lookup_budget = MISS_LOOKUPS_PER_S
        self._budget_at = time.monotonic()
        self.lookups = 0
        """Database lookups made for keys missing from the ring (for tests and debugging)."""
        self._task: asyncio.Task[None] | None = None

    def load(self) -> None:
        with self.db.session() as session:
            rows = session.exec(select(ApiKey).where(ApiKey.revoked_at == None)).all()  # noqa: E711
        self._keys = {row.key_hash: Caller(row.id, row.admin) for row in rows}
        self._misses.clear()

    def holds_admin(self, key_id: int) -> bool:
        """Whether key ``key_id`` is a live admin key as of the last refresh (a console session
        opened with a key ends when the key is revoked)."""
        return any(caller.key_id == key_id and caller.admin for caller in self._keys.values())

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
            await asyncio.to_thread(self._load_quietly)

    def _load_quietly(self) -> None:
        # A database outage keeps the last known keys working (the gateway keeps serving).
        try:
            self.load()
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
        return Caller(row.id, row.admin)


def require_admin(caller: Caller) -> None:
    if not caller.admin:
        raise PermissionDenied("This endpoint needs the admin credential.")
