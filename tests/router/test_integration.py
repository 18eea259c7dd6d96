"""Teacher + gateway + embedded student, all real servers on loopback: a task moves through
shadow → canary → serving on measured agreement, never with a student that disagrees, and back
to the teacher when its student fails, without a client request failing."""

from __future__ import annotations

import copy
import math
import threading
from collections import defaultdict
from typing import Any

import httpx
import openai

from gateway.store.models import Stage
from tests.router.conftest import TASK, Answer, Stack, StackFactory, StudentModel
from tests.servers import wait_until
from trainer.publish import StudentPublisher


def transitions(s: Stack) -> list[dict[str, Any]]:
    """The task's transitions, oldest first."""
    return list(reversed(s.task()["transitions"]))


def metric(s: Stack, name: str) -> float:
    """A sample of the gateway's ``/metrics`` for the task (0 when absent)."""
    text = httpx.get(s.url + "/metrics").text
    prefix = f'{name}{{task="{TASK}"}} '
    return next((float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


class Load:
    """Requests from ``clients`` threads, each with its own SDK client, every other one streamed
    (``streams``), until ``stop``; an exception is kept as a failed answer (status 0)."""

    def __init__(self, s: Stack, clients: int, *, streams: bool = True) -> None:
        self.s = s
        self.streams = streams
        self.answers: list[Answer] = []
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]
        for thread in self.threads:
            thread.start()

    def _run(self, i: int) -> None:
        client = openai.OpenAI(base_url=self.s.url + "/v1", api_key=self.s.key, max_retries=0)
        n = i
        while not self.done.is_set():
            stream = self.streams and n % 2 == 0
            try:
                self.answers.append(self.s.ask(stream=stream, client=client))
            except Exception as exc:  # a failed request is what the test looks for
                self.answers.append(Answer(0, repr(exc), "", "", stream=stream, complete=False))
            n += 1
        client.close()

    def served_by(self, target: str) -> int:
        return sum(a.target == target for a in self.answers)

    def stop(self) -> list[Answer]:
        self.done.set()
        for thread in self.threads:
            thread.join(60)
        return self.answers


def test_an_agreeing_student_walks_from_shadow_through_canary_to_serving(
    stack: StackFactory, agreeing_student: StudentModel
) -> None:
    s = stack(promote={"min_samples": 100}, audit={"rate": 0.5})
    adapter = s.install(agreeing_student)
    student = f"student:{adapter}"
    routed: dict[tuple[str, int], list[str]] = defaultdict(list)
    answers: list[Answer] = []
    for n in range(3000):
        before = s.state()
        answer = s.ask(stream=n % 4 == 0)
        answers.append(answer)
        if s.state() == before:  # routed on that state: no transition happened meanwhile
            routed[before].append(answer.target)
        if before[0] == "serving" and len(routed[before]) >= 30:
            break

    assert all(a.status == 200 and a.complete for a in answers)
    assert all(a.content == a.label for a in answers if a.target == "teacher")
    served = [a for a in answers if a.target == student]
    assert sum(a.content == a.label for a in served) >= 0.95 * len(served)
    # Each stage routes as the policy says: canary steps [0.25, 0.5, 1.0].
    assert set(routed[("shadow", 0)]) == {"teacher"}
    for step, share in ((0, 0.25), (1, 0.5)):
        targets = routed[("canary", step)]
        assert len(targets) >= 90 and set(targets) == {"teacher", student}
        measured = targets.count(student) / len(targets)
        tolerance = 4 * math.sqrt(share * (1 - share) / len(targets))
        assert abs(measured - share) <= tolerance, f"step {step}: {measured:.3f} vs {share} ± {tolerance:.3f}"
    assert set(routed[("canary", 2)]) == {student}
    assert set(routed[("serving", 0)]) == {student}

    # Each move was the gate's, on at least min_samples pairs of its own stage or step.
    moves = transitions(s)
    assert [(m["from_stage"], m["to_stage"], m["forced"]) for m in moves] == [
        ("collecting", "shadow", True),
        ("shadow", "canary", False),
        ("canary", "canary", False),
        ("canary", "canary", False),
        ("canary", "serving", False),
    ]
    for move in moves[1:]:
        evidence = move["evidence"]
        assert evidence["n"] >= 100 and evidence["lower"] >= 0.8 and move["adapter"] == adapter
    assert [m["evidence"]["student_ratio"] for m in moves[1:]] == [0.25, 0.5, 1.0, 1.0]
    row = next(r for r in s.admin.get("/admin/tasks").json()["data"] if r["task"] == TASK)
    assert row["stage"] == "serving" and row["student_ratio"] == 1.0 and row["pass_rate"] >= 0.95
    assert metric(s, "distillgate_promotions_total") == 4
    assert metric(s, "distillgate_student_traffic_ratio") == 1.0


def test_a_disagreeing_student_never_leaves_shadow(
    stack: StackFactory, disagreeing_student: StudentModel
) -> None:
    s = stack()  # min_samples 20: a student that agreed would be promoted within 40 requests
    adapter = s.install(disagreeing_student)
    shadow = s.gw.shadow
    answers: list[Answer] = []
    for _ in range(10):  # in rounds that let the mirrors finish, so the evidence does not hang on
        # the machine's speed (a mirror that finds max_concurrency busy is dropped, never queued)
        answers += [s.ask(stream=n % 4 == 0) for n in range(20)]
        wait_until(lambda: shadow.in_flight() == 0, timeout_s=120)
    assert all(a.status == 200 and a.target == "teacher" and a.content == a.label for a in answers)
    # Evidence: at least three times min_samples of stored pairs (a mirror may also be dropped when
    # max_concurrency is busy, or fail at the student on a loaded machine; neither makes a pair).
    wait_until(lambda: s.task()["pairs"] >= 60, timeout_s=30)
    task = s.task()
    assert task["pairs"] >= 60  # three times min_samples of evidence, all of it failing
    assert task["stage"] == "shadow" and task["adapter"] == adapter
    assert task["pass_rate"] <= 0.05 and len(task["transitions"]) == 1  # only the test's own move
    pairs = s.admin.get(f"/admin/tasks/{TASK}/pairs", params={"limit": 5}).json()["data"]
    assert len(pairs) == 5
    for pair in pairs:
        assert pair["kind"] == "shadow" and pair["scorer"] == "exact" and pair["error"] is None
        teacher = pair["teacher_response"]["choices"][0]["message"]["content"]
        assert teacher in ("billing", "support", "sales", "spam")
        assert pair["student_response"]["choices"][0]["message"]["content"] != teacher
        assert pair["passed"] is False and pair["score"] == 0.0


def test_a_serving_student_that_starts_answering_wrong_is_rolled_back_by_its_audits(
    stack: StackFactory, agreeing_student: StudentModel, disagreeing_student: StudentModel
) -> None:
    s = stack()  # audits every student answer; roll back below 0.8 (upper bound)
    adapter = s.install(agreeing_student, Stage.serving)
    before = [s.ask() for _ in range(15)]
    assert {a.target for a in before} == {f"student:{adapter}"}
    # The student server is redeployed with the wrong weights under the same name.
    loaded = httpx.post(
        s.student_url + "/v1/load_lora_adapter",
        json={"lora_name": adapter, "lora_path": str(disagreeing_student.path), "load_inplace": True},
    )
    assert loaded.status_code == 200
    answers: list[Answer] = []
    while s.state()[0] == "serving" and len(answers) < 300:
        answers.append(s.ask(stream=len(answers) % 3 == 0))
    s.wait_for("rolled_back")
    assert all(a.status == 200 and a.complete for a in answers)
    after = [s.ask(stream=n % 2 == 0) for n in range(10)]
    assert all(a.target == "teacher" and a.content == a.label for a in after)
    last = transitions(s)[-1]
    assert (last["from_stage"], last["to_stage"], last["forced"]) == ("serving", "rolled_back", False)
    assert "audit pass rate" in last["reason"] and last["evidence"]["upper"] < 0.8
    assert metric(s, "distillgate_rollbacks_total") == 1


def test_a_serving_student_that_starts_failing_is_rolled_back_and_no_request_fails(
    stack: StackFactory, agreeing_student: StudentModel
) -> None:
    s = stack()  # error_burst 3
    adapter = s.install(agreeing_student, Stage.serving)
    assert s.ask().target == f"student:{adapter}"
    with StudentPublisher(s.student_url) as publisher:  # the student server loses the adapter
        assert publisher.unpublish(adapter)
    answers = [s.ask(stream=n % 2 == 0) for n in range(3)]
    assert all(a.status == 200 and a.complete and a.content == a.label for a in answers)
    assert all(a.target == "teacher" for a in answers)  # each answered by the teacher instead
    s.wait_for("rolled_back", timeout_s=10)
    last = transitions(s)[-1]
    assert (last["from_stage"], last["to_stage"]) == ("serving", "rolled_back")
    assert last["reason"] == "3 consecutive student errors (burst limit 3)"
    assert last["evidence"]["consecutive_errors"] == 3


def test_a_stream_the_student_refuses_in_its_first_event_is_answered_by_the_teacher(
    stack: StackFactory, disagreeing_student: StudentModel
) -> None:
    """The gateway's prompt-length estimate let the request through; the student (a 512-token
    model) finds prompt + max_tokens too long only once its stream has begun."""
    s = stack()
    adapter = s.install(disagreeing_student, Stage.serving)
    messages, label = s.email()
    for stream in (False, True):
        raw = s.client.chat.completions.with_raw_response.create(
            model="teacher-large",
            messages=messages,  # type: ignore[arg-type]
            metadata={"task": TASK},
            max_tokens=600,
            stream=stream,
        )
        assert raw.status_code == 200 and raw.headers["x-distillgate-target"] == "teacher"
        parsed = raw.parse()
        if isinstance(parsed, openai.Stream):
            text = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
        else:
            text = parsed.choices[0].message.content or ""
        assert text == label
    assert s.ask().target == f"student:{adapter}"  # it still serves what fits


def test_killing_the_student_while_it_serves_all_traffic_loses_no_request(
    stack: StackFactory, agreeing_student: StudentModel
) -> None:
    """The student server shuts down under load (as on SIGTERM: answers in flight finish, its port
    closes, the gateway's pooled connections to it drop); its errors roll the task back."""
    s = stack(audit={"rate": 0.1})
    adapter = s.install(agreeing_student, Stage.serving)
    load = Load(s, clients=4)
    wait_until(lambda: load.served_by(f"student:{adapter}") >= 40, timeout_s=30)
    s.student_server.stop()
    s.wait_for("rolled_back", timeout_s=20)
    wait_until(lambda: load.served_by("teacher") >= 40, timeout_s=30)
    answers = load.stop()
    assert [a for a in answers if a.status != 200 or not a.complete] == []
    for target in ("teacher", f"student:{adapter}"):  # both kinds of request, from both
        assert {a.stream for a in answers if a.target == target} == {True, False}
    assert all(a.content == a.label for a in answers if a.target == "teacher")
    assert transitions(s)[-1]["to_stage"] == "rolled_back"


def test_cutting_the_network_to_the_student_mid_request_loses_no_request(
    stack: StackFactory, agreeing_student: StudentModel
) -> None:
    """A hard failure (connections reset mid-answer, new ones refused), for answers that are
    not streamed: a stream the student already started cannot be handed to the teacher."""
    s = stack(student_proxy=True, audit={"rate": 0.1})
    adapter = s.install(agreeing_student, Stage.serving)
    assert s.student_proxy is not None
    load = Load(s, clients=4, streams=False)
    wait_until(lambda: load.served_by(f"student:{adapter}") >= 40, timeout_s=30)
    s.student_proxy.cut()
    s.wait_for("rolled_back", timeout_s=20)
    wait_until(lambda: load.served_by("teacher") >= 20, timeout_s=30)
    answers = load.stop()
    assert [a for a in answers if a.status != 200] == []
    assert all(a.content == a.label for a in answers if a.target == "teacher")


def test_an_invalid_policy_edit_is_refused_naming_the_bad_key_and_the_old_policy_keeps_serving(
    stack: StackFactory, agreeing_student: StudentModel
) -> None:
    s = stack(policy_file=True)
    adapter = s.install(agreeing_student, Stage.serving)
    first = s.policy()
    assert first["version"] == 1 and first["last_error"] is None and first["file"] == str(s.policy_path)

    bad = copy.deepcopy(s.policy_data)
    bad["tasks"] = {TASK: {"distil": False}}  # a typo
    s.write_policy(bad)
    refused = wait_until(lambda: s.policy() if s.policy()["last_error"] else None, timeout_s=10)
    assert f"tasks.{TASK}.distil: unknown key" in refused["last_error"]
    assert refused["version"] == 1
    answers = [s.ask(stream=n % 2 == 0) for n in range(10)]  # still routed by the old policy
    assert all(a.status == 200 and a.target == f"student:{adapter}" for a in answers)

    good = copy.deepcopy(s.policy_data)
    good["tasks"] = {TASK: {"distill": False}}  # keep this task on the teacher for good
    s.write_policy(good)
    applied = wait_until(lambda: s.policy() if s.policy()["version"] == 2 else None, timeout_s=10)
    assert applied["last_error"] is None
    assert next(t for t in applied["policy"]["tasks"] if t["task"] == TASK)["distill"] is False
    answers = [s.ask(stream=n % 2 == 0) for n in range(10)]
    assert all(a.status == 200 and a.target == "teacher" and a.content == a.label for a in answers)
