"""Per-key controls through the real gateway and the real ``openai`` SDK: rate limits and budgets
answer 429 with ``Retry-After`` (and ``x-ratelimit-*`` as OpenAI sends them), a task outside a
key's allow-list 403, an expired key 401, and a revoked key is refused at once on the replica that
revoked it and within the key ring's refresh on another gateway process on the same database."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from sqlmodel import select

from demo.teacher import ScriptedTeacher
from gateway.store.models import ApiKey, Usage, utcnow
from tests.conftest import ADMIN_KEY, TEACHER_KEY, RunningGateway, make_policy, start_gateway
from tests.servers import ServerThread, free_port, fresh_postgres_database, wait_until

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def new_key(gateway_url: str, **settings: Any) -> dict[str, Any]:
    r = httpx.post(gateway_url + "/admin/keys", json={"name": "app", **settings}, headers=ADMIN, timeout=10)
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    assert created["key"].startswith("dg-") and "key_hash" not in created
    return created


def client(gateway: RunningGateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.v1, api_key=key, max_retries=0, timeout=30)


def ask(oa: openai.OpenAI, task: str = "t", text: str = "hello") -> Any:
    return oa.chat.completions.with_raw_response.create(
        model="teacher-large", messages=[{"role": "user", "content": text}], metadata={"task": task}
    )


def test_requests_per_minute_over_the_limit_get_429_with_retry_after(gateway: RunningGateway) -> None:
    key = new_key(gateway.url, rpm=3)
    oa = client(gateway, key["key"])
    remaining = []
    for _ in range(3):
        raw = ask(oa)
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    assert remaining == [2, 1, 0]
    with pytest.raises(openai.RateLimitError) as caught:
        ask(oa)
    response = caught.value.response
    assert response.status_code == 429
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    error = response.json()["error"]
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
    assert set(error) == {"message", "type", "param", "code"}
    # Another key is not affected, and the refused request was not recorded.
    other = new_key(gateway.url)
    assert ask(client(gateway, other["key"])).http_response.status_code == 200
    assert (
        'distillgate_limited_requests_total{reason="requests"} 1.0'
        in httpx.get(gateway.url + "/metrics").text
    )
    gateway.flush()
    assert len(httpx.get(gateway.url + "/admin/records", headers=ADMIN).json()["data"]) == 4


def test_a_per_task_limit_holds_only_that_task(gateway: RunningGateway) -> None:
    key = new_key(gateway.url, task_limits={"busy": {"rpm": 1}})
    oa = client(gateway, key["key"])
    assert ask(oa, task="busy").http_response.status_code == 200
    with pytest.raises(openai.RateLimitError) as caught:
        ask(oa, task="busy")
    assert "busy" in caught.value.response.json()["error"]["message"]
    for _ in range(3):
        assert ask(oa, task="other").http_response.status_code == 200


def test_a_key_over_its_budget_gets_429_until_the_period_renews(gateway: RunningGateway) -> None:
    # One teacher answer costs far more than a millionth of a dollar at the test prices.
    key = new_key(gateway.url, budget_usd=0.000001, budget_period="day")
    oa = client(gateway, key["key"])
    assert ask(oa).http_response.status_code == 200
    gateway.flush()  # the ledger's cost reaches the limiter once the record is written
    with pytest.raises(openai.RateLimitError) as caught:
        ask(oa)
    response = caught.value.response
    error = response.json()["error"]
    assert error["type"] == "insufficient_quota" and error["code"] == "insufficient_quota"
    assert 1 <= int(response.headers["retry-after"]) <= 86400
    # The spend reached the shared usage table (what other replicas read).
    limits = gateway.gateway.limits
    wait_until(lambda: limits.syncs >= 2, 10)
    with gateway.db().session() as session:
        rows = session.exec(select(Usage).where(Usage.key_id == key["id"], Usage.window == "day")).all()
    assert rows and rows[0].spend_usd > 0.000001


def test_a_task_outside_the_allow_list_gets_403(gateway: RunningGateway) -> None:
    key = new_key(gateway.url, tasks=["allowed"])
    oa = client(gateway, key["key"])
    assert ask(oa, task="allowed").http_response.status_code == 200
    with pytest.raises(openai.PermissionDeniedError) as caught:
        ask(oa, task="secret-task")
    error = caught.value.response.json()["error"]
    assert caught.value.status_code == 403 and error["code"] == "task_not_allowed"


def test_an_expired_key_is_refused(gateway: RunningGateway) -> None:
    key = new_key(gateway.url, expires_at=(utcnow() + timedelta(seconds=1.5)).isoformat())
    oa = client(gateway, key["key"])
    assert ask(oa).http_response.status_code == 200
    wait_until(lambda: utcnow().timestamp() > key_expiry(key), 10)
    with pytest.raises(openai.AuthenticationError) as caught:
        ask(oa)
    assert "expired" in caught.value.response.json()["error"]["message"]


def key_expiry(key: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(key["expires_at"]).timestamp()


def test_keys_admin_api_shows_and_changes_limits(gateway: RunningGateway) -> None:
    key = new_key(gateway.url, rpm=100, budget_usd=5, tasks=["a"])
    url = f"{gateway.url}/admin/keys/{key['id']}"
    shown = httpx.get(url, headers=ADMIN).json()
    assert (shown["rpm"], shown["budget_usd"], shown["tasks"]) == (100, 5.0, ["a"])
    assert "key" not in shown and "key_hash" not in shown
    changed = httpx.patch(url, json={"rpm": 1, "tasks": None}, headers=ADMIN)
    assert changed.status_code == 200 and changed.json()["rpm"] == 1 and changed.json()["tasks"] is None
    oa = client(gateway, key["key"])
    assert ask(oa, task="anything").http_response.status_code == 200  # the change applied at once here
    with pytest.raises(openai.RateLimitError):
        ask(oa, task="anything")
    bad = httpx.patch(url, json={"rpm": 0}, headers=ADMIN)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rpm"
    unknown = httpx.patch(url, json={"colour": "red"}, headers=ADMIN)
    assert unknown.status_code == 400
    assert httpx.get(gateway.url + "/admin/keys/99999", headers=ADMIN).status_code == 404
    assert (
        httpx.get(gateway.url + "/admin/keys", headers={"authorization": f"Bearer {key['key']}"}).status_code
        == 403
    )
    listed = httpx.get(gateway.url + "/admin/keys", headers=ADMIN).json()["data"]
    assert key["id"] in [k["id"] for k in listed] and all("key" not in k for k in listed)
    # Only the key's SHA-256 is stored: the secret is in no column of its row.
    with gateway.db().session() as session:
        row = session.get(ApiKey, key["id"])
        assert row is not None
        assert row.key_hash == hashlib.sha256(key["key"].encode()).hexdigest()
        assert key["key"] not in json.dumps(row.model_dump(mode="json"))


# -- revocation across two gateway processes on one database ----------------------------------
def _second_gateway(
    tmp_path: Path, teacher_url: str, database_url: str
) -> tuple[subprocess.Popen[bytes], str]:
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
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "host": "127.0.0.1",
                "port": port,
                "database_url": database_url,
                "policy_file": "policy.yaml",
                "run_scheduler": False,
                "log_level": "WARNING",
                "auth": {"required": True, "admin_key": ADMIN_KEY},
                "recorder": {"spool_dir": str(tmp_path / "spool-b"), "flush_interval_s": 0.05},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLGATE_")}
    env |= {"TEACHER_API_KEY": TEACHER_KEY, "DISTILLGATE_SHED_LOOP_LAG_S": "1.0"}
    log = (tmp_path / "gateway-b.log").open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "distillgate"), "serve", "--config", str(config)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


def _status(url: str, key: str) -> int:
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "teacher-large", "messages": [{"role": "user", "content": "hi"}]},
        headers={"authorization": f"Bearer {key}"},
        timeout=30,
    )
    return r.status_code


@pytest.mark.postgres
def test_revocation_is_immediate_here_and_within_the_refresh_on_another_process(
    teacher: tuple[ScriptedTeacher, ServerThread], tmp_path: Path
) -> None:
    _, teacher_server = teacher
    with fresh_postgres_database() as database_url:
        server, parts, _ = start_gateway(database_url, make_policy(teacher_server.url), tmp_path)
        proc, other = _second_gateway(tmp_path, teacher_server.url, database_url)
        try:
            wait_until(lambda: proc.poll() is None and _health(other), 60, 0.2)
            key = new_key(server.url)
            assert _status(server.url, key["key"]) == 200
            assert _status(other, key["key"]) == 200  # both replicas now hold the key in memory
            revoked = httpx.post(f"{server.url}/admin/keys/{key['id']}/revoke", headers=ADMIN, timeout=10)
            assert revoked.status_code == 200 and revoked.json()["revoked_at"]
            at = time.monotonic()
            assert _status(server.url, key["key"]) == 401  # the replica that revoked: at once
            wait_until(lambda: _status(other, key["key"]) == 401, 15, 0.02)
            elapsed = time.monotonic() - at
            print(f"revoked key refused by the other process after {elapsed:.2f} s (key ring refresh 1 s)")
            # Stays refused (no stale copy comes back), and revoking twice is a 404.
            assert _status(other, key["key"]) == 401
            again = httpx.post(f"{server.url}/admin/keys/{key['id']}/revoke", headers=ADMIN, timeout=10)
            assert again.status_code == 404
        finally:
            proc.terminate()
            proc.wait(30)
            server.stop()
            del parts


def _health(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
