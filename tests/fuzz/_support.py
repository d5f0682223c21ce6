"""Shared pieces of the fuzz tests: deterministic hypothesis settings, a case counter and
the one-sentence error contract every user-facing failure must meet."""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from collections.abc import Callable, Sequence

from hypothesis import HealthCheck, settings

CASES: Counter[str] = Counter()
"""Fuzz cases actually run, per target; printed at the end of the pytest session."""


def fuzz_settings(max_examples: int) -> settings:
    """Deterministic (same cases on every machine, no example database written), no deadline."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def count(target: str) -> None:
    CASES[target] += 1


def assert_one_sentence(message: str) -> None:
    """A user-facing error: one non-empty line, ending like a sentence, no traceback."""
    assert message.strip(), "empty error message"
    assert "\n" not in message and "\r" not in message, f"multi-line error: {message!r}"
    assert "Traceback" not in message, message
    assert message.rstrip().endswith((".", "?", ")")), f"not a sentence: {message!r}"


def run_cli(main: Callable[[Sequence[str]], int], argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` in-process; returns (exit code, stdout, stderr). argparse exits count too."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code if isinstance(exit_.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def assert_cli_contract(code: int, stdout: str, stderr: str) -> None:
    """Exit 0, or exit 2 with exactly one non-empty stderr line starting 'fedscan: error:'."""
    assert "Traceback" not in stdout + stderr, stderr
    assert code in (0, 2), f"exit code {code}; stderr: {stderr!r}"
    if code == 2:
        lines = [line for line in stderr.splitlines() if not line.startswith("fedscan: warning:")]
        assert len(lines) == 1, f"expected one error line, got {stderr!r}"
        assert lines[0].startswith("fedscan: error: ") and lines[0][len("fedscan: error: "):].strip(), stderr
