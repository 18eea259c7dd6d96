"""Engine, sessions and migrations for SQLite (default) and PostgreSQL.

The store is synchronous SQLAlchemy: the hot path never touches it (the recorder writes
from its own thread), and the admin/trainer paths are not latency-critical.
"""

from __future__ import annotations

import os
import socket
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import event, text
from sqlalchemy.engine import Engine, make_url
from sqlmodel import Session, SQLModel, create_engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
MIGRATION_LOCK_KEY = 0x64697374696C6C  # "distill": the advisory lock migrations run under


def normalise_url(url: str) -> str:
    """Accept ``postgres://`` and ``postgresql://`` and pick the psycopg 3 driver for them."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


class Database:
    """One engine per process, shared by the recorder, cache, admin API and trainer."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        connect_timeout_s: float = 5.0,
        statement_timeout_s: float | None = None,
    ) -> None:
        self.url = normalise_url(url)
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        # orjson for JSON columns: the stdlib encoder was a fifth of the recorder's time.
        kwargs: dict[str, Any] = {
            "pool_pre_ping": True,
            "json_serializer": _json_dumps,
            "json_deserializer": orjson.loads,
        }
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_size"] = pool_size
            kwargs["max_overflow"] = pool_size
            kwargs["connect_args"] = {"connect_timeout": max(1, round(connect_timeout_s))}
            if statement_timeout_s is not None:
                kwargs["connect_args"]["options"] = f"-c statement_timeout={int(statement_timeout_s * 1000)}"
        self.engine: Engine = create_engine(self.url, **kwargs)
        self._connections: weakref.WeakSet[Any] = weakref.WeakSet()
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            event.listen(self.engine, "connect", lambda conn, _record: self._connections.add(conn))

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session:
            yield session

    def ping(self) -> bool:
        """True when the database answers a trivial query."""
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    def migrate(self) -> None:
        """Bring the schema to the newest migration (``distillgate db upgrade``)."""
        from alembic import command

        if self.dialect != "postgresql":
            command.upgrade(alembic_config(self.url), "head")
            return
        # Several replicas or workers start at once: one migrates, the others wait, then find
        # nothing to do (a session-level advisory lock, released when this connection closes).
        with self.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            try:
                command.upgrade(alembic_config(self.url), "head")
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})

    def create_all(self) -> None:
        """Create tables straight from the models (scratch databases only; prefer ``migrate``)."""
        import gateway.store.models  # noqa: F401  (registers the tables)

        SQLModel.metadata.create_all(self.engine)

    def cut_connections(self) -> None:
        """Shut down the socket of every open connection, in use or not: a call blocked on a
        database that stopped answering (connection open, nothing sent back) fails at once.
        PostgreSQL only (SQLite has no socket)."""
        for connection in list(self._connections):
            try:
                sock = socket.socket(fileno=os.dup(connection.fileno()))
            except Exception:  # closed meanwhile
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            finally:
                sock.close()

    def dispose(self) -> None:
        """Close the pool, and cut what is still in use: no thread stays blocked on a stalled
        database after its process is done with it (it would hold the process's exit)."""
        self.engine.dispose()
        self.cut_connections()


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


def create_database(url: str, *, migrate: bool = True) -> Database:
    db = Database(url)
    if migrate:
        db.migrate()
    return db


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
