"""The fault suite's ledger: what each scenario sent, stored, completed and delivered.

The table is printed at the end of the test run (and written to ``var/fault-suite.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class LedgerRow:
    scenario: str
    instances_sent: int
    instances_stored: int
    jobs_ready: int
    jobs_completed: int
    srs_expected: int
    srs_delivered: int


@dataclass
class Ledger:
    rows: list[LedgerRow] = field(default_factory=list)

    def record(self, scenario: str, **figures: int) -> LedgerRow:
        row = LedgerRow(scenario=scenario, **figures)
        self.rows.append(row)
        return row

    def table(self) -> str:
        header = (
            "| scenario | instances sent / stored | jobs ready / completed "
            "| SRs expected / delivered |"
        )
        lines = [header, "|---|---|---|---|"]
        for row in self.rows:
            lines.append(
                f"| {row.scenario} | {row.instances_sent} / {row.instances_stored} "
                f"| {row.jobs_ready} / {row.jobs_completed} "
                f"| {row.srs_expected} / {row.srs_delivered} |"
            )
        return "\n".join(lines)


_LEDGER = Ledger()


@pytest.fixture
def ledger() -> Ledger:
    return _LEDGER


def write_summary(terminalreporter: Any) -> None:
    """Print the table (called from the root conftest's ``pytest_terminal_summary``)."""
    if not _LEDGER.rows:
        return
    terminalreporter.section("fault suite: nothing lost, nothing duplicated")
    terminalreporter.write_line(_LEDGER.table())
    out = Path(__file__).resolve().parents[2] / "var" / "fault-suite.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_LEDGER.table() + "\n")
