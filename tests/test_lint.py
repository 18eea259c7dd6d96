"""The code base stays ruff-clean (lint and format), type-checks and keeps its import layers, so CI
catches what a reviewer would."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["gateway", "router", "trainer", "demo", "tests", "bench"]


def ruff(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint_passes() -> None:
    done = ruff("check", *PACKAGES)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ruff_format_is_applied() -> None:
    done = ruff("format", "--check", *PACKAGES)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_passes_on_the_code_and_its_tests() -> None:
    """Types are checked (``[tool.mypy]`` in pyproject.toml) wherever ruff looks: the product
    packages, and the tests and bench scripts that call them (and the openai SDK) as users do."""
    done = subprocess.run(
        [sys.executable, "-m", "mypy", *PACKAGES],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_imports_keep_the_layer_contract() -> None:
    """``[tool.importlinter]`` in pyproject.toml: leaves <- router <- trainer <- serving <- CLI and demo."""
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_module_has_a_layer() -> None:
    """A module the contract does not name would be checked by nothing: each one is placed on purpose."""
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    named = {m.strip() for layer in contract["contracts"][0]["layers"] for m in layer.split(":")}
    modules = set()
    for package in contract["root_packages"]:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__" or "migrations" in parts:
                continue
            modules.add(".".join(parts))
    unplaced = sorted(m for m in modules if not any(m == n or m.startswith(n + ".") for n in named))
    assert not unplaced, f"modules in no layer of [tool.importlinter]: {unplaced}"
