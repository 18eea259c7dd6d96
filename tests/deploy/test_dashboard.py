"""The Grafana dashboard: valid JSON, every PromQL parsed, and every metric it reads exported by the gateway."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics
from gateway.store.models import Stage
from tests.conftest import TEACHER_KEY, make_policy, start_gateway
from tests.deploy.conftest import DEPLOY, promtool, run
from tests.deploy.promql import (
    PROMETHEUS_SERIES,
    alert_expressions,
    analyse,
    dashboard,
    dashboard_expressions,
    dashboard_variable_metrics,
    exposition_names,
    grafana_to_promql,
    series_labels,
)
from tests.servers import free_port, wait_until

# Every metric docs/ARCHITECTURE.md names ("Metrics"), as Prometheus stores its series.
DESIGN_SERIES = {
    "distillgate_requests_total",
    "distillgate_request_duration_seconds_bucket",
    "distillgate_time_to_first_token_seconds_bucket",
    "distillgate_gateway_overhead_seconds_bucket",
    "distillgate_tokens_total",
    "distillgate_cost_usd_total",
    "distillgate_savings_usd_total",
    "distillgate_cache_requests_total",
    "distillgate_shadow_score_bucket",
    "distillgate_task_stage",
    "distillgate_student_traffic_ratio",
    "distillgate_promotions_total",
    "distillgate_rollbacks_total",
    "distillgate_recorder_queue_depth",
    "distillgate_recorder_spooled_total",
    "distillgate_recorder_dropped_total",
    "distillgate_training_runs_total",
    "distillgate_upstream_errors_total",
    "distillgate_answer_checks_total",
    "distillgate_soft_label_captures_total",
}


def all_expressions() -> list[tuple[str, str]]:
    return [*dashboard_expressions(), *alert_expressions()]


def defined_series() -> dict[str, set[str]]:
    """Series name → label names, for every metric gateway/metrics.py defines."""
    metrics = Metrics()
    out: dict[str, set[str]] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            (family,) = metric.describe()
            # prometheus_client keeps the declared label names only on the wrapper.
            labelnames = set(metric._labelnames)
            for series in exposition_names(family.name, family.type):
                out[series] = series_labels(series, labelnames)
    return out


def test_dashboard_is_valid_grafana_json() -> None:
    data = dashboard()
    assert data["uid"] == "distillgate" and data["schemaVersion"] >= 36
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids))
    for panel in data["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
    assert {v["name"] for v in data["templating"]["list"]} == {"datasource", "task"}


def test_dashboard_has_the_panels_ops_asked_for() -> None:
    titles = " | ".join(p["title"].lower() for p in dashboard()["panels"])
    for words in (
        "spend vs. savings",
        "requests per second by target, per task",
        "request duration",
        "time to first token",
        "cache hit ratio",
        "shadow",
        "task stage",
        "student traffic ratio",
        "recorder queue",
        "upstream errors",
        "answer checks by verdict",
        "soft-label captures",
    ):
        assert words in titles, words


def test_every_expression_parses() -> None:
    expressions = all_expressions()
    assert len(expressions) > 40
    for where, expr in expressions:
        try:
            analyse(expr)
        except Exception as exc:
            pytest.fail(f"{where}: {exc}\n{expr}")


def test_prometheus_itself_parses_every_dashboard_expression(tmp_path: Path) -> None:
    # Prometheus' own parser, through promtool: each query becomes a recording rule.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr}
        for i, (_, expr) in enumerate(dashboard_expressions())
    ]
    rule_file = tmp_path / "dashboard-rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool(), "check", "rules", str(rule_file)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_and_label_used_is_defined_by_the_gateway() -> None:
    defined = defined_series()
    for where, expr in all_expressions():
        usage = analyse(expr)
        for metric in usage.metrics - PROMETHEUS_SERIES:
            assert metric in defined, f"{where}: {metric} is not a metric gateway/metrics.py defines"
            unknown = usage.matchers.get(metric, set()) - defined[metric]
            assert not unknown, f"{where}: {metric} has no label {unknown}"
        for labels, metrics in usage.groupings:
            for metric in metrics - PROMETHEUS_SERIES:
                missing = labels - defined[metric]
                assert not missing, f"{where}: groups {metric} by {missing}, which it does not carry"
    for metric, label in dashboard_variable_metrics():
        assert label in defined[metric]


def test_dashboard_covers_every_design_metric() -> None:
    used = set().union(*(analyse(expr).metrics for _, expr in dashboard_expressions()))
    assert DESIGN_SERIES - used == set()


def test_dashboard_charts_every_metric_the_gateway_defines() -> None:
    """A metric added to gateway/metrics.py gets a panel (a histogram through any of its series)."""
    used = set().union(*(analyse(expr).metrics for _, expr in dashboard_expressions()))
    uncharted = []
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            (family,) = metric.describe()
            if not set(exposition_names(family.name, family.type)) & used:
                uncharted.append(family.name)
    assert uncharted == []


def test_task_stage_panel_maps_every_stage() -> None:
    panel = next(p for p in dashboard()["panels"] if p["title"] == "Task stage")
    mapping = panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
    names = {option["text"]: int(code) for code, option in mapping.items()}
    assert set(names) == {stage.value for stage in Stage}
    expr = panel["targets"][0]["expr"]
    for stage, code in names.items():
        if code:  # collecting is 0: the sum of the others
            assert f'stage="{stage}"}}) * {code}' in expr, stage


@contextmanager
def gateway_in_front_of(teacher_url: str, tmp_path: Path) -> Iterator[tuple[str, Callable[[], None]]]:
    """A real gateway (SQLite) and a function that sends it a little traffic of every kind (the
    task's teacher answers captured with soft labels)."""
    policy = make_policy(teacher_url, tasks={"greet": {"soft_labels": {"rate": 1.0}}})
    server, gateway, key = start_gateway(f"sqlite:///{tmp_path / 'dg.db'}", policy, tmp_path)

    def traffic() -> None:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        body: dict[str, Any] = {
            "model": "teacher-large",
            "messages": [{"role": "user", "content": "hello"}],
            "temperature": 0,
            "metadata": {"task": "greet"},
        }
        client.chat.completions.create(**body)
        client.chat.completions.create(**body)  # a repeat: the cache's turn, where there is one
        for _ in client.chat.completions.create(**body | {"stream": True}):
            pass
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="teacher-large", messages=[])
        gateway.recorder.flush(30)

    try:
        yield server.url, traffic
    finally:
        server.stop()


def test_live_gateway_exports_every_metric_the_dashboard_and_alerts_read(
    teacher: tuple[Any, Any], tmp_path: Path
) -> None:
    _, teacher_server = teacher
    with gateway_in_front_of(teacher_server.url, tmp_path) as (url, traffic):
        traffic()
        response = httpx.get(url + "/metrics", timeout=10)
    assert response.status_code == 200
    text = response.text
    assert TEACHER_KEY not in text
    exported: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for series in exposition_names(family.name, family.type):
            exported.setdefault(series, set())
        for sample in family.samples:
            exported.setdefault(sample.name, set()).update(sample.labels)
    wanted = set()
    for _, expr in all_expressions():
        wanted |= analyse(expr).metrics - PROMETHEUS_SERIES
    wanted |= {metric for metric, _ in dashboard_variable_metrics()}
    assert wanted - set(exported) == set()
    # The traffic above produced samples; they carry the labels the dashboard filters and groups by.
    defined = defined_series()
    for series in (
        "distillgate_requests_total",
        "distillgate_request_duration_seconds_bucket",
        "distillgate_tokens_total",
        "distillgate_cost_usd_total",
        "distillgate_soft_label_captures_total",
    ):
        assert exported[series], f"{series} has no samples after traffic"
        assert exported[series] | {"instance", "job"} == defined[series], series
    # Prometheus' own linter accepts the exposition.
    lint = run([promtool(), "check", "metrics"], input=text)
    assert lint.returncode == 0, lint.stdout + lint.stderr


# Panels that must show data after the traffic above (the others need shadows, training, errors…).
MUST_HAVE_DATA = (
    "Requests per second by target, per task",
    "Request duration by target (p50, p95, p99)",
    "Tokens per second by target and kind",
    "Spend vs. savings (USD per hour)",
    "Gateway overhead (p50, p99)",
    "Soft-label captures per second by task",
)


def test_real_prometheus_answers_every_dashboard_query_and_loads_the_rules(
    teacher: tuple[Any, Any], tmp_path: Path
) -> None:
    """Prometheus scrapes a live gateway; each dashboard query runs without error, the main panels have data."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip(
            "the prometheus server is not installed (apt-get install prometheus ships it with promtool)"
        )
    _, teacher_server = teacher
    with gateway_in_front_of(teacher_server.url, tmp_path) as (url, traffic):
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
            "scrape_configs": [
                {
                    "job_name": "distillgate-gateway",
                    "static_configs": [{"targets": [url.removeprefix("http://")]}],
                }
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        address = f"127.0.0.1:{free_port()}"
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address={address}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            api = f"http://{address}/api/v1"

            def query(expr: str) -> dict[str, Any]:
                try:
                    response = httpx.get(f"{api}/query", params={"query": expr}, timeout=5)
                except httpx.TransportError:
                    return {"status": "unreachable"}
                if response.status_code == 503:  # still starting
                    return {"status": "starting"}
                return dict(response.json())

            def up() -> bool:
                result = query('up{job="distillgate-gateway"} == 1')
                return result["status"] == "success" and bool(result["data"]["result"])

            wait_until(up, timeout_s=20, interval_s=0.2)
            traffic()

            def scraped_traffic() -> bool:  # two scrapes after the traffic, so rate() sees the increase
                result = query("min(count_over_time(distillgate_requests_total[1m])) >= 2")
                return result["status"] == "success" and bool(result["data"]["result"])

            wait_until(scraped_traffic, timeout_s=20, interval_s=0.2)
            titles = {}
            for panel in dashboard()["panels"]:
                for target in panel.get("targets", []):
                    titles[grafana_to_promql(target["expr"])] = panel["title"]
            with_data = set()
            for where, expr in dashboard_expressions():
                result = query(expr)
                assert result["status"] == "success", f"{where}: {result}"
                if result["data"]["result"]:
                    with_data.add(titles.get(expr, where))
            assert set(MUST_HAVE_DATA) <= with_data, set(MUST_HAVE_DATA) - with_data
            rules = httpx.get(f"{api}/rules", timeout=5).json()["data"]["groups"]
            loaded = [rule for group in rules for rule in group["rules"]]
            assert len(loaded) == 15 and {rule["health"] for rule in loaded} <= {"ok", "unknown"}
        finally:
            process.terminate()
            process.wait(timeout=10)
