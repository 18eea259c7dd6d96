"""The console's browser: Debian's chromium driven through Playwright's Python API (Playwright's
own browser download is not used). Tests that need it skip, saying why, when chromium is absent."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.router.conftest import agreeing_student, stack, tiny_base

__all__ = ["agreeing_student", "stack", "tiny_base"]  # the routing stack the browser tests drive

CHROMIUM = os.environ.get("DISTILLGATE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM}: apt-get install -y chromium (see README, Tests)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def screenshots() -> Path:
    """Where the test run leaves its screenshots of the main pages."""
    out = Path(os.environ.get("DISTILLGATE_SCREENSHOTS") or Path(__file__).parent / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out
