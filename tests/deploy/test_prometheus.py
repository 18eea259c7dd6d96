"""Prometheus scrape config and alert rules, checked and unit-tested by promtool."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.deploy.conftest import DEPLOY, promtool, run

PROMETHEUS = DEPLOY / "prometheus"


def test_promtool_accepts_the_scrape_config_with_its_rules(tmp_path: Path) -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    # In the container the rules sit at /etc/prometheus/alerts.yml; point at the repository copy.
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    config["rule_files"] = [str(PROMETHEUS / "alerts.yml")]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    result = run([promtool(), "check", "config", str(checked)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 15 rules found" in result.stdout


def test_promtool_accepts_the_alert_rules() -> None:
    result = run([promtool(), "check", "rules", str(PROMETHEUS / "alerts.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_on_the_series_meant_to_trip_them() -> None:
    """alerts.test.yml feeds synthetic series to every alert and states what must fire, and when."""
    result = run([promtool(), "test", "rules", "alerts.test.yml"], cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {
        case["alertname"]
        for test in yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert tested == set(alert_names())


def test_scrape_jobs_cover_gateway_worker_and_student() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert {"distillgate-gateway", "distillgate-worker", "distillgate-student"} <= set(jobs)
    assert jobs["distillgate-gateway"]["static_configs"][0]["targets"] == ["gateway:8001"]  # ops_port
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in jobs.values())


def test_every_alert_has_a_severity_and_a_summary() -> None:
    for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
            assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def alert_names() -> list[str]:
    return [
        rule["alert"]
        for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    ]


def test_the_required_alerts_exist() -> None:
    assert {
        "DistillgateHighErrorRate",
        "DistillgateHighLatencyP99",
        "DistillgateRecorderSpooling",
        "DistillgateRecorderBacklog",
        "DistillgateStudentScoreLow",
        "DistillgateRollback",
        "DistillgateUpstreamErrors",
    } <= set(alert_names())
