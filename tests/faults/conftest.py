"""The faults suite's report: every fault test adds one row, the session prints the table.

Each row is ``fault | client outcome | records expected | records found``; the table is printed
at the end of the run and, when ``DISTILLGATE_FAULTS_REPORT`` names a file, written there as
Markdown (the closing note of issue 14 quotes it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest


@dataclass(slots=True)
class FaultRow:
    fault: str
    client_outcome: str
    expected: int
    found: int
    note: str = ""


@dataclass(slots=True)
class FaultTable:
    rows: list[FaultRow] = field(default_factory=list)

    def row(self, fault: str, client_outcome: str, expected: int, found: int, note: str = "") -> None:
        self.rows.append(FaultRow(fault, client_outcome, expected, found, note))

    def markdown(self) -> str:
        lines = [
            "| fault | client outcome | records expected | records found | note |",
            "|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(f"| {r.fault} | {r.client_outcome} | {r.expected} | {r.found} | {r.note} |")
        return "\n".join(lines) + "\n"


_TABLE = FaultTable()


@pytest.fixture
def fault_table() -> FaultTable:
    """Add a row with ``fault_table.row(fault, outcome, expected, found, note)``."""
    return _TABLE


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _TABLE.rows:
        return
    text = _TABLE.markdown()
    terminalreporter.section("faults: expected vs found records")
    terminalreporter.write(text)
    target = os.environ.get("DISTILLGATE_FAULTS_REPORT")
    if target:
        Path(target).write_text(text)
