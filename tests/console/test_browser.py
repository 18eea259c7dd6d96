"""The console in a real headless browser, on a real routing stack (scripted teacher, gateway
watching its policy file, embedded student with a fine-tuned tiny model): an engineer logs in,
watches the task walk shadow → canary → serving while traffic runs, opens a shadow pair, rolls
the task back and the gateway answers from the teacher, and an invalid policy edit is refused
with `distillgate policy check`'s error and the file untouched. Screenshots of each main page
are saved (tests/console/screenshots, or $DISTILLGATE_SCREENSHOTS)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import yaml

from gateway.console.policy_edit import edited
from tests.conftest import ADMIN_KEY
from tests.router.conftest import TASK, Stack, StackFactory, StudentModel
from tests.servers import wait_until

STAGE = '#stage[data-stage="{}"]'


class Traffic:
    """One SDK client asking for the task in a thread, while ``go`` is set; targets kept in order."""

    def __init__(self, s: Stack) -> None:
        self.s = s
        self.go = threading.Event()
        self.done = threading.Event()
        self.idle = threading.Event()
        self.targets: list[str] = []
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.is_set():
            if not self.go.wait(0.05):
                self.idle.set()
                continue
            self.idle.clear()
            try:
                answer = self.s.ask()
                self.targets.append(answer.target)
            except Exception as exc:  # a failed request is what the test looks for
                self.failures.append(repr(exc))

    def until(self, stage: str) -> None:
        """Run traffic until the gateway routes the task in ``stage``, then hold it."""
        self.go.set()
        wait_until(lambda: self.s.state()[0] == stage, timeout_s=60)
        self.go.clear()
        wait_until(self.idle.is_set, timeout_s=30)

    def stop(self) -> None:
        self.go.clear()
        self.done.set()
        self.thread.join(30)


def policy_check_error(candidate: dict[str, Any], tmp: Path) -> str:
    """What ``distillgate policy check`` says about the policy file as the edit would leave it."""
    path = tmp / "candidate.yaml"
    path.write_text(yaml.safe_dump(candidate, sort_keys=False))
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "policy", "check", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    return str(json.loads(out.stdout)["error"])


def test_an_engineer_watches_the_loop_and_acts_from_the_console(
    stack: StackFactory, agreeing_student: StudentModel, browser: Any, screenshots: Path, tmp_path: Path
) -> None:
    s = stack(policy_file=True)
    adapter = s.install(agreeing_student)
    traffic = Traffic(s)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []  # script errors, assets the CSP blocked, failed loads
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
    failed: list[tuple[int, str]] = []  # the refused policy edit (422) is the one expected
    page.on(
        "response",
        lambda r: failed.append((r.status, r.url.removeprefix(s.url))) if r.status >= 400 else None,
    )
    try:
        # Log in: any page leads to the form, the form back to the page.
        page.goto(s.url + "/console/tasks")
        assert "/console/login" in page.url
        page.fill('input[name="key"]', ADMIN_KEY)
        page.screenshot(path=str(screenshots / "login.png"))
        page.click('#login-form button[type="submit"]')
        page.wait_for_url("**/console/tasks")
        row = page.locator(f'#task-table tr[data-task="{TASK}"]')
        assert row.locator('[data-stage="shadow"]').count() == 1
        assert row.locator("td").nth(2).inner_text() == adapter
        assert ADMIN_KEY not in page.content()

        # The task page follows the loop live, without being reloaded.
        page.goto(s.url + f"/console/tasks/{TASK}")
        page.wait_for_selector(STAGE.format("shadow"))
        page.evaluate("window.notReloaded = true; document.body.dataset.refreshMs = '500'")  # faster polls
        traffic.until("canary")
        page.wait_for_selector(STAGE.format("canary"), timeout=30_000)
        assert page.locator("#gate-threshold").inner_text().startswith("0.8")
        assert page.locator("#transitions tbody tr").count() >= 2
        page.screenshot(path=str(screenshots / "task-canary.png"), full_page=True)

        # A shadow pair, side by side.
        page.locator("#pairs tbody tr", has=page.locator("td:nth-child(2)", has_text="shadow")).first.locator(
            "a.open-pair"
        ).click()
        page.wait_for_selector("#pair-diff")
        assert page.locator("#pair-scorer").inner_text() == "exact"
        assert page.locator("#pair-diff tbody tr").count() >= 1
        assert page.locator("#pair-request").inner_text().count(TASK) >= 1
        page.screenshot(path=str(screenshots / "shadow-pair.png"), full_page=True)
        page.go_back()
        page.wait_for_selector(STAGE.format("canary"))
        page.evaluate("window.notReloaded = true; document.body.dataset.refreshMs = '500'")

        traffic.until("serving")
        page.wait_for_selector(STAGE.format("serving"), timeout=30_000)
        assert page.evaluate("window.notReloaded") is True
        history = page.locator("#transitions tbody tr td:nth-child(3)").all_inner_texts()
        assert history[0] == "serving" and "canary" in history and "shadow" in history
        assert page.locator("#share").inner_text() == "100.0%"
        svg = page.locator("#plot-agreement svg polyline")
        assert svg.count() >= 1
        page.screenshot(path=str(screenshots / "task-serving.png"), full_page=True)
        assert s.ask().target == f"student:{adapter}"

        page.goto(s.url + "/console/tasks")
        assert page.locator(f'#task-table tr[data-task="{TASK}"] [data-stage="serving"]').count() == 1
        page.screenshot(path=str(screenshots / "tasks.png"), full_page=True)

        # Roll back from the page: the gateway answers from the teacher at once.
        page.goto(s.url + f"/console/tasks/{TASK}")
        page.fill('#move-form input[name="reason"]', "answers look off")
        page.click("#do-rollback")
        page.wait_for_selector(STAGE.format("rolled_back"))
        assert "Rolled back" in page.locator("#notice").inner_text()
        assert "answers look off" in page.locator("#reason").inner_text()
        answers = [s.ask() for _ in range(5)]
        assert [a.target for a in answers] == ["teacher"] * 5
        assert all(a.status == 200 and a.content == a.label for a in answers)

        # An invalid policy edit: the same error as `distillgate policy check`, the file untouched.
        before = s.policy_path.read_bytes()
        version = s.policy()["version"]
        page.click("#edit-policy")
        page.wait_for_selector("#policy-form")
        bad = "promote:\n  threshold: 1.5\n"
        page.fill("#section", bad)
        page.click("#save-policy")
        page.wait_for_selector("#policy-error")
        expected = policy_check_error(edited(yaml.safe_load(before), TASK, bad), tmp_path)
        assert page.locator("#policy-error").inner_text() == expected
        assert "tasks.classify-email.promote.threshold" in expected
        assert page.locator("#section").input_value() == bad
        assert s.policy_path.read_bytes() == before
        assert s.policy()["version"] == version and s.policy()["last_error"] is None
        page.screenshot(path=str(screenshots / "policy-refused.png"), full_page=True)

        # Records: searched by task and target, the full exchange on click.
        page.goto(s.url + f"/console/records?task={TASK}&target=teacher")
        rows = page.locator("#record-table tbody tr")
        assert rows.count() >= 5 and set(rows.locator("td:nth-child(3)").all_inner_texts()) == {"teacher"}
        page.screenshot(path=str(screenshots / "records.png"), full_page=True)
        rows.first.locator("a.open-record").click()
        page.wait_for_selector("#record-response")
        assert '"choices"' in page.locator("#record-response").inner_text()
        assert '"messages"' in page.locator("#record-request").inner_text()
        page.screenshot(path=str(screenshots / "record.png"), full_page=True)
    finally:
        traffic.stop()
        page.close()
    assert failed == [(422, f"/console/tasks/{TASK}/policy")]
    assert [p for p in problems if not p.startswith("Failed to load resource")] == []
    assert traffic.failures == []
    assert set(traffic.targets) <= {"teacher", f"student:{adapter}"}
