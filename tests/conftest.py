"""Shared fixtures: a scripted teacher and a gateway in front of it, on SQLite or PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from demo.teacher import ScriptedTeacher, create_teacher_app
from gateway.app import ServingParts, create_app
from gateway.keys import create_key
from gateway.settings import Settings
from gateway.store.db import Database
from router.policy import Policy, parse_policy
from tests.servers import ServerThread, fresh_postgres_database, serve, wait_until

# The gateways under test share this process with their clients, the stand-in servers and the
# trainers the tests run, so their event-loop lag measures this busy test process, not overload of
# the gateway. Lag shedding is tested on its own (tests/gateway/test_shedding.py sets its threshold);
# elsewhere it is kept out of the way (the environment is what a deployment would set too).
os.environ.setdefault("DISTILLGATE_SHED_LOOP_LAG_S", "1.0")

TEACHER_KEY = "sk-teacher-SECRET-0123456789abcdef"
ADMIN_KEY = "dg-admin-SECRET-fedcba9876543210"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Every store test runs on SQLite and on the real PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'distillgate.db'}"
    else:
        with fresh_postgres_database() as url:
            yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'distillgate.db'}"


@pytest.fixture
def teacher(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ScriptedTeacher, ServerThread]]:
    """The scripted stand-in teacher, requiring its own key (set in the environment, as in production)."""
    monkeypatch.setenv("TEACHER_API_KEY", TEACHER_KEY)
    state = ScriptedTeacher(api_key=TEACHER_KEY)
    with serve(create_teacher_app(state)) as server:
        yield state, server


def make_policy(teacher_url: str, **extra: Any) -> Policy:
    data: dict[str, Any] = {
        "teacher": {
            "base_url": teacher_url + "/v1",
            "api_key_env": "TEACHER_API_KEY",
            "model": "teacher-large",
        },
        "prices": {
            "teacher-large": {"input": 2.5, "cached_input": 1.25, "output": 10.0},
            "student": {"input": 0.05, "output": 0.1},
        },
    }
    data.update(extra)
    return parse_policy(data)


@dataclass
class RunningGateway:
    url: str
    server: ServerThread
    gateway: ServingParts
    """What the gateway process built (``app.state.parts``)."""
    key: str
    admin_key: str
    database_url: str

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def flush(self) -> None:
        # A stream's record is handed over after its last byte reached the client: wait for the
        # requests still finishing, then for the writer.
        wait_until(lambda: self.gateway.admission.in_flight == 0, 10)
        assert self.gateway.recorder.flush(30)

    def db(self) -> Database:
        return self.gateway.db


def start_gateway(
    database_url: str, policy: Policy, tmp_path: Path, **settings: Any
) -> tuple[ServerThread, ServingParts, str]:
    cfg = Settings(
        database_url=database_url,
        auth={"required": True, "admin_key": ADMIN_KEY},
        recorder={"spool_dir": tmp_path / "spool", "flush_interval_s": 0.05, "retry_interval_s": 0.3},
        run_scheduler=False,
        **settings,
    )
    app = create_app(cfg, policy=policy)
    server = ServerThread(app).start()
    gw: ServingParts = app.state.parts
    _, key = create_key(gw.db, "tests")
    return server, gw, key


@pytest.fixture
def gateway(
    teacher: tuple[ScriptedTeacher, ServerThread], database_url: str, tmp_path: Path
) -> Iterator[RunningGateway]:
    """A gateway with recording on, in front of the scripted teacher, on SQLite and on PostgreSQL."""
    _, teacher_server = teacher
    server, gw, key = start_gateway(database_url, make_policy(teacher_server.url), tmp_path)
    try:
        yield RunningGateway(server.url, server, gw, key, ADMIN_KEY, database_url)
    finally:
        server.stop()
