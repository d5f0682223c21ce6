"""A run's folder: ``config.json``, ``metrics.csv`` (long format) and ``summary.md``.

Each run writes ``<output-dir>/<run-id>/`` and points ``<output-dir>/latest`` at it.
Run folders are created exclusively, so runs never overwrite each other; metric rows are
appended and flushed as they arrive, so a crashed run still leaves its history.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

METRICS_COLUMNS = ("round", "site", "split", "metric", "value")
PUBLIC_SPLIT = "public"
"""``split`` of the server's rows: its evaluation on the public set (no hospital's patients)."""
SERVER_SPLITS = (PUBLIC_SPLIT, "holdout")
"""Splits of the server's own evaluation; ``holdout`` is what runs before the public set wrote."""
PACKAGES = ("fedscan", "flwr", "torch", "monai", "opacus", "ray", "nilearn", "numpy", "pandas", "cryptography")


@dataclass(frozen=True)
class MetricRow:
    """One line of ``metrics.csv``; ``site`` is a hospital id or ``"global"``."""

    round: int
    site: str
    split: str
    metric: str
    value: float


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


TIMINGS_CSV = "timings.csv"
TIMING_SUFFIX = "_seconds"


@dataclass
class RunOutputs:
    """The files of one run. Create with :meth:`create`."""

    run_dir: Path
    _rows: list[MetricRow] = field(default_factory=list)

    @classmethod
    def create(cls, output_dir: str | Path, run_name: str) -> RunOutputs:
        """Make a new, never-before-used run folder and point ``latest`` at it."""
        root = Path(output_dir)
        root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for attempt in range(1000):
            suffix = f"-{attempt}" if attempt else ""
            run_dir = root / f"{stamp}-{run_name}{suffix}"
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - 1000 runs in one second
            raise RuntimeError(f"could not create a fresh run folder under {root}")
        tmp_link = root / f".latest-{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(run_dir.name)
        os.replace(tmp_link, root / "latest")
        with (run_dir / "metrics.csv").open("w", newline="") as fh:
            csv.writer(fh).writerow(METRICS_COLUMNS)
        return cls(run_dir=run_dir)

    def write_config(self, config: dict[str, Any], **extra: Any) -> None:
        record = {"config": config, "versions": package_versions(), **extra}
        (self.run_dir / "config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")

    def add(self, rows: Iterable[MetricRow]) -> None:
        """Append rows to ``metrics.csv``; wall-clock times (metrics ending in ``_seconds``: a round's
        training, a scenario phase) go to ``timings.csv`` instead, so that ``metrics.csv`` stays the
        same, to the byte, when a run is repeated or resumed."""
        rows = list(rows)
        timed = [r for r in rows if r.metric.endswith(TIMING_SUFFIX)]
        if timed:
            path = self.run_dir / TIMINGS_CSV
            fresh = not path.exists()
            with path.open("a", newline="") as fh:
                writer = csv.writer(fh)
                if fresh:
                    writer.writerow(METRICS_COLUMNS)
                writer.writerows([r.round, r.site, r.split, r.metric, repr(float(r.value))] for r in timed)
        new = [r for r in rows if not r.metric.endswith(TIMING_SUFFIX)]
        self._rows.extend(new)
        with (self.run_dir / "metrics.csv").open("a", newline="") as fh:
            writer = csv.writer(fh)
            for r in new:
                writer.writerow([r.round, r.site, r.split, r.metric, repr(float(r.value))])

    def log_messages(self, entries: Iterable[tuple[int, str, str, int]]) -> None:
        """Append ``(round, phase, message type, hospital)`` per message sent to ``messages.csv``:
        the audit trail of who was asked to do what (an evaluate-only hospital never gets ``train``)."""
        path = self.run_dir / "messages.csv"
        new = not path.exists()
        with path.open("a", newline="") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(("round", "phase", "message_type", "site"))
            writer.writerows(entries)

    @property
    def rows(self) -> list[MetricRow]:
        return list(self._rows)

    def metrics(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(r) for r in self._rows], columns=list(METRICS_COLUMNS))

    def write_summary(self, title: str, details: dict[str, Any]) -> str:
        """Write ``summary.md`` (final-round table per site) and return its text."""
        text = render_summary(self.metrics(), title, details)
        (self.run_dir / "summary.md").write_text(text)
        return text


def final_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Last-round metrics, one row per site: test Dice (public set for the server) and train loss.

    Rows: every hospital evaluated in the last round, in id order (all of them unless
    hospitals are sampled), then ``global/test`` (patient-weighted mean of those hospitals)
    and ``global/public`` (the server's evaluation on the public set; ``global/holdout`` in
    runs written before it existed).
    """
    if metrics.empty:
        return pd.DataFrame()
    last = metrics[metrics["round"] == metrics["round"].max()]
    dice = last[last["metric"].str.startswith("dice_") & last["split"].isin(["test", *SERVER_SPLITS])]
    wide = dice.pivot_table(index=["site", "split"], columns="metric", values="value", aggfunc="first")
    loss = last[last["metric"] == "train_loss"].set_index("site")["value"]
    wide["train_loss"] = [loss.get(site, float("nan")) if split == "test" else float("nan") for site, split in wide.index]
    classes = [c for c in dict.fromkeys(dice["metric"]) if c != "dice_mean"]  # class order as written
    wide = wide[["dice_mean", *classes, "train_loss"]]
    order = sorted(wide.index, key=lambda k: (k[0] == "global", int(k[0]) if k[0].isdigit() else 0, k[1]))
    return wide.loc[order]


def render_summary(metrics: pd.DataFrame, title: str, details: dict[str, Any]) -> str:
    table = final_table(metrics)
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in details.items()]
    lines += ["", f"## Final round ({int(metrics['round'].max()) if not metrics.empty else 0})", ""]
    if table.empty:
        lines.append("No metrics were recorded.")
    else:
        cols = list(table.columns)
        lines.append("| site | split | " + " | ".join(cols) + " |")
        lines.append("|---|---|" + "---|" * len(cols))
        for (site, split), row in table.iterrows():
            cells = ["" if pd.isna(row[c]) else f"{row[c]:.4f}" for c in cols]
            lines.append(f"| {site} | {split} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "`site` is a hospital id (`partition-id`) or `global`: `global/test` is the patient-weighted",
        "mean over the test splits of the hospitals evaluated in that round, `global/public` the server's",
        "evaluation on its public set (template slices through public scanners; no hospital's patient).",
        "Dice is MONAI `DiceMetric` per patient",
        "(`ignore_empty=False`), averaged over patients; `dice_mean` is over foreground classes;",
        "`train_loss` is the hospital's mean DiceCE loss over its last round's local steps.",
        "",
    ]
    return "\n".join(lines)
