"""The settings and policy files the images and compose ship: valid, and free of secrets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.settings import load_settings
from router.policy import load_policy
from tests.deploy.conftest import CHART, DEPLOY


def test_config_is_valid_gateway_settings() -> None:
    settings = load_settings(DEPLOY / "config.yaml")
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    assert settings.policy_file == Path("/etc/distillgate/policy.yaml")
    assert settings.recorder.spool_dir == Path("/var/lib/distillgate/spool")
    assert settings.auth.required is True and settings.auth.admin_key is None


def test_environment_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    # How compose and the chart pass the database URL and the admin key.
    monkeypatch.setenv(
        "DISTILLGATE_DATABASE_URL", "postgresql+psycopg://distillgate@postgres:5432/distillgate"
    )
    monkeypatch.setenv("DISTILLGATE_AUTH__ADMIN_KEY", "admin-SECRET")
    settings = load_settings(DEPLOY / "config.yaml")
    assert settings.database_url == "postgresql+psycopg://distillgate@postgres:5432/distillgate"
    assert (
        settings.auth.admin_key is not None and settings.auth.admin_key.get_secret_value() == "admin-SECRET"
    )
    assert settings.recorder.spool_dir == Path("/var/lib/distillgate/spool")


def test_policy_is_valid_and_names_its_key_by_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = load_policy(DEPLOY / "policy.yaml")
    assert policy.teacher.api_key_env == "TEACHER_API_KEY"
    monkeypatch.setenv("TEACHER_API_KEY", "sk-from-env")
    assert policy.teacher.api_key() == "sk-from-env"
    assert policy.student is not None and policy.student.engine == "vllm"
    assert policy.price("student") is not None
    task = policy.for_task("anything")
    assert task.train.lora_rank == 16 and task.canary[-1] == 1.0


CREDENTIAL_FIELD = re.compile(r"password|api_?key|secret|token(?!s)", re.IGNORECASE)
REFERENCE_FIELD = re.compile(r"existingSecret|imagePullSecrets|\w*Key|\w*_env|envName|key")


@pytest.mark.parametrize(
    "path",
    [
        DEPLOY / "config.yaml",
        DEPLOY / "policy.yaml",
        DEPLOY / "docker-compose.yml",
        DEPLOY / "prometheus" / "prometheus.yml",
        DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml",
        CHART / "values.yaml",
        CHART / "ci" / "production-values.yaml",
    ],
    ids=lambda p: str(p.relative_to(DEPLOY.parent)),
)
def test_no_file_holds_a_credential(path: Path) -> None:
    text = path.read_text()
    # Provider key shapes, and key/password fields given a literal value.
    assert not re.search(r"\bsk-[A-Za-z0-9]{16,}|\bhf_[A-Za-z0-9]{20,}|\bAKIA[0-9A-Z]{16}\b", text)
    for line in text.splitlines():
        match = re.match(r"\s*(\w+)\s*:\s*(\S.*)?$", line)
        if not match or not match.group(2) or not CREDENTIAL_FIELD.search(match.group(1)):
            continue
        if REFERENCE_FIELD.fullmatch(match.group(1)):
            continue  # names a Secret, a key in it, or an environment variable
        value = match.group(2).split(" #")[0].strip().strip("'\"")
        assert value.startswith("${") or value in {"", "null", "[]", "{}"}, f"{path.name}: {line.strip()}"
