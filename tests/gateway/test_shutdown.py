"""Graceful shutdown of ``distillgate serve``: on SIGTERM it stops accepting, finishes in-flight
streams, stores their records and exits 0 (what Kubernetes and ``docker compose stop`` send)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from sqlmodel import select

from demo.teacher import ScriptedTeacher, create_teacher_app
from gateway.store.db import Database
from gateway.store.models import Record
from tests.conftest import TEACHER_KEY
from tests.servers import free_port, serve, wait_until

WORDS = 20
"""Words in the teacher's answer ("You said: " + the question): one stream chunk each."""
CHUNK_DELAY_S = 0.1  # the teacher streams one word every 0.1 s: about 2 s for the whole answer
GRACE_S = 10


@dataclass
class Served:
    url: str
    proc: subprocess.Popen[bytes]
    database_url: str
    log: Path


def _config(tmp_path: Path, teacher_url: str, port: int, **extra: object) -> Path:
    (tmp_path / "policy.yaml").write_text(
        yaml.safe_dump(
            {
                "teacher": {
                    "base_url": teacher_url + "/v1",
                    "api_key_env": "TEACHER_API_KEY",
                    "model": "teacher-large",
                },
                "prices": {"teacher-large": {"input": 2.5, "output": 10.0}},
            }
        )
    )
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "host": "127.0.0.1",
                "port": port,
                "database_url": f"sqlite:///{tmp_path / 'gw.db'}",
                "policy_file": "policy.yaml",
                "run_scheduler": False,
                "shutdown_grace_s": GRACE_S,
                "auth": {"required": False},
                "recorder": {"spool_dir": str(tmp_path / "spool")},
                **extra,
            }
        )
    )
    return config


@pytest.fixture
def teacher_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("TEACHER_API_KEY", TEACHER_KEY)
    state = ScriptedTeacher(api_key=TEACHER_KEY, chunk_delay_s=CHUNK_DELAY_S)
    with serve(create_teacher_app(state)) as server:
        yield server.url


def start_serve(tmp_path: Path, teacher_url: str, *args: str, **settings: object) -> Served:
    port = free_port()
    config = _config(tmp_path, teacher_url, port, **settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLGATE_")}
    env["TEACHER_API_KEY"] = TEACHER_KEY
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log = tmp_path / "serve.log"
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "distillgate"), "serve", "--config", str(config), *args],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    served = Served(f"http://127.0.0.1:{port}", proc, f"sqlite:///{tmp_path / 'gw.db'}", log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"distillgate serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            return httpx.get(served.url + "/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 40, 0.1)
    except BaseException:
        stop(proc)
        raise
    return served


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def refused(url: str) -> bool:
    try:
        httpx.get(url + "/healthz", timeout=1)
    except httpx.ConnectError:
        return True
    except (httpx.ReadError, httpx.RemoteProtocolError):
        # Connected in the instant the listener closed: the kernel resets what sat in its accept
        # queue, which is a refusal too (the request never reached the application).
        return True
    return False


def long_request(tag: str) -> dict[str, Any]:
    question = " ".join([tag, *(f"w{i}" for i in range(WORDS - 3))])  # "You said:" is two more words
    return {"model": "teacher-large", "messages": [{"role": "user", "content": question}], "stream": True}


def test_sigterm_finishes_the_stream_stores_its_record_and_exits_0(teacher_url: str, tmp_path: Path) -> None:
    served = start_serve(tmp_path, teacher_url)
    try:
        events: list[bytes] = []
        body = long_request("drain")
        with (
            httpx.Client(timeout=30) as client,
            client.stream("POST", served.url + "/v1/chat/completions", json=body) as r,
        ):
            assert r.status_code == 200
            request_id = r.headers["x-distillgate-request-id"]
            lines = r.iter_lines()
            for line in lines:  # the first content chunks arrive ...
                if line:
                    events.append(line.encode())
                if len(events) >= 3:
                    break
            sent_at = time.monotonic()
            served.proc.send_signal(signal.SIGTERM)  # ... then the orchestrator stops the pod
            # New connections are refused while the stream is still being served.
            wait_until(lambda: refused(served.url), 3, 0.05)
            refused_at = time.monotonic()
            for line in lines:
                if line:
                    events.append(line.encode())
        stream_done = time.monotonic()
        assert stream_done - refused_at > 0.5  # refused while the stream still had a while to go
        assert events[-1] == b"data: [DONE]"
        chunks = [orjson.loads(e[len(b"data: ") :]) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        assert text == "You said: " + body["messages"][0]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert stream_done - sent_at > 1.0  # the stream really was in flight when SIGTERM came
        rc = served.proc.wait(GRACE_S + 5)
        assert time.monotonic() - sent_at < GRACE_S
        log = served.log.read_text()
        assert rc == 0, log
        assert "Traceback" not in log
    finally:
        stop(served.proc)
    db = Database(served.database_url)
    try:
        with db.session() as session:
            rows = session.exec(select(Record)).all()
    finally:
        db.dispose()
    assert [(r.id, r.status, r.stream, r.target) for r in rows] == [(request_id, 200, True, "teacher")]
    record = rows[0]
    assert record.response is not None
    assert record.response["choices"][0]["message"]["content"] == text
    assert record.finish_reason == "stop"
    assert record.completion_tokens == WORDS and record.cost_usd > 0


def test_sigterm_with_no_traffic_exits_0_at_once(teacher_url: str, tmp_path: Path) -> None:
    served = start_serve(tmp_path, teacher_url)
    try:
        started = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(GRACE_S) == 0, served.log.read_text()
        assert time.monotonic() - started < 5
    finally:
        stop(served.proc)


def test_sigterm_to_several_workers_drains_each_and_exits_0(teacher_url: str, tmp_path: Path) -> None:
    """With ``--workers 2`` the supervisor forwards SIGTERM; every worker finishes its streams."""
    served = start_serve(tmp_path, teacher_url, "--workers", "2")
    try:
        results: dict[int, list[bytes]] = {}

        def stream(i: int) -> None:
            with (
                httpx.Client(timeout=30) as client,
                client.stream("POST", served.url + "/v1/chat/completions", json=long_request(f"s{i}")) as r,
            ):
                results[i] = [line.encode() for line in r.iter_lines() if line]

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.8)
        served.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(GRACE_S + 5)
        assert served.proc.wait(GRACE_S + 5) == 0, served.log.read_text()
    finally:
        stop(served.proc)
    assert sorted(results) == [0, 1, 2, 3]
    assert all(events[-1] == b"data: [DONE]" and len(events) == WORDS + 3 for events in results.values())
    db = Database(served.database_url)
    try:
        with db.session() as session:
            rows = session.exec(select(Record)).all()
    finally:
        db.dispose()
    assert sorted(r.status for r in rows) == [200] * 4


def test_a_stream_longer_than_the_grace_period_is_cut_recorded_and_the_process_exits_0(
    teacher_url: str, tmp_path: Path
) -> None:
    served = start_serve(tmp_path, teacher_url, shutdown_grace_s=1)
    try:
        events: list[bytes] = []
        with (
            httpx.Client(timeout=30) as client,
            client.stream("POST", served.url + "/v1/chat/completions", json=long_request("cut")) as r,
        ):
            request_id = r.headers["x-distillgate-request-id"]
            lines = r.iter_lines()
            for line in lines:
                if line:
                    events.append(line.encode())
                if len(events) >= 2:
                    break
            sent_at = time.monotonic()
            served.proc.send_signal(signal.SIGTERM)
            with pytest.raises(httpx.RemoteProtocolError):  # the server closed it mid-answer
                for line in lines:
                    if line:
                        events.append(line.encode())
        assert b"data: [DONE]" not in events and len(events) < WORDS
        assert served.proc.wait(10) == 0, served.log.read_text()
        assert time.monotonic() - sent_at < 1 + 5
    finally:
        stop(served.proc)
    db = Database(served.database_url)
    try:
        with db.session() as session:
            rows = session.exec(select(Record)).all()
    finally:
        db.dispose()
    # Recorded as an incomplete exchange (never trained on), with what was relayed before the cut.
    assert [(r.id, r.status, r.finish_reason) for r in rows] == [(request_id, 499, None)]
    assert rows[0].response is not None and '"content":" said:"' in rows[0].response["raw"]


@pytest.mark.parametrize("workers", [1, 2])
def test_the_ops_port_serves_probes_and_metrics_beside_the_api_port(
    teacher_url: str, tmp_path: Path, workers: int
) -> None:
    ops = free_port()
    served = start_serve(tmp_path, teacher_url, ops_port=ops, workers=workers)
    try:
        ops_url = f"http://127.0.0.1:{ops}"
        assert httpx.get(ops_url + "/healthz").json() == {"status": "ok"}
        assert httpx.get(ops_url + "/readyz").status_code == 200
        reply = httpx.post(served.url + "/v1/chat/completions", json=long_request("ops"), timeout=30)
        assert reply.status_code == 200
        metrics = httpx.get(ops_url + "/metrics").text
        assert 'distillgate_requests_total{status="200",target="teacher",task="default"} 1.0' in metrics
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(30) == 0
        assert refused(ops_url) and refused(served.url)
    finally:
        stop(served.proc)
