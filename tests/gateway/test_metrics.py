"""``/metrics`` after known traffic: every counter, cost sum and histogram count is exactly what it should be.

Prices come from ``tests.conftest.make_policy`` (teacher-large: input 2.50, cached_input 1.25,
output 10.00; student: input 0.05, output 0.10, USD per million tokens). The scripted teacher
counts one token per word and reports half of each prompt as served from its prompt cache.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from demo.teacher import ScriptedTeacher, create_teacher_app
from gateway.app import ServingParts
from gateway.store.models import Stage, Task
from router.decide import StudentEnvelope
from tests.conftest import ADMIN_KEY, TEACHER_KEY, make_policy, start_gateway
from tests.servers import flush, free_port, serve, wait_until

Series = dict[tuple[str, ...], float]

TEACHER_PRICE = {"input": 2.5, "cached_input": 1.25, "output": 10.0}
STUDENT_PRICE = {"input": 0.05, "output": 0.1}
ADAPTER = "student-task@v1"


def usd(price: dict[str, float], prompt: int, completion: int, cached: int = 0) -> float:
    """The price list applied by hand (USD per million tokens), independent of gateway/cost.py."""
    cached_price = price.get("cached_input", price["input"])
    return ((prompt - cached) * price["input"] + cached * cached_price + completion * price["output"]) / 1e6


class Scrape:
    """One parsed ``/metrics`` page."""

    def __init__(self, text: str) -> None:
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples.setdefault(sample.name, []).append((sample.labels, sample.value))

    def __contains__(self, name: str) -> bool:
        return name in self.samples

    def series(self, name: str, *labels: str) -> Series:
        """Sample ``name`` keyed by the values of ``labels``, in that order."""
        out: Series = {}
        for sample_labels, value in self.samples.get(name, []):
            assert set(sample_labels) == set(labels), (name, sample_labels)
            out[tuple(sample_labels[k] for k in labels)] = value
        return out

    def counts(self, name: str, *labels: str) -> Series:
        """A histogram's observation counts; checks that its +Inf bucket agrees."""
        counts = self.series(name + "_count", *labels)
        buckets = self.series(name + "_bucket", *labels, "le")
        for key, count in counts.items():
            assert buckets[(*key, "+Inf")] == count, (name, key)
        return counts


def scrape(url: str) -> Scrape:
    return Scrape(httpx.get(url + "/metrics", timeout=10).text)


@dataclass
class Traffic:
    url: str
    gateway: ServingParts
    teacher: ScriptedTeacher


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traffic]:
    """A gateway in front of a teacher with provider prompt caching (half of each prompt cached)
    and a stand-in student (vLLM's place) serving the task ``student``; then known traffic.
    Built once: every test below reads the same scrape-only state."""
    tmp_path = tmp_path_factory.mktemp("metrics")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("TEACHER_API_KEY", TEACHER_KEY)
        yield from _traffic(f"sqlite:///{tmp_path / 'distillgate.db'}", tmp_path)


def _traffic(sqlite_url: str, tmp_path: Path) -> Iterator[Traffic]:
    teacher = ScriptedTeacher(api_key=TEACHER_KEY, cached_ratio=0.5)
    student = ScriptedTeacher(model="tiny-base")
    with (
        serve(create_teacher_app(teacher)) as teacher_server,
        serve(create_teacher_app(student)) as student_server,
    ):
        policy = make_policy(
            teacher_server.url,
            student={"base_url": student_server.url + "/v1", "base_model": "tiny-base"},
            defaults={"audit": {"rate": 0.0}},
        )
        server, gw, key = start_gateway(sqlite_url, policy, tmp_path, upstream={"backoff_s": 0.001})
        try:
            with gw.db.session() as session:
                session.add(
                    Task(
                        key="student",
                        stage=Stage.serving,
                        adapter=ADAPTER,
                        student_ratio=1.0,
                        features=StudentEnvelope().to_features(),
                    )
                )
                session.commit()
            wait_until(lambda: "student" in gw.tasks.task_states, 10)
            send_known_traffic(server.url, key)
            flush(server.url, ADMIN_KEY)  # tokens and dollars are counted as records are written
            # The recorder created the other tasks' rows; the gateway picks them up within a second.
            wait_until(lambda: {"cached", "streamed", "failing", "student"} <= set(gw.tasks.task_states), 10)
            yield Traffic(server.url, gw, teacher)
        finally:
            server.stop()


def send_known_traffic(url: str, key: str) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)

    def ask(task: str, text: str, **extra: Any) -> Any:
        return client.chat.completions.create(
            model="teacher-large",
            messages=[{"role": "user", "content": text}],
            metadata={"task": task},
            **extra,
        )

    # task "cached": a cache miss (teacher), then two hits, the second one streamed.
    assert ask("cached", "alpha beta", temperature=0).choices[0].message.content == "You said: alpha beta"
    assert ask("cached", "alpha beta", temperature=0).choices[0].message.content == "You said: alpha beta"
    replay = list(ask("cached", "alpha beta", temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in replay if c.choices) == "You said: alpha beta"
    # task "streamed": a non-deterministic stream (cache bypassed); the client asks for no usage.
    chunks = list(ask("streamed", "one two three", stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "You said: one two three"
    assert all(c.usage is None for c in chunks)
    # task "failing": a 400 passed through, and a 503 that stays 503 after the gateway's retries.
    with pytest.raises(openai.BadRequestError):
        ask("failing", "!error 400")
    with pytest.raises(openai.InternalServerError):
        ask("failing", "!error 503")
    # task "student": in serving, answered by the student.
    reply = client.chat.completions.with_raw_response.create(
        model="teacher-large",
        messages=[{"role": "user", "content": "hello student"}],
        metadata={"task": "student"},
    )
    assert reply.headers["x-distillgate-target"] == f"student:{ADAPTER}"


def test_requests_are_counted_by_task_target_and_status(traffic: Traffic) -> None:
    m = scrape(traffic.url)
    assert m.series("distillgate_requests_total", "task", "target", "status") == {
        ("cached", "teacher", "200"): 1,
        ("cached", "cache", "200"): 2,
        ("streamed", "teacher", "200"): 1,
        ("failing", "teacher", "400"): 1,
        ("failing", "teacher", "503"): 1,
        ("student", "student", "200"): 1,
    }
    assert traffic.teacher.stats.chat == 1 + 1 + 1 + 3  # the 503 was tried three times


def test_tokens_are_counted_by_kind_including_provider_cached_prompt_tokens(traffic: Traffic) -> None:
    m = scrape(traffic.url)
    # The teacher counts a word as a token: "alpha beta" → "You said: alpha beta".
    assert m.series("distillgate_tokens_total", "task", "target", "kind") == {
        ("cached", "teacher", "prompt"): 2,
        ("cached", "teacher", "completion"): 4,
        ("cached", "teacher", "cached"): 1,
        ("cached", "cache", "prompt"): 4,  # two hits replay the stored usage
        ("cached", "cache", "completion"): 8,
        ("cached", "cache", "cached"): 2,
        ("streamed", "teacher", "prompt"): 3,  # from the usage chunk the gateway asked for
        ("streamed", "teacher", "completion"): 5,
        ("streamed", "teacher", "cached"): 1,
        ("student", "student", "prompt"): 2,
        ("student", "student", "completion"): 4,
    }


def test_cost_prices_cached_prompt_tokens_and_savings_count_cache_and_student(traffic: Traffic) -> None:
    m = scrape(traffic.url)
    alpha = usd(TEACHER_PRICE, prompt=2, completion=4, cached=1)
    assert alpha == pytest.approx(43.75e-6, rel=1e-12)  # 1 x 2.50 + 1 x 1.25 + 4 x 10.00 per million
    streamed = usd(TEACHER_PRICE, prompt=3, completion=5, cached=1)
    student = usd(STUDENT_PRICE, prompt=2, completion=4)
    student_as_teacher = usd(TEACHER_PRICE, prompt=2, completion=4)
    cost = m.series("distillgate_cost_usd_total", "task", "target")
    assert set(cost) == {("cached", "teacher"), ("streamed", "teacher"), ("student", "student")}
    assert cost[("cached", "teacher")] == pytest.approx(alpha, rel=1e-12)
    assert cost[("streamed", "teacher")] == pytest.approx(streamed, rel=1e-12)
    assert cost[("student", "student")] == pytest.approx(student, rel=1e-12)
    savings = m.series("distillgate_savings_usd_total", "task")
    assert set(savings) == {("cached",), ("student",)}
    # A cache hit saves what the teacher would have charged; the student saves the difference.
    assert savings[("cached",)] == pytest.approx(2 * alpha, rel=1e-12)
    assert savings[("student",)] == pytest.approx(student_as_teacher - student, rel=1e-12)


def test_cache_lookups_are_counted_by_result(traffic: Traffic) -> None:
    assert scrape(traffic.url).series("distillgate_cache_requests_total", "task", "result") == {
        ("cached", "miss"): 1,
        ("cached", "hit"): 2,
        ("streamed", "bypass"): 1,
        ("failing", "bypass"): 2,
        ("student", "bypass"): 1,
    }


def test_upstream_errors_are_counted_once_per_request_by_kind(traffic: Traffic) -> None:
    assert scrape(traffic.url).series("distillgate_upstream_errors_total", "target", "kind") == {
        ("teacher", "http_400"): 1,
        ("teacher", "http_503"): 1,
    }


def test_latency_histograms_count_every_request_and_ttft_only_streams(traffic: Traffic) -> None:
    m = scrape(traffic.url)
    assert m.counts("distillgate_request_duration_seconds", "task", "target") == {
        ("cached", "teacher"): 1,
        ("cached", "cache"): 2,
        ("streamed", "teacher"): 1,
        ("failing", "teacher"): 2,
        ("student", "student"): 1,
    }
    assert m.counts("distillgate_time_to_first_token_seconds", "task", "target") == {
        ("cached", "cache"): 1,
        ("streamed", "teacher"): 1,
    }
    assert m.counts("distillgate_gateway_overhead_seconds") == {(): 7}
    durations = m.series("distillgate_request_duration_seconds_sum", "task", "target")
    ttft = m.series("distillgate_time_to_first_token_seconds_sum", "task", "target")
    assert 0 < ttft[("streamed", "teacher")] <= durations[("streamed", "teacher")]
    overhead = m.series("distillgate_gateway_overhead_seconds_sum")[()]
    assert 0 < overhead <= sum(durations.values())


def test_task_stage_and_student_share_gauges(traffic: Traffic) -> None:
    m = scrape(traffic.url)
    stages = m.series("distillgate_task_stage", "task", "stage")
    assert {stage: v for (task, stage), v in stages.items() if task == "student" and v} == {"serving": 1}
    assert {stage: v for (task, stage), v in stages.items() if task == "cached" and v} == {"collecting": 1}
    assert m.series("distillgate_student_traffic_ratio", "task")[("student",)] == 1.0


def test_unreachable_teacher_counts_an_upstream_error(sqlite_url: str, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    server, _, key = start_gateway(
        sqlite_url, make_policy(dead), tmp_path, upstream={"max_retries": 0, "connect_timeout_s": 2}
    )
    try:
        r = httpx.post(
            server.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={
                "model": "teacher-large",
                "messages": [{"role": "user", "content": "x"}],
                "metadata": {"task": "t"},
            },
        )
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unavailable"
        flush(server.url, ADMIN_KEY)
        m = scrape(server.url)
        assert m.series("distillgate_upstream_errors_total", "target", "kind") == {
            ("teacher", "upstream_unavailable"): 1
        }
        assert m.series("distillgate_requests_total", "task", "target", "status") == {
            ("t", "teacher", "502"): 1
        }
        assert "distillgate_tokens_total" not in m and "distillgate_cost_usd_total" not in m
    finally:
        server.stop()


# -- several worker processes ------------------------------------------------------------------


def requests_per_process(directory: Path) -> dict[int, float]:
    """requests_total written by each worker process, read from its own multiprocess file."""
    out: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        for metric in MultiProcessCollector.merge([str(path)], accumulate=True):
            if metric.name == "distillgate_requests":
                out[pid] = sum(s.value for s in metric.samples if s.name == "distillgate_requests_total")
    return out


def test_counters_aggregate_across_server_workers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``distillgate serve --workers 2`` with PROMETHEUS_MULTIPROC_DIR: a scrape (answered by either
    worker) counts every request that both workers served."""
    monkeypatch.setenv("TEACHER_API_KEY", TEACHER_KEY)
    teacher = ScriptedTeacher(api_key=TEACHER_KEY, delay_s=0.02)
    metrics_dir = tmp_path / "prom"
    metrics_dir.mkdir()
    port = free_port()
    with serve(create_teacher_app(teacher)) as teacher_server:
        (tmp_path / "policy.yaml").write_text(
            yaml.safe_dump(
                {
                    "teacher": {
                        "base_url": teacher_server.url + "/v1",
                        "api_key_env": "TEACHER_API_KEY",
                        "model": "teacher-large",
                    },
                    "prices": {"teacher-large": TEACHER_PRICE},
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
                    "log_level": "WARNING",
                    "auth": {"required": False},
                    "recorder": {"spool_dir": str(tmp_path / "spool"), "flush_interval_s": 0.05},
                }
            )
        )
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("DISTILLGATE_") and k != "PROMETHEUS_MULTIPROC_DIR"
        }
        env |= {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir), "TEACHER_API_KEY": TEACHER_KEY}
        log = (tmp_path / "serve.log").open("wb")
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "distillgate"),
                "serve",
                "--config",
                str(config),
                "--workers",
                "2",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: _answers(url, proc), 40, 0.1)
            sent = 0

            def ask(i: int) -> int:
                with httpx.Client(timeout=30) as fresh:  # a new connection: either worker may take it
                    r = fresh.post(
                        url + "/v1/chat/completions",
                        json={"model": "teacher-large", "messages": [{"role": "user", "content": f"q{i} w"}]},
                    )
                return r.status_code

            with ThreadPoolExecutor(8) as pool:
                # Until both workers have served some requests (the kernel picks who accepts).
                while len([n for n in requests_per_process(metrics_dir).values() if n]) < 2 and sent < 400:
                    assert set(pool.map(ask, range(sent, sent + 16))) == {200}
                    sent += 16
            per_process = requests_per_process(metrics_dir)
            assert len([n for n in per_process.values() if n]) == 2, per_process
            assert sum(per_process.values()) == sent
            for _ in range(4):  # whichever worker answers the scrape reports the sum of both
                m = scrape(url)
                assert m.series("distillgate_requests_total", "task", "target", "status") == {
                    ("default", "teacher", "200"): sent
                }
                assert m.counts("distillgate_request_duration_seconds", "task", "target") == {
                    ("default", "teacher"): sent
                }
                assert m.counts("distillgate_gateway_overhead_seconds") == {(): sent}
                assert m.series("distillgate_cache_requests_total", "task", "result") == {
                    ("default", "bypass"): sent
                }
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        assert teacher.stats.chat == sent


def _answers(url: str, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"distillgate serve exited with {proc.returncode}")
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
