"""Run folders: never overwritten, `latest` follows, metrics.csv in long format."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from server.outputs import METRICS_COLUMNS, MetricRow, RunOutputs


def test_runs_never_overwrite_each_other_and_latest_follows(tmp_path: Path) -> None:
    first = RunOutputs.create(tmp_path, "run1")
    second = RunOutputs.create(tmp_path, "run1")  # same name, same second

    assert first.run_dir != second.run_dir
    assert (tmp_path / "latest").resolve() == second.run_dir.resolve()


def test_metrics_csv_is_long_format_and_summary_has_final_round(tmp_path: Path) -> None:
    out = RunOutputs.create(tmp_path, "r")
    out.write_config({"a": 1}, seed=3)
    out.add([MetricRow(1, "0", "test", "dice_mean", 0.5), MetricRow(1, "global", "public", "dice_mean", 0.4)])
    out.add([MetricRow(2, "0", "test", "dice_mean", 0.75), MetricRow(2, "0", "train", "train_loss", 0.3)])
    out.add([MetricRow(2, "global", "public", "dice_mean", 0.625)])

    text = out.write_summary("t", {"hospitals": 1})

    with (out.run_dir / "metrics.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == METRICS_COLUMNS
    assert rows[1:] == [
        ["1", "0", "test", "dice_mean", "0.5"],
        ["1", "global", "public", "dice_mean", "0.4"],
        ["2", "0", "test", "dice_mean", "0.75"],
        ["2", "0", "train", "train_loss", "0.3"],
        ["2", "global", "public", "dice_mean", "0.625"],
    ]
    config = json.loads((out.run_dir / "config.json").read_text())
    assert config["seed"] == 3 and config["config"] == {"a": 1} and "torch" in config["versions"]
    assert "## Final round (2)" in text and "| 0 | test | 0.7500 | 0.3000 |" in text
    assert "| global | public | 0.6250 |  |" in text


def test_final_table_reads_the_server_rows_of_runs_written_before_the_public_set() -> None:
    import pandas as pd

    from server.outputs import final_table

    old = pd.DataFrame(
        [(3, "1", "test", "dice_mean", 0.8), (3, "global", "holdout", "dice_mean", 0.7)],
        columns=["round", "site", "split", "metric", "value"],
    )

    table = final_table(old)

    assert list(table.index) == [("1", "test"), ("global", "holdout")]
    assert table.loc[("global", "holdout"), "dice_mean"] == 0.7
