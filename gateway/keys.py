"""Gateway API keys as an operator manages them: created with their limits, listed, shown,
changed, revoked. The CLI (``distillgate keys``) and the admin API (``/admin/keys``) both call
these; the request path reads keys only from the ``KeyRing`` (``gateway.auth``).

Every change sets ``updated_at``: that is how every replica's key ring finds the changed keys
with one indexed query a second.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec
from sqlmodel import col, select

from gateway.auth import TaskLimits, generate_key, hash_key
from gateway.errors import InvalidRequest
from gateway.store.db import Database
from gateway.store.models import ApiKey, utcnow

Period = Literal["day", "week", "month"]
PERIODS = ("day", "week", "month")


class KeySettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What an operator sets on a key (``POST``/``PATCH /admin/keys``, ``distillgate keys``).
    ``None`` (or left out) is no limit; on a change, only the fields given are changed."""

    expires_at: datetime | None = None
    tasks: list[str] | None = None
    """The tasks the key may call; left out or null: any."""
    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None
    budget_period: Period = "month"
    task_limits: dict[str, TaskLimits] | None = None


class NewKey(KeySettings, kw_only=True, forbid_unknown_fields=True):
    name: str
    admin: bool = False


class KeyView(msgspec.Struct, kw_only=True):
    """A key as listings show it: its prefix, never its secret or hash."""

    id: int
    name: str
    prefix: str
    admin: bool
    created_at: datetime
    updated_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None
    tasks: list[str] | None
    rpm: int | None
    tpm: int | None
    budget_usd: float | None
    budget_period: str
    task_limits: dict[str, TaskLimits] | None

    @classmethod
    def of(cls, row: ApiKey) -> KeyView:
        assert row.id is not None
        return cls(
            id=row.id,
            name=row.name,
            prefix=row.prefix,
            admin=row.admin,
            created_at=row.created_at,
            updated_at=row.updated_at,
            revoked_at=row.revoked_at,
            expires_at=row.expires_at,
            tasks=row.tasks,
            rpm=row.rpm,
            tpm=row.tpm,
            budget_usd=row.budget_usd,
            budget_period=row.budget_period,
            task_limits=(
                {t: msgspec.convert(v, TaskLimits) for t, v in row.task_limits.items()}
                if row.task_limits
                else None
            ),
        )


class CreatedKey(KeyView, kw_only=True):
    key: str
    """The secret: shown once, never retrievable again."""


_MAX_COUNT = 2**31 - 1
"""rpm and tpm are 32-bit columns: anything larger is refused here, not by the database."""


def _task_name_ok(task: Any) -> bool:
    return isinstance(task, str) and 1 <= len(task) <= 200 and task.isascii() and task.isprintable()


def check_name(name: str) -> None:
    if not 1 <= len(name) <= 200 or not name.isprintable():
        raise InvalidRequest("'name' must be 1 to 200 printable characters.", param="name")


def _check(settings: KeySettings | dict[str, Any]) -> None:
    values = settings if isinstance(settings, dict) else msgspec.structs.asdict(settings)
    for name in ("rpm", "tpm"):
        if values.get(name) is not None and not 1 <= values[name] <= _MAX_COUNT:
            raise InvalidRequest(
                f"'{name}' must be from 1 to {_MAX_COUNT} (leave it out for no limit).", param=name
            )
    if values.get("budget_usd") is not None and not 0 <= values["budget_usd"] < float("inf"):
        raise InvalidRequest("'budget_usd' must be a finite amount, not negative.", param="budget_usd")
    expires = values.get("expires_at")
    if expires is not None and (expires.tzinfo is None or not 2000 <= expires.year <= 9000):
        raise InvalidRequest(
            "'expires_at' must be a date-time with its time zone, between the years 2000 and 9000.",
            param="expires_at",
        )
    for task in values.get("tasks") or []:
        if not _task_name_ok(task):
            raise InvalidRequest(
                "'tasks' holds task names of 1 to 200 printable ASCII characters.", param="tasks"
            )
    for task in values.get("task_limits") or {}:
        if not _task_name_ok(task):
            raise InvalidRequest(
                "'task_limits' is keyed by task names of 1 to 200 printable ASCII characters.",
                param="task_limits",
            )
    if values.get("budget_period") is not None and values["budget_period"] not in PERIODS:
        raise InvalidRequest("'budget_period' must be day, week or month.", param="budget_period")
    for task, limits in (values.get("task_limits") or {}).items():
        limits = limits if isinstance(limits, dict) else msgspec.structs.asdict(limits)
        for name in ("rpm", "tpm"):
            if limits.get(name) is not None and not 1 <= limits[name] <= _MAX_COUNT:
                raise InvalidRequest(
                    f"'task_limits.{task}.{name}' must be from 1 to {_MAX_COUNT}.", param="task_limits"
                )
        if limits.get("budget_usd") is not None and not 0 <= limits["budget_usd"] < float("inf"):
            raise InvalidRequest(
                f"'task_limits.{task}.budget_usd' must not be negative.", param="task_limits"
            )


def _columns(values: dict[str, Any]) -> dict[str, Any]:
    if values.get("task_limits") is not None:
        values["task_limits"] = {
            t: msgspec.to_builtins(v) if not isinstance(v, dict) else v
            for t, v in values["task_limits"].items()
        }
    return values


def create_key(
    db: Database, name: str, *, admin: bool = False, settings: KeySettings | None = None
) -> tuple[ApiKey, str]:
    """Store a new key and return it with its secret, which is never retrievable again."""
    settings = settings or KeySettings()
    check_name(name)
    _check(settings)
    secret = generate_key()
    row = ApiKey(
        name=name,
        prefix=secret[:10],
        key_hash=hash_key(secret),
        admin=admin,
        **_columns(msgspec.structs.asdict(settings)),
    )
    with db.session() as session:
        session.add(row)
        session.commit()
        session.refresh(row)
    return row, secret


def update_key(db: Database, key_id: int, changes: dict[str, Any]) -> ApiKey | None:
    """Change a key's settings (only the fields in ``changes``); None when there is no such key."""
    unknown = set(changes) - set(KeySettings.__struct_fields__)
    if unknown:
        raise InvalidRequest(f"Unknown key setting '{sorted(unknown)[0]}'.", param=sorted(unknown)[0])
    checked = msgspec.convert(changes, KeySettings)  # types, as the API would read them
    values = {name: getattr(checked, name) for name in changes}
    _check(values)
    with db.session() as session:
        row = session.get(ApiKey, key_id)
        if row is None:
            return None
        for name, value in _columns(values).items():
            setattr(row, name, value)
        row.updated_at = utcnow()
        session.add(row)
        session.commit()
        session.refresh(row)
        return row


def revoke_key(db: Database, key_id: int) -> bool:
    """Revoke a key; False when there is no active key with that id. The replica that revokes also
    calls ``KeyRing.evict``; the others drop it at their next refresh."""
    with db.session() as session:
        row = session.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = row.updated_at = utcnow()
        session.add(row)
        session.commit()
        return True


def list_keys(db: Database) -> list[ApiKey]:
    with db.session() as session:
        return list(session.exec(select(ApiKey).order_by(col(ApiKey.id))))


def get_key(db: Database, key_id: int) -> ApiKey | None:
    with db.session() as session:
        return session.get(ApiKey, key_id)
