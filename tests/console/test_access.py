"""Who may see the console and post its forms: the admin credential, through a login session
(HttpOnly, SameSite=Strict, signed) or the key itself; every page redirects to the login form
without it, every action answers 401, and a form posted without its CSRF token is refused."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from gateway.keys import create_key, revoke_key
from gateway.store.models import Stage, Task
from tests.conftest import ADMIN_KEY, RunningGateway

TASK = "classify"
PAGES = [
    "/console",
    "/console/tasks",
    f"/console/tasks/{TASK}",
    f"/console/tasks/{TASK}/pairs/1",
    f"/console/tasks/{TASK}/policy",
    "/console/records",
    "/console/records/some-record",
]
ACTIONS = [
    (f"/console/tasks/{TASK}/act", {"action": "pause"}),
    (f"/console/tasks/{TASK}/act", {"action": "transition", "to": "collecting", "reason": "x"}),
    (f"/console/tasks/{TASK}/policy", {"section": "distill: false"}),
    ("/console/logout", {}),
]


@pytest.fixture
def running(gateway: RunningGateway) -> RunningGateway:
    with gateway.db().session() as session:
        session.add(Task(key=TASK, stage=Stage.collecting))
        session.commit()
    gateway.gateway.tasks.load()
    return gateway


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]*)"', html)
    assert found, html
    return found.group(1)


def log_in(url: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=30)
    form = client.get("/console/login")
    answer = client.post(
        "/console/login", data={"csrf": _csrf(form.text), "key": ADMIN_KEY, "next": "/console/tasks"}
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/console/tasks"
    return client


@pytest.fixture
def browser_session(running: RunningGateway) -> Iterator[httpx.Client]:
    client = log_in(running.url)
    yield client
    client.close()


def stage(g: RunningGateway) -> Stage:
    with g.db().session() as session:
        task = session.get(Task, TASK)
        assert task is not None
        return task.stage


def test_every_page_redirects_to_the_login_form_without_the_credential(running: RunningGateway) -> None:
    with httpx.Client(base_url=running.url) as client:
        for page in PAGES:
            answer = client.get(page)
            assert answer.status_code == 303, page
            assert answer.headers["location"].startswith("/console/login?next=%2Fconsole"), page
        forged = client.get("/console/tasks", cookies={"dg_console": "admin.9999999999.abc.forged"})
        assert forged.status_code == 303


def test_every_action_answers_401_without_the_credential(running: RunningGateway) -> None:
    with httpx.Client(base_url=running.url) as client:
        for path, form in ACTIONS:
            answer = client.post(path, data=form)
            assert answer.status_code == 401, path
            error = answer.json()["error"]
            assert error["code"] == "missing_session" and set(error) == {"message", "type", "param", "code"}
    assert stage(running) is Stage.collecting


def test_a_client_key_is_not_the_admin_credential(running: RunningGateway) -> None:
    with httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {running.key}"}) as client:
        assert client.get("/console/tasks").status_code == 403
        assert client.post(f"/console/tasks/{TASK}/act", data={"action": "pause"}).status_code == 403
    with httpx.Client(base_url=running.url) as client:
        form = client.get("/console/login")
        answer = client.post("/console/login", data={"csrf": _csrf(form.text), "key": running.key})
        assert answer.status_code == 401 and "not the admin credential" in answer.text
        assert running.key not in answer.text and "dg_console=" not in answer.headers.get("set-cookie", "")


def test_login_sets_an_httponly_strict_signed_session_and_never_echoes_the_key(
    running: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    with httpx.Client(base_url=running.url) as client:
        form = client.get("/console/login?next=/console/records")
        answer = client.post(
            "/console/login", data={"csrf": _csrf(form.text), "key": ADMIN_KEY, "next": "/console/records"}
        )
        assert answer.status_code == 303 and answer.headers["location"] == "/console/records"
        cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("dg_console="))
        attributes = {part.strip().lower() for part in cookie.split(";")}
        assert {"httponly", "samesite=strict", "path=/console"} <= attributes
        assert "secure" not in attributes  # plain HTTP here; behind TLS it is Secure (below)
        assert ADMIN_KEY not in cookie
        page = client.get("/console/tasks")
        assert page.status_code == 200 and TASK in page.text
        assert ADMIN_KEY not in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
    assert ADMIN_KEY not in caplog.text


def test_the_session_cookie_is_secure_behind_tls(running: RunningGateway) -> None:
    with httpx.Client(base_url=running.url, headers={"X-Forwarded-Proto": "https"}) as client:
        form = client.get("/console/login")
        assert "secure" in form.headers["set-cookie"].lower()
        token = _csrf(form.text)  # httpx keeps Secure cookies off plain HTTP: send it by hand
        answer = client.post(
            "/console/login",
            data={"csrf": token, "key": ADMIN_KEY},
            headers={"Cookie": f"dg_console_login={token}"},
        )
        cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("dg_console="))
        assert "secure" in {part.strip().lower() for part in cookie.split(";")}


def test_a_login_post_without_its_csrf_token_is_refused(running: RunningGateway) -> None:
    with httpx.Client(base_url=running.url) as client:
        client.get("/console/login")
        answer = client.post("/console/login", data={"key": ADMIN_KEY})
        assert answer.status_code == 403 and "dg_console=" not in answer.headers.get("set-cookie", "")


def test_a_forged_form_post_without_the_csrf_token_is_refused(
    running: RunningGateway, browser_session: httpx.Client
) -> None:
    for path, form in ACTIONS:
        refused = browser_session.post(path, data=form)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "invalid_csrf_token", path
        assert browser_session.post(path, data={**form, "csrf": "forged"}).status_code == 403, path
    assert stage(running) is Stage.collecting
    assert browser_session.get("/console/tasks").status_code == 200  # still logged in


def test_a_form_with_the_session_csrf_token_acts(
    running: RunningGateway, browser_session: httpx.Client
) -> None:
    page = browser_session.get(f"/console/tasks/{TASK}")
    answer = browser_session.post(
        f"/console/tasks/{TASK}/act", data={"csrf": _csrf(page.text), "action": "pause", "reason": "by hand"}
    )
    assert answer.status_code == 303, answer.text
    assert stage(running) is Stage.paused
    shown = browser_session.get(answer.headers["location"])
    assert "Paused" in shown.text and "forced through the console: by hand" in shown.text


def test_another_sessions_token_is_refused(running: RunningGateway, browser_session: httpx.Client) -> None:
    other = log_in(running.url)
    token = _csrf(other.get("/console/tasks").text)
    other.close()
    answer = browser_session.post(f"/console/tasks/{TASK}/act", data={"csrf": token, "action": "pause"})
    assert answer.status_code == 403 and stage(running) is Stage.collecting


def test_the_admin_key_as_bearer_opens_pages_and_acts_without_a_form_token(running: RunningGateway) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=running.url, headers=headers) as client:
        assert client.get("/console/tasks").status_code == 200
        answer = client.post(f"/console/tasks/{TASK}/act", data={"action": "pause"})
        assert answer.status_code == 303
    assert stage(running) is Stage.paused


def test_an_illegal_move_is_shown_on_the_page_not_a_500(running: RunningGateway) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=running.url, headers=headers) as client:
        answer = client.post(f"/console/tasks/{TASK}/act", data={"action": "rollback"})
        assert answer.status_code == 409 and "no student to roll back" in answer.text
        missing = client.get("/console/tasks/nope")
        assert missing.status_code == 404 and "No task" in missing.text


def test_a_session_opened_with_an_admin_key_ends_when_the_key_is_revoked(running: RunningGateway) -> None:
    row, secret = create_key(running.db(), "oncall", admin=True)
    running.gateway.keys.load()
    with httpx.Client(base_url=running.url) as client:
        form = client.get("/console/login")
        answer = client.post("/console/login", data={"csrf": _csrf(form.text), "key": secret})
        assert answer.status_code == 303
        assert client.get("/console/tasks").status_code == 200
        assert revoke_key(running.db(), row.id or 0)
        running.gateway.keys.load()
        assert client.get("/console/tasks").status_code == 303
        assert client.post(f"/console/tasks/{TASK}/act", data={"action": "pause"}).status_code == 401


def test_logging_out_ends_the_session(browser_session: httpx.Client) -> None:
    token = _csrf(browser_session.get("/console/tasks").text)
    answer = browser_session.post("/console/logout", data={"csrf": token})
    assert answer.status_code == 303
    assert browser_session.get("/console/tasks").status_code == 303
