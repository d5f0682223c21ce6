"""Report how many fuzz cases ran (the issue asks for at least 2,000)."""

from __future__ import annotations

import pytest

from tests.fuzz._support import CASES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if CASES:
        detail = ", ".join(f"{name} {n}" for name, n in sorted(CASES.items()))
        terminalreporter.write_line(f"fuzz cases run: {sum(CASES.values())} ({detail})")
