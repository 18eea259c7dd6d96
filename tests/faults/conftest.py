"""The faults suite's report: every fault test adds one row, the session prints the table.

Each row is ``fault | client outcome | records expected | records found``; the table is printed
at the end of the run and, when ``DISTILLGATE_FAULTS_REPORT`` names a file, written there as
Markdown (the closing note of issue 14 quotes it).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from demo.teacher import ScriptedTeacher
from gateway.app import ServingParts, create_app
from gateway.keys import create_key
from gateway.recorder import Recorder
from gateway.settings import Settings
from gateway.store.db import Database
from tests.conftest import ADMIN_KEY, RunningGateway, make_policy
from tests.faults.teacher import FaultyTeacher, gateway_before
from tests.servers import ServerThread, TcpProxy, fresh_postgres_database


@dataclass(slots=True)
class FaultRow:
    fault: str
    client_outcome: str
    expected: int
    found: int
    note: str = ""


@dataclass(slots=True)
class FaultTable:
    rows: list[FaultRow] = field(default_factory=list)

    def row(self, fault: str, client_outcome: str, expected: int, found: int, note: str = "") -> None:
        self.rows.append(FaultRow(fault, client_outcome, expected, found, note))

    def markdown(self) -> str:
        lines = [
            "| fault | client outcome | records expected | records found | note |",
            "|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(f"| {r.fault} | {r.client_outcome} | {r.expected} | {r.found} | {r.note} |")
        return "\n".join(lines) + "\n"


_TABLE = FaultTable()


@pytest.fixture
def fault_table() -> FaultTable:
    """Add a row with ``fault_table.row(fault, outcome, expected, found, note)``."""
    return _TABLE


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _TABLE.rows:
        return
    text = _TABLE.markdown()
    terminalreporter.section("faults: expected vs found records")
    terminalreporter.write(text)
    target = os.environ.get("DISTILLGATE_FAULTS_REPORT")
    if target:
        Path(target).write_text(text)


# -- fixtures of the recording faults (tests/faults/test_recording.py) ------------------------------
@dataclass
class RelayedPostgres:
    """A fresh PostgreSQL database and a relay in front of it that can be cut or stalled."""

    direct_url: str
    proxy: TcpProxy

    @property
    def url(self) -> str:
        return self.direct_url.replace(":5432/", f":{self.proxy.port}/")

    def cut(self) -> None:
        self.proxy.cut()

    def restore(self) -> None:
        """A cut relay listens again on the same port."""
        self.proxy.close()
        self.proxy = TcpProxy(5432, port=self.proxy.port).start()

    def records(self) -> int:
        db = Database(self.direct_url)
        try:
            with db.engine.connect() as conn:
                return int(conn.execute(text("SELECT count(*) FROM record")).scalar_one())
        finally:
            db.dispose()

    def ids(self) -> set[str]:
        db = Database(self.direct_url)
        try:
            with db.engine.connect() as conn:
                return {row[0] for row in conn.execute(text("SELECT id FROM record"))}
        finally:
            db.dispose()


@pytest.fixture
def relayed_postgres() -> Iterator[RelayedPostgres]:
    with fresh_postgres_database() as url:
        relayed = RelayedPostgres(url, TcpProxy(5432).start())
        try:
            yield relayed
        finally:
            relayed.proxy.close()


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def full_spool(tmp_path: Path) -> Iterator[Path]:
    """A spool directory on a 64 KiB tmpfs: a few dozen records fill it."""
    spool = tmp_path / "spool"
    spool.mkdir()
    done = _mount("-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(spool))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield spool
    finally:
        _mount("-l", "--make-private", str(spool))
        subprocess.run(["umount", "-l", str(spool)], check=False)


@dataclass
class ReadOnlySpool:
    path: Path

    def make_writable(self) -> None:
        done = _mount("-o", "remount,rw,bind", str(self.path))
        assert done.returncode == 0, done.stderr


@pytest.fixture
def read_only_spool(tmp_path: Path) -> Iterator[ReadOnlySpool]:
    """A spool directory bind-mounted read-only (EROFS), that the test can make writable again."""
    spool = tmp_path / "spool"
    spool.mkdir()
    for args in (("--bind", str(spool), str(spool)), ("-o", "remount,ro,bind", str(spool))):
        done = _mount(*args)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(spool)], check=False)
            pytest.skip(f"cannot bind-mount read-only here: {done.stderr.strip()}")
    try:
        yield ReadOnlySpool(spool)
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


@dataclass
class Gateway:
    url: str
    server: ServerThread
    parts: ServingParts
    key: str

    @property
    def recorder(self) -> Recorder:
        return self.parts.recorder

    def ready(self) -> httpx.Response:
        return httpx.get(self.url + "/readyz", timeout=10)


@pytest.fixture
def gateway_on(teacher: tuple[ScriptedTeacher, ServerThread]) -> Iterator[Callable[..., Gateway]]:
    """``gateway_on(database_url, spool_dir, **recorder_settings)``: a gateway in front of the
    scripted teacher, recording into ``database_url`` with its spool at ``spool_dir``."""
    _, teacher_server = teacher
    started: list[ServerThread] = []

    def start(database_url: str, spool_dir: Path, **recorder: Any) -> Gateway:
        cfg = Settings(
            database_url=database_url,
            auth={"required": True, "admin_key": ADMIN_KEY},
            recorder={"spool_dir": spool_dir, "flush_interval_s": 0.02, "retry_interval_s": 0.2, **recorder},
            run_scheduler=False,
        )
        app = create_app(cfg, policy=make_policy(teacher_server.url))
        server = ServerThread(app).start()
        started.append(server)
        parts: ServingParts = app.state.parts
        _, key = create_key(parts.db, "faults")
        parts.keys.load()  # known before the test takes the database away
        return Gateway(server.url, server, parts, key)

    try:
        yield start
    finally:
        for server in started:
            server.stop()


# -- fixtures of the teacher and request faults (test_upstream_faults.py, test_request_faults.py) ---
@pytest.fixture
def faulty_teacher() -> Iterator[FaultyTeacher]:
    with FaultyTeacher() as faulty:
        yield faulty


@pytest.fixture
def faulty_gateway(faulty_teacher: FaultyTeacher, tmp_path: Path) -> Iterator[Callable[..., RunningGateway]]:
    """``faulty_gateway(**settings)``: a recording gateway on a fresh PostgreSQL database in front
    of ``faulty_teacher`` (``settings`` as for ``gateway_before``), stopped after the test."""
    with ExitStack() as started:

        def start(**settings: Any) -> RunningGateway:
            url = started.enter_context(fresh_postgres_database())
            return started.enter_context(gateway_before(faulty_teacher, url, tmp_path, **settings))

        yield start
