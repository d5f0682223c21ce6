"""The sweep folder's bookkeeping: long rows, resume without duplicates, progress lines."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from server.launcher import UserError
from server.sweep_runner import Progress, SweepFolder, long_rows
from server.sweep_spec import load_sweep
from tests.server.test_sweep_spec import BASE

ROOT = Path(__file__).resolve().parents[2]

SWEEP = BASE + "[grid]\nseed = [0, 1, 2]\n"  # the tiny sweep of the spec tests, 3 seeds

METRICS = [["round", "site", "split", "metric", "value"], ["1", "global", "test", "dice_mean", "0.5"],
           ["1", "0", "test", "dice_mean", "0.4"]]
PRIVACY = [["round", "site", "participated", "steps", "epsilon_rdp"], ["1", "0", "1", "26", "1.5"],
           ["1", "1", "1", "26", "inf"]]


def result(trial: str, status: str, dice: str = "0.5") -> dict[str, Any]:
    metrics = [METRICS[0], ["1", "global", "test", "dice_mean", dice], METRICS[2]]
    return {"trial": trial, "status": status, "exit_code": 0 if status == "completed" else 1, "error": None,
            "wall_s": 1.0, "node": {"hostname": "h", "node_id": "n", "ip": ""}, "run_dir": None, "log_tail": ["x"],
            "peak_rss_bytes": 1, "metrics": metrics, "privacy": PRIVACY, "config": {"seed": 0}}


def test_long_rows_keep_metrics_and_melt_privacy() -> None:
    rows = long_rows({"metrics": METRICS, "privacy": PRIVACY})
    assert rows[:2] == [METRICS[1], METRICS[2]]
    assert ["1", "0", "privacy", "epsilon_rdp", "1.5"] in rows
    assert ["1", "1", "privacy", "epsilon_rdp", "inf"] in rows
    assert len(rows) == 2 + 2 * 3  # participated, steps, epsilon_rdp per hospital row
    assert long_rows({"metrics": [], "privacy": []}) == []


def test_resume_keeps_completed_trials_once_and_drops_partial_rows(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(SWEEP.format(out=tmp_path / "out"))
    spec = load_sweep(path, project=ROOT)
    a, b, c = spec.trials
    folder = SweepFolder(spec)
    assert folder.start(resume=False, address="local") == set()
    folder.append(a, result(a.trial_id, "completed", "0.7"))
    folder.append(b, result(b.trial_id, "failed", "0.1"))  # partial rows of a failed trial
    with pytest.raises(UserError, match="already holds results; pass --resume"):
        SweepFolder(spec).check_new()

    again = SweepFolder(spec)
    done = again.start(resume=True, address="local")
    assert done == {a.trial_id}
    table = pd.read_csv(again.results, dtype={"site": str, "trial": str})
    assert set(table["trial"]) == {a.trial_id}  # b's partial rows are gone
    again.append(b, result(b.trial_id, "completed", "0.6"))
    again.append(c, result(c.trial_id, "completed", "0.65"))

    table = pd.read_csv(again.results, dtype={"site": str, "trial": str})
    keys = ["trial", "round", "site", "split", "metric"]
    assert not table.duplicated(keys).any()
    assert list(table.columns) == ["trial", "seed", "round", "site", "split", "metric", "value"]
    dice = table.query("site == 'global' and metric == 'dice_mean'").set_index("trial")["value"]
    assert dice.to_dict() == {a.trial_id: 0.7, b.trial_id: 0.6, c.trial_id: 0.65}
    assert table.set_index("trial")["seed"].groupby(level=0).first().to_dict() == {
        a.trial_id: 0, b.trial_id: 1, c.trial_id: 2}
    records = [json.loads(line) for line in again.trials.read_text().splitlines()]
    assert [r["trial"] for r in records] == [a.trial_id, b.trial_id, c.trial_id]  # one line per trial
    assert all(r["status"] == "completed" and r["swept"]["seed"] == t.index for r, t in zip(records, spec.trials,
                                                                                            strict=True))
    meta = json.loads((spec.folder / "sweep.json").read_text())
    assert meta["trials"] == [t.trial_id for t in spec.trials] and meta["seed_key"] == "seed"


def test_a_garbled_trials_file_is_one_sentence(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(SWEEP.format(out=tmp_path / "out"))
    spec = load_sweep(path, project=ROOT)
    spec.folder.mkdir(parents=True)
    (spec.folder / "trials.jsonl").write_text('{"trial": "x", "status": "completed"}\nnot json\n')
    with pytest.raises(UserError, match="Line 2 of .*trials.jsonl' is not a trial record"):
        SweepFolder(spec).previous_records()


def test_progress_prints_plain_lines_when_not_a_terminal(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(SWEEP.format(out=tmp_path / "out"))
    spec = load_sweep(path, project=ROOT)
    out = io.StringIO()
    progress = Progress(3, out, skipped=1)
    progress.trial_started(spec.trials[1], 2)
    progress.tick()  # no terminal: nothing drawn in place
    progress.trial_ended(spec.trials[1], 2, {**result(spec.trials[1].trial_id, "failed"), "error": "boom"})
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()
    assert lines[0].startswith(f"[2/3] {spec.trials[1].trial_id} started: seed=1 -> ")
    assert lines[1].startswith(f"[2/3] {spec.trials[1].trial_id} failed in 1.0 s on h: boom")
    assert lines[2].startswith("sweep: 1/3 done (1 already done), 0 running, 1 failed")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_redraws_one_status_line_on_a_terminal(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(SWEEP.format(out=tmp_path / "out"))
    spec = load_sweep(path, project=ROOT)
    out = _Terminal()
    progress = Progress(3, out)
    progress.trial_started(spec.trials[0], 1)
    progress.tick()
    progress.tick()
    progress.trial_ended(spec.trials[0], 1, result(spec.trials[0].trial_id, "completed"))
    progress.tick()
    text = out.getvalue()
    # the status line is redrawn in place (carriage return + erase), never piled up
    assert text.count("\r\x1b[K0/3 done, 1 running, 0 failed") == 2
    assert "\r\x1b[K[1/3]" in text and text.rstrip().endswith("ETA 2s")  # 2 left x 1.0 s each
    assert "sweep: " not in text  # no extra plain status lines on a terminal
