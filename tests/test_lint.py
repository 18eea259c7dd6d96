"""The code base stays ruff-clean (lint and format) and type-checks, so CI catches what a reviewer would."""

from __future__ import annotations

import subprocess
import sys
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
