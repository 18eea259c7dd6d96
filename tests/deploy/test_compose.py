"""deploy/docker-compose.yml, checked by Docker Compose v2 itself (`docker compose config`, no daemon needed)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.settings import load_settings
from router.policy import load_policy
from tests.deploy.conftest import (
    DEPLOY,
    cli_command,
    compose_binary,
    run,
    used_options,
    vllm_flags,
)

COMPOSE_FILE = DEPLOY / "docker-compose.yml"
SECRETS = {
    "POSTGRES_PASSWORD": "pg-SECRET-1",
    "TEACHER_API_KEY": "sk-SECRET-2",
    "DISTILLGATE_AUTH__ADMIN_KEY": "admin-SECRET-3",
    "GRAFANA_ADMIN_PASSWORD": "grafana-SECRET-4",
}
ADAPTERS = "/var/lib/distillgate/adapters"


def compose_env(**extra: str) -> dict[str, str]:
    # Only what compose needs; nothing from the developer's own environment leaks into the result.
    return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **extra}


def compose_config(*profiles: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    args = [*compose_binary(), "-f", str(COMPOSE_FILE)]
    for profile in profiles:
        args += ["--profile", profile]
    result = run([*args, "config", "--format", "json"], env=env or compose_env(**SECRETS), cwd=DEPLOY)
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


@pytest.fixture(scope="module")
def gpu() -> dict[str, Any]:
    return compose_config("gpu")


@pytest.fixture(scope="module")
def cpu() -> dict[str, Any]:
    return compose_config("cpu")


def volume_target(service: dict[str, Any], source: str) -> str:
    return next(v["target"] for v in service["volumes"] if v.get("source") == source)


def test_compose_accepts_the_file_for_each_profile(gpu: dict[str, Any], cpu: dict[str, Any]) -> None:
    always = {"postgres", "gateway", "prometheus", "grafana"}
    assert set(gpu["services"]) == always | {"worker-gpu", "vllm"}
    assert set(cpu["services"]) == always | {"worker", "student-cpu"}
    assert set(compose_config()["services"]) == always


def test_secrets_come_only_from_the_environment() -> None:
    missing = dict(SECRETS)
    del missing["TEACHER_API_KEY"]
    args = [*compose_binary(), "-f", str(COMPOSE_FILE), "config", "--quiet"]
    result = run(args, env=compose_env(**missing), cwd=DEPLOY)
    assert result.returncode != 0
    assert "TEACHER_API_KEY" in result.stderr
    # In the file itself every credential is an interpolation of a variable, never a value.
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    checked = 0
    for service in raw["services"].values():
        for name, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|KEY|TOKEN|SECRET", name):
                assert re.fullmatch(r"\$\{[A-Z_]+(:[?-][^}]*)?\}", str(value)), (name, value)
                checked += 1
    assert checked >= 8


def test_gateway_waits_for_a_healthy_postgres_with_a_volume(gpu: dict[str, Any]) -> None:
    postgres = gpu["services"]["postgres"]
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert volume_target(postgres, "pgdata") == "/var/lib/postgresql/data"
    gateway = gpu["services"]["gateway"]
    assert gateway["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert gateway["environment"]["DISTILLGATE_DATABASE_URL"] == (
        "postgresql+psycopg://distillgate@postgres:5432/distillgate"
    )
    assert gateway["environment"]["PGPASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    assert gateway["environment"]["TEACHER_API_KEY"] == SECRETS["TEACHER_API_KEY"]
    assert gateway["command"] == ["serve", "--config", "/etc/distillgate/config.yaml"]
    assert gateway["healthcheck"]["test"][-1].endswith("urlopen('http://127.0.0.1:8001/readyz', timeout=2)")
    assert load_settings(DEPLOY / "config.yaml").ops_port == 8001  # the port the healthcheck uses
    assert gateway["ports"][0]["target"] == 8000


def test_stop_grace_covers_the_gateway_drain(gpu: dict[str, Any]) -> None:
    settings = load_settings(DEPLOY / "config.yaml")
    grace = gpu["services"]["gateway"]["stop_grace_period"]
    assert grace == "35s"
    assert int(grace.rstrip("s")) >= settings.shutdown_grace_s + 5


def launch_argv(service: dict[str, Any], tmp_path: Path) -> list[str]:
    """Run the service's entrypoint as the container would, with a stand-in `vllm` that prints its argv."""
    entrypoint = service["entrypoint"]
    assert entrypoint[0] == "bash"
    mounts = {v["target"]: Path(v["source"]) for v in service["volumes"] if v["type"] == "bind"}
    script = mounts["/opt/distillgate/vllm"] / Path(entrypoint[1]).relative_to("/opt/distillgate/vllm")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vllm").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    (bin_dir / "vllm").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", **service["environment"]}
    result = run(["bash", str(script), *service["command"]], env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_vllm_loads_adapters_at_runtime_from_the_workers_volume(gpu: dict[str, Any], tmp_path: Path) -> None:
    vllm = gpu["services"]["vllm"]
    assert vllm["profiles"] == ["gpu"]
    # env_file (deploy/vllm/vllm.env) and environment, as compose hands them to the container.
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    argv = launch_argv(vllm, tmp_path)
    policy = load_policy(DEPLOY / "policy.yaml")
    assert policy.student is not None
    assert argv[:2] == ["serve", policy.student.base_model]
    flags = vllm_flags(argv)
    assert "enable-lora" in flags
    assert int(flags["max-cpu-loras"]) >= int(flags["max-loras"])
    assert int(flags["max-lora-rank"]) >= policy.for_task("any").train.lora_rank
    assert int(flags["max-logprobs"]) >= policy.student.max_logprobs
    assert flags["gpu-memory-utilization"] == "0.5"
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    worker = gpu["services"]["worker-gpu"]
    # The lora_path the worker publishes must exist inside vLLM: same volume, same path.
    assert volume_target(worker, "adapters") == volume_target(vllm, "adapters") == ADAPTERS
    assert load_settings(DEPLOY / "config.yaml").adapters_dir == Path(ADAPTERS)
    assert "student" in vllm["networks"]["default"]["aliases"]


def test_cpu_profile_runs_the_embedded_student_under_the_same_name(cpu: dict[str, Any]) -> None:
    student = cpu["services"]["student-cpu"]
    assert student["command"][:2] == ["student", "serve"]
    policy = load_policy(DEPLOY / "policy.yaml")
    assert policy.student is not None
    assert vllm_flags(student["command"])["base-model"] == policy.student.base_model
    assert "student" in student["networks"]["default"]["aliases"]
    assert (
        volume_target(student, "adapters") == volume_target(cpu["services"]["worker"], "adapters") == ADAPTERS
    )
    policy = load_policy(DEPLOY / "policy.yaml")
    assert policy.student is not None and policy.student.base_url == "http://student:8000/v1"


def test_worker_runs_the_scheduler_and_leaves_migrations_to_the_gateway(cpu: dict[str, Any]) -> None:
    worker = cpu["services"]["worker"]
    assert worker["command"] == ["worker", "--config", "/etc/distillgate/config.yaml"]
    assert worker["environment"]["DISTILLGATE_MIGRATE_ON_START"] == "false"
    assert worker["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert load_settings(DEPLOY / "config.yaml").run_scheduler is False


def test_prometheus_and_grafana_get_their_files(gpu: dict[str, Any]) -> None:
    mounts = {
        (Path(v["source"]).resolve(), v["target"])
        for name in ("prometheus", "grafana")
        for v in gpu["services"][name]["volumes"]
        if v["type"] == "bind"
    }
    assert mounts == {
        (DEPLOY / "prometheus" / "prometheus.yml", "/etc/prometheus/prometheus.yml"),
        (DEPLOY / "prometheus" / "alerts.yml", "/etc/prometheus/alerts.yml"),
        (DEPLOY / "grafana" / "provisioning", "/etc/grafana/provisioning"),
        (DEPLOY / "grafana" / "distillgate.json", "/var/lib/grafana/dashboards/distillgate.json"),
    }
    for source, _ in mounts:
        assert source.exists(), source
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "distillgate.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"


def test_every_scrape_target_is_a_compose_service(gpu: dict[str, Any], cpu: dict[str, Any]) -> None:
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    names: set[str] = set()
    for config in (gpu, cpu):
        for name, service in config["services"].items():
            names.add(name)
            for network in (service.get("networks") or {}).values():
                names.update((network or {}).get("aliases", []))
    for job in prometheus["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            host = target.split(":")[0]
            assert host in names | {"localhost"}, (job["job_name"], host)


@pytest.mark.parametrize("service", ["gateway", "worker", "student-cpu"])
def test_compose_runs_commands_the_cli_has(cpu: dict[str, Any], service: str) -> None:
    args = cpu["services"][service]["command"]
    path, options = cli_command(args)
    assert path == {"gateway": "serve", "worker": "worker", "student-cpu": "student serve"}[service]
    assert used_options(args) <= options, used_options(args) - options
