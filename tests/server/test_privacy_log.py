"""privacy.csv's client-level rows: the calibrated noise, the server-side budget guard, the report."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from privacy.events import CLIENT_LEVEL, DPEvent
from privacy.report import build_report, load_privacy
from server.outputs import MetricRow, RunOutputs
from server.privacy_log import PrivacyLog
from sims.config import config_from_run_config

# The issue's example: 3 hospitals, every one per round (q = 1), noise 1.2, delta 1e-5, 4 rounds.
ISSUE = {"privacy.mode": "client", "privacy.client-noise-multiplier": 1.2, "num-server-rounds": 4}


def google_epsilon(sigma: float, q: float, rounds: int, delta: float) -> float:
    """google/dp-accounting's RDP accountant (a test dependency) on the DP-FedAvg ledger."""
    import dp_accounting
    from dp_accounting import rdp as dp_rdp

    accountant = dp_rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


def run_rounds(log: PrivacyLog, num_rounds: int) -> str | None:
    """What server/driver.py's round loop does with the log: ask, then account the round."""
    for server_round in range(1, num_rounds + 1):
        if reason := log.before_round(server_round):
            return reason
        log.add_round(server_round, [])
    return None


def client_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "privacy.csv").open(newline="") as fh:
        return [row for row in csv.DictReader(fh) if row["site"] == CLIENT_LEVEL]


def test_without_a_client_target_nothing_stops_and_the_issue_spends_8_6(tmp_path: Path) -> None:
    config = config_from_run_config(ISSUE)
    log = PrivacyLog(tmp_path, config.privacy, 3, num_rounds=4)

    reason = run_rounds(log, 4)

    rows = client_rows(tmp_path)
    assert reason is None and len(rows) == 4
    assert float(rows[-1]["epsilon_rdp"]) == pytest.approx(8.6033, abs=1e-4)
    assert float(rows[-1]["epsilon_rdp"]) == pytest.approx(google_epsilon(1.2, 1.0, 4, 1e-5), rel=1e-10)


def test_a_calibrated_client_target_is_met_and_the_rows_show_the_calibrated_noise(tmp_path: Path) -> None:
    config = config_from_run_config({**ISSUE, "privacy.client-target-epsilon": 5.0})
    log = PrivacyLog(tmp_path, config.privacy, 3, num_rounds=4)

    reason = run_rounds(log, 4)

    rows = client_rows(tmp_path)
    sigma = float(rows[0]["noise_multiplier"])
    assert reason is None and log.stopped_before is None
    assert {float(r["noise_multiplier"]) for r in rows} == {sigma} and sigma > 1.2
    assert sigma == log.client_plan.noise_multiplier
    assert 4.99 <= float(rows[-1]["epsilon_rdp"]) <= 5.0
    assert google_epsilon(sigma, 1.0, 4, 1e-5) <= 5.0


def test_sampled_hospitals_calibrate_at_the_client_rate(tmp_path: Path) -> None:
    config = config_from_run_config(
        {**ISSUE, "num-server-rounds": 6, "clients-per-round": 2, "privacy.client-target-epsilon": 3.0}
    )
    log = PrivacyLog(tmp_path, config.privacy, 5, num_rounds=6)

    run_rounds(log, 6)

    rows = client_rows(tmp_path)
    assert float(rows[-1]["sample_rate"]) == pytest.approx(0.4)
    assert rows[-1]["participated"] == "2"
    assert 2.99 <= float(rows[-1]["epsilon_rdp"]) <= 3.0


def test_the_guard_stops_the_federation_before_the_round_that_would_overshoot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Fixed noise 1.2: round 1 spends 3.84, round 2 would spend 5.72 > 5.
    config = config_from_run_config(
        {**ISSUE, "privacy.client-target-epsilon": 5.0, "privacy.calibrate-noise": False}
    )
    log = PrivacyLog(tmp_path, config.privacy, 3, num_rounds=4)

    reason = run_rounds(log, 4)

    rows = client_rows(tmp_path)
    assert reason is not None
    assert reason.startswith("round 2 would take the client-level epsilon to 5.717, above ")
    assert "privacy.client-target-epsilon = 5 " in reason
    assert log.stopped_before == 2
    assert [(r["round"], r["participated"], r["budget_exhausted"]) for r in rows] == [
        ("1", "3", "0"),
        ("2", "0", "1"),
    ]
    assert rows[1]["epsilon_rdp"] == rows[0]["epsilon_rdp"]  # nothing released in the stopped round
    assert float(rows[0]["epsilon_rdp"]) == pytest.approx(3.8396, abs=1e-4)


def test_a_resumed_log_guards_with_the_events_restored(tmp_path: Path) -> None:
    config = config_from_run_config(
        {**ISSUE, "privacy.client-target-epsilon": 5.0, "privacy.calibrate-noise": False}
    )
    (tmp_path / "stopped").mkdir()
    first = PrivacyLog(tmp_path / "stopped", config.privacy, 3, num_rounds=4)
    first.before_round(1)
    first.add_round(1, [])
    resumed = PrivacyLog(tmp_path, config.privacy, 3, num_rounds=4)

    resumed.restore(first.rows, first.client_events)

    assert resumed.before_round(2) is not None  # round 1's 3.84 was restored: round 2 overshoots


def test_calibration_without_the_planned_rounds_is_refused(tmp_path: Path) -> None:
    config = config_from_run_config({**ISSUE, "privacy.client-target-epsilon": 5.0})
    log = PrivacyLog(tmp_path, config.privacy, 3)

    with pytest.raises(ValueError, match="PrivacyLog needs num_rounds to calibrate the client-level noise"):
        log.before_round(1)


def test_the_report_shows_the_client_target_and_when_it_stopped_the_federation(tmp_path: Path) -> None:
    config = config_from_run_config(
        {**ISSUE, "privacy.client-target-epsilon": 5.0, "privacy.calibrate-noise": False}
    )
    outputs = RunOutputs.create(tmp_path, "stopped")
    outputs.write_config(config.to_dict(), seed=config.seed, num_hospitals=3)
    outputs.add([MetricRow(0, "global", "holdout", "dice_mean", 0.1)])
    log = PrivacyLog(outputs.run_dir, config.privacy, 3, num_rounds=4)
    run_rounds(log, 4)

    md_path, html_path = build_report(outputs.run_dir)

    md = md_path.read_text()
    privacy = load_privacy(outputs.run_dir)
    assert privacy.loc[privacy["site"] == CLIENT_LEVEL, "budget_exhausted"].tolist() == [False, True]
    assert "- **client-level target ε**: 5" in md
    assert "| client-level | 1 | 1 | 1.2 | 3.840 | " in md  # one round released
    assert md.count("| 1e-05 | 5 |") == 1  # the target column
    assert "The client-level budget stopped the federation before round 2" in md
    assert "stopped the federation before round 2" in html_path.read_text()


def test_the_report_says_a_met_client_target_did_not_stop_anything(tmp_path: Path) -> None:
    config = config_from_run_config({**ISSUE, "privacy.client-target-epsilon": 5.0})
    outputs = RunOutputs.create(tmp_path, "met")
    outputs.write_config(config.to_dict(), seed=config.seed, num_hospitals=3)
    outputs.add([MetricRow(0, "global", "holdout", "dice_mean", 0.1)])
    log = PrivacyLog(outputs.run_dir, config.privacy, 3, num_rounds=4)
    run_rounds(log, 4)

    md_path, _ = build_report(outputs.run_dir)

    md = md_path.read_text()
    assert "The client-level budget (target ε = 5) did not stop the federation." in md
    assert "exceeds the target" not in md


def test_zero_client_noise_is_accounted_as_no_privacy(tmp_path: Path) -> None:
    config = config_from_run_config({**ISSUE, "privacy.client-noise-multiplier": 0.0})
    log = PrivacyLog(tmp_path, config.privacy, 3, num_rounds=4)

    run_rounds(log, 2)

    assert all(math.isinf(float(r["epsilon_rdp"])) for r in client_rows(tmp_path))
    assert DPEvent(1, 0.0, 1.0, 1) in [DPEvent.from_dict(e) for e in log.client_events]
