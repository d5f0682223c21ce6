"""Privacy-budget report: per-hospital ε and the worst case (never the mean), exhausted rounds,
client-level ε apart, a self-contained HTML page, and one-sentence errors for bad run folders."""

from __future__ import annotations

import base64
import csv
import json
import math
import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest
from flwr.app import MetricRecord, RecordDict

from privacy.report import (
    PRIVACY_COLUMNS,
    REPORT_HTML,
    REPORT_MD,
    WORST_CASE,
    ReportError,
    budget_summary,
    build_report,
    load_privacy,
)
from server.outputs import MetricRow, RunOutputs
from server.privacy_log import PrivacyLog
from server.site_metrics import SiteMetrics
from sims.config import config_from_run_config

TARGET = 3.0
DELTA = 1e-5
# Cumulative ε per hospital, rounds 1..4. Hospital 2 trains twice, then declines in round 3
# because a third round would overshoot the target.
EPS_RDP = {"0": [0.8, 1.5, 2.1, 2.6], "1": [0.5, 1.0, 1.4, 1.8], "2": [1.2, 2.4, 2.4, 2.4]}
EPS_PRV = {"0": [0.7, 1.3, 1.9, 2.3], "1": [0.4, 0.9, 1.2, 1.6], "2": [1.1, 2.1, 2.1, 2.1]}
DICE_TEST = {"0": [0.41, 0.55, 0.62, 0.66], "1": [0.38, 0.50, 0.58, 0.61], "2": [0.35, 0.47, 0.49, 0.50]}
DICE_HOLDOUT = [0.05, 0.40, 0.52, 0.58, 0.63]  # rounds 0..4


def hospital_metrics(site: str, r: int) -> dict[str, float | int]:
    """What a hospital's evaluate reply holds in round ``r`` (clients/client_app.py's keys)."""
    exhausted = site == "2" and r >= 3
    metrics: dict[str, float | int] = {
        "site": int(site), "server-round": r, "num-examples": 10,
        "dice_mean": DICE_TEST[site][r - 1], "dice_csf": DICE_TEST[site][r - 1] - 0.1,
    }
    metrics.update({
        "privacy_participated": int(not exhausted),
        "privacy_steps": 0 if exhausted else 19,
        "privacy_sample_rate": 0.053,
        "privacy_noise_multiplier": 1.1,
        "privacy_epsilon_rdp": EPS_RDP[site][r - 1],
        "privacy_epsilon_prv": EPS_PRV[site][r - 1],
        "privacy_delta": DELTA,
        "privacy_budget_exhausted": int(exhausted),
    })
    return metrics


def make_run(
    root: Path,
    *,
    mode: str = "both",
    pretrain_epochs: int = 2,
    overrides: dict[str, dict[int, dict[str, float | int]]] | None = None,
    hospital_privacy: bool = True,
) -> tuple[Path, PrivacyLog]:
    """A run folder of 3 hospitals x 4 rounds written by the server's own writers.

    ``RunOutputs`` writes config.json and metrics.csv, ``SiteMetrics`` turns the hospitals'
    replies into metric and privacy rows, ``PrivacyLog`` writes privacy.csv (with its real
    client-level accounting). ``overrides[site][round]`` replaces values of a hospital's reply.
    """
    run_config: dict[str, object] = {
        "seed": 7, "privacy.mode": mode, "privacy.delta": DELTA, "privacy.pretrain-epochs": pretrain_epochs,
        "privacy.client-noise-multiplier": 0.8, "patients-per-hospital": 150,
    }
    if mode != "off":
        run_config["privacy.target-epsilon"] = TARGET
    config = config_from_run_config(run_config)
    outputs = RunOutputs.create(root, "synthetic")
    outputs.write_config(config.to_dict(), seed=config.seed, num_hospitals=3)
    privacy_log = PrivacyLog(outputs.run_dir, config.privacy, 3)  # as server/server_app.py does
    sites = SiteMetrics(outputs.add, privacy_log.add_round)
    outputs.add([MetricRow(0, "global", "holdout", "dice_mean", DICE_HOLDOUT[0])])
    for r in range(1, 5):
        replies = []
        for site in DICE_TEST:
            metrics = hospital_metrics(site, r)
            metrics.update((overrides or {}).get(site, {}).get(r, {}))
            if not hospital_privacy:
                metrics = {k: v for k, v in metrics.items() if not k.startswith("privacy_")}
            replies.append(RecordDict({"metrics": MetricRecord(metrics)}))
        train = [RecordDict({"metrics": MetricRecord({"site": int(site), "server-round": r, "num-examples": 10,
                                                      "train_loss": 1.0 - DICE_TEST[site][r - 1]})})
                 for site in DICE_TEST]
        sites.train(train, "num-examples")
        sites.evaluate(replies, "num-examples")
        outputs.add([MetricRow(r, "global", "holdout", "dice_mean", DICE_HOLDOUT[r])])
    return outputs.run_dir, privacy_log


def rewrite_csv(path: Path, edit: Callable[[list[list[str]]], list[list[str]]]) -> None:
    """Damage a file the writers wrote, row by row (header included)."""
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(edit(rows))


class Resources(HTMLParser):
    """Collects every src/href and the start tags of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.links += [value or "" for name, value in attrs if name in ("src", "href")]


def test_load_privacy_reads_what_the_privacy_log_wrote(tmp_path: Path) -> None:
    # Prepare: hospital 0 trained without noise in round 1 (epsilon inf).
    run, log = make_run(tmp_path, overrides={"0": {1: {"privacy_epsilon_rdp": math.inf}}})

    # Execute
    privacy = load_privacy(run)

    # Assert
    assert list(privacy.columns) == list(PRIVACY_COLUMNS)
    assert len(privacy) == 16 == len(log.rows)
    assert math.isinf(privacy.loc[(privacy["site"] == "0") & (privacy["round"] == 1), "epsilon_rdp"].item())
    client = privacy[privacy["site"] == "client-level"]
    assert client["participated"].all() and client["sample_rate"].tolist() == [1.0] * 4
    assert client["epsilon_rdp"].tolist() == pytest.approx([row[6] for row in log.rows if row[1] == "client-level"])
    exhausted = privacy[privacy["budget_exhausted"]]
    assert exhausted[["site", "round"]].values.tolist() == [["2", 3], ["2", 4]]
    assert not privacy.loc[privacy["site"] == "2", "participated"].tolist()[2]


def test_worst_case_is_the_max_of_final_epsilons_never_the_mean(tmp_path: Path) -> None:
    # Prepare
    run, log = make_run(tmp_path)
    privacy = load_privacy(run)

    # Execute
    summary = budget_summary(privacy)

    # Assert
    assert summary["site"].tolist() == ["0", "1", "2", WORST_CASE]
    worst = summary[summary["site"] == WORST_CASE].iloc[0]
    assert worst["epsilon_rdp"] == pytest.approx(2.6)  # max(2.6, 1.8, 2.4), not the mean 2.27
    assert worst["epsilon_rdp"] != pytest.approx(sum(v[-1] for v in EPS_RDP.values()) / 3)
    assert worst["epsilon_prv"] == pytest.approx(2.3)
    assert summary["epsilon_rdp"].tolist()[:3] == pytest.approx([2.6, 1.8, 2.4])
    client_eps = log.rows[-1][6]
    assert client_eps > 2.6 and client_eps not in summary["epsilon_rdp"].tolist()  # client-level ε stays out


def test_summary_counts_steps_rounds_and_the_round_the_budget_ran_out(tmp_path: Path) -> None:
    # Prepare
    privacy = load_privacy(make_run(tmp_path)[0])

    # Execute
    summary = budget_summary(privacy).set_index("site")

    # Assert
    assert summary["steps"].tolist() == [76, 76, 38, 76]
    assert summary["rounds_participated"].tolist() == [4, 4, 2, 4]
    assert summary["budget_exhausted_round"].tolist() == [None, None, 3, 3]


def test_report_shows_every_hospital_the_worst_case_and_client_level_apart(tmp_path: Path) -> None:
    # Prepare
    run, log = make_run(tmp_path)
    client_rdp, client_prv = log.rows[-1][6], log.rows[-1][7]

    # Execute
    md_path, html_path = build_report(run)

    # Assert
    assert (md_path, html_path) == (run / REPORT_MD, run / REPORT_HTML)
    md = md_path.read_text()
    assert "- **privacy mode**: both" in md and "- **δ**: 1e-05" in md and "- **target ε**: 3" in md
    assert "- **hospitals**: 3" in md and "- **seed**: 7" in md
    assert "Each simulated patient contributes exactly one slice, so per-sample DP-SGD is per-patient" in md
    assert "- **public pre-training**: 2 epochs" in md
    assert "public ICBM152 template" in md and "costs no patient privacy" in md
    assert "| hospital 2 | 2.400 | 2.100 | 1e-05 | 38 | 2 | 3 |" in md
    assert "| **worst case** | **2.600** | **2.300** | **1e-05** | **76** | **4** | **3** |" in md
    assert "Hospital 2 ran out of budget in round 3" in md
    assert f"| client-level | 4 | 1 | 0.8 | {client_rdp:.3f} | {client_prv:.3f} | 1e-05 |" in md
    assert "the two are not added" in md
    assert "| hospital 0 | 0.6600 | 4 | 2.600 | 2.300 |" in md
    for png in ("privacy_epsilon.png", "privacy_client_epsilon.png", "privacy_dice_epsilon.png"):
        assert f"]({png})" in md
        assert (run / png).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_html_is_self_contained_with_valid_embedded_pngs(tmp_path: Path) -> None:
    # Prepare
    run, _ = make_run(tmp_path)

    # Execute
    _, html_path = build_report(run)

    # Assert
    page = html_path.read_text()
    parser = Resources()
    parser.feed(page)
    images = [link for link in parser.links if link.startswith("data:image/png;base64,")]
    assert len(images) == 3 == parser.tags.count("img")
    for image in images:
        assert base64.b64decode(image.split(",", 1)[1], validate=True).startswith(b"\x89PNG\r\n\x1a\n")
    assert all(link.startswith("data:") for link in parser.links)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, flags=re.IGNORECASE)
    assert "http://" not in page and "https://" not in page
    assert page.startswith("<!DOCTYPE html>") and parser.tags.count("table") == 3
    assert '<tr class="emphasise"><td>worst case</td>' in page


def test_report_is_deterministic(tmp_path: Path) -> None:
    # Prepare
    run, _ = make_run(tmp_path)
    first = [p.read_bytes() for p in build_report(run)]

    # Execute
    second = [p.read_bytes() for p in build_report(run)]

    # Assert
    assert first == second


def test_infinite_epsilon_is_reported_not_hidden(tmp_path: Path) -> None:
    # Prepare: hospital 1 trained without noise in its last round
    no_noise = {"privacy_noise_multiplier": 0.0, "privacy_epsilon_rdp": math.inf}
    run, _ = make_run(tmp_path, overrides={"1": {4: no_noise}})

    # Execute
    md = build_report(run)[0].read_text()

    # Assert
    assert budget_summary(load_privacy(run)).set_index("site").loc[WORST_CASE, "epsilon_rdp"] == math.inf
    assert "| hospital 1 | ∞ |" in md and "| **worst case** | **∞** |" in md
    assert "noise multiplier 0 gives no privacy" in md


@pytest.mark.parametrize(
    "hospitals_report",
    [
        pytest.param(False, id="hospitals-report-nothing"),
        pytest.param(True, id="as-client_app-reports"),
    ],
)
def test_privacy_off_run_folder_works_and_says_so(tmp_path: Path, hospitals_report: bool) -> None:
    # Prepare: without sample-level DP clients/client_app.py reports epsilon inf, no noise.
    off = {"privacy_epsilon_rdp": math.inf, "privacy_epsilon_prv": math.inf, "privacy_noise_multiplier": 0.0,
           "privacy_sample_rate": 0.0, "privacy_budget_exhausted": 0, "privacy_participated": 1,
           "privacy_steps": 0}
    run, _ = make_run(tmp_path, mode="off", pretrain_epochs=0, hospital_privacy=hospitals_report,
                      overrides={site: dict.fromkeys(range(1, 5), off) for site in DICE_TEST})

    # Execute
    md_path, html_path = build_report(run)

    # Assert
    md, page = md_path.read_text(), html_path.read_text()
    assert "**Privacy was off in this run.**" in md
    assert "<strong>Privacy was off in this run.</strong>" in page
    assert "no per-patient ε spent" in md
    assert "worst case" not in md and "ICBM152" not in md and "Client-level" not in md
    assert not (run / "privacy_epsilon.png").exists()
    assert "| hospital 2 | 0.5000 | 4 | n/a | n/a |" in md
    assert page.count("data:image/png;base64,") == 1  # the Dice curve only


def test_missing_privacy_column_raises_naming_the_file_and_column(tmp_path: Path) -> None:
    # Prepare: privacy.csv as written, then the epsilon_prv column removed
    run, _ = make_run(tmp_path)
    column = list(PRIVACY_COLUMNS).index("epsilon_prv")
    rewrite_csv(run / "privacy.csv", lambda rows: [row[:column] + row[column + 1 :] for row in rows])

    # Execute / Assert
    with pytest.raises(ReportError, match=r"privacy\.csv has missing column\(s\) 'epsilon_prv'"):
        build_report(run)
    with pytest.raises(ValueError, match="epsilon_prv"):
        load_privacy(run)


def test_malformed_privacy_value_names_line_column_and_value(tmp_path: Path) -> None:
    # Prepare: line 4 of privacy.csv (round 1, hospital 2) damaged
    run, _ = make_run(tmp_path)
    steps = list(PRIVACY_COLUMNS).index("steps")

    def damage(rows: list[list[str]]) -> list[list[str]]:
        assert rows[3][:2] == ["1", "2"]
        rows[3][steps] = "-4"
        return rows

    rewrite_csv(run / "privacy.csv", damage)

    # Execute / Assert
    expected = r"line 4: column 'steps' must be a non-negative integer\. Got '-4' instead\."
    with pytest.raises(ReportError, match=expected):
        build_report(run)


def test_nonexistent_run_dir_raises_naming_the_path(tmp_path: Path) -> None:
    # Prepare
    missing = tmp_path / "no-such-run"

    # Execute / Assert
    with pytest.raises(ReportError, match=re.escape(f"Run folder {missing} does not exist")):
        build_report(missing)


def test_file_instead_of_folder_and_missing_metrics_are_reported(tmp_path: Path) -> None:
    # Prepare
    run, _ = make_run(tmp_path)
    (run / "metrics.csv").unlink()

    # Execute / Assert
    with pytest.raises(ReportError, match="is not a folder"):
        build_report(run / "config.json")
    with pytest.raises(ReportError, match="has no metrics.csv"):
        build_report(run)


def test_privacy_mode_on_without_privacy_rows_warns_instead_of_claiming_off(tmp_path: Path) -> None:
    # Prepare: mode "sample" in config.json, but no hospital ever reported (header only)
    run, _ = make_run(tmp_path, mode="sample", hospital_privacy=False)

    # Execute
    md = build_report(run)[0].read_text()

    # Assert
    assert "**Warning: no privacy accounting was recorded.**" in md and "privacy mode 'sample'" in md
    assert "Privacy was off" not in md


def test_pretraining_epochs_as_the_server_writes_them_are_reported(tmp_path: Path) -> None:
    # Prepare
    run, _ = make_run(tmp_path, pretrain_epochs=1)
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["privacy"]["pretrain_epochs"] == 1  # what RunOutputs wrote

    # Execute
    md = build_report(run)[0].read_text()

    # Assert
    assert "- **public pre-training**: 1 epoch\n" in md
    assert "Pre-training (1 epoch) ran on the public ICBM152 template" in md


def test_a_round_given_twice_for_one_hospital_is_rejected(tmp_path: Path) -> None:
    # Prepare: the privacy log is handed hospital 0's round 2 a second time
    run, log = make_run(tmp_path)
    log.add_round(2, [{"site": "0", **{k.removeprefix("privacy_"): v for k, v in hospital_metrics("0", 2).items()
                                       if k.startswith("privacy_")}}])

    # Execute / Assert
    with pytest.raises(ReportError, match=r"two rows for round 2 and site '0' \(second one on line 18\)"):
        load_privacy(run)
