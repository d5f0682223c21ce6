"""``failures.csv``: every reply the server could not use, one row each, with the reason.

Columns, exactly: ``round,site,phase,kind,reason``. ``phase`` is ``train`` or ``evaluate``;
``kind`` is ``crash`` (the hospital failed and said so), ``late`` (no reply within
``faults.round-timeout``), ``corrupt`` (an update with NaN/Inf, a wrong shape, dtype or set of
arrays), ``error`` (any other error reply) or ``budget`` (a hospital declined the round to
protect its privacy budget: not a fault, listed so the table is complete).
"""

from __future__ import annotations

import csv
from dataclasses import astuple, dataclass
from pathlib import Path

FAILURE_COLUMNS = ("round", "site", "phase", "kind", "reason")
FAULT_KINDS = ("crash", "late", "corrupt", "error")  # what counts against faults.min-available


@dataclass(frozen=True)
class Failure:
    """One reply the server rejected (or never got)."""

    round: int
    site: int
    phase: str
    kind: str
    reason: str


class FailureLog:
    """Appends rows to ``<run>/failures.csv`` as rounds complete (header written at creation)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "failures.csv"
        self.rows: list[list[object]] = []
        with self.path.open("w", newline="") as fh:
            csv.writer(fh).writerow(FAILURE_COLUMNS)

    def add(self, failures: list[Failure]) -> None:
        out = [list(astuple(f)) for f in failures]
        self.rows.extend(out)
        with self.path.open("a", newline="") as fh:
            csv.writer(fh).writerows(out)

    def summary(self) -> str:
        """``"crash 3, corrupt 1"``: rows per kind, or ``"none"``."""
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[str(row[3])] = counts.get(str(row[3]), 0) + 1
        return ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())) or "none"

    def restore(self, rows: list[list[object]]) -> None:
        """Continue a resumed run: the rows written before."""
        self.add([Failure(*row) for row in rows])  # type: ignore[arg-type]
