"""Privacy-budget report: per-hospital ε and the worst case (never the mean), exhausted rounds,
client-level ε apart, a self-contained HTML page, and one-sentence errors for bad run folders."""

from __future__ import annotations

import base64
import csv
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

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

TARGET = 3.0
DELTA = 1e-5
# Cumulative ε per hospital, rounds 1..4. Hospital 2 trains twice, then declines in round 3
# because a third round would overshoot the target.
EPS_RDP = {"0": [0.8, 1.5, 2.1, 2.6], "1": [0.5, 1.0, 1.4, 1.8], "2": [1.2, 2.4, 2.4, 2.4]}
EPS_PRV = {"0": [0.7, 1.3, 1.9, 2.3], "1": [0.4, 0.9, 1.2, 1.6], "2": [1.1, 2.1, 2.1, 2.1]}
CLIENT_EPS = [5.0, 7.0, 8.6, 10.0]  # larger than any hospital's: must not leak into the worst case
DICE_TEST = {"0": [0.41, 0.55, 0.62, 0.66], "1": [0.38, 0.50, 0.58, 0.61], "2": [0.35, 0.47, 0.49, 0.50]}
DICE_HOLDOUT = [0.05, 0.40, 0.52, 0.58, 0.63]  # rounds 0..4


def privacy_rows() -> list[list[object]]:
    rows: list[list[object]] = []
    for site in ("0", "1", "2"):
        for r in range(1, 5):
            exhausted = site == "2" and r >= 3
            participated = "false" if exhausted else "true"  # the true/false spelling, on purpose
            steps = 0 if exhausted else 19
            epsilons = [EPS_RDP[site][r - 1], EPS_PRV[site][r - 1]]
            rows.append([r, site, participated, steps, 0.053, 1.1, *epsilons, DELTA, int(exhausted)])
    for r in range(1, 5):
        # As server/privacy_log.py writes it: `participated` holds the number of hospitals sampled.
        rows.append([r, "client-level", 3, 1, 1.0, 0.8, CLIENT_EPS[r - 1], "", DELTA, 0])
    return rows


def write_csv(path: Path, header: list[str] | tuple[str, ...], rows: list[list[object]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def make_run(
    root: Path,
    *,
    mode: str = "both",
    privacy: list[list[object]] | None = None,
    privacy_header: list[str] | tuple[str, ...] = PRIVACY_COLUMNS,
    pretrain_rounds: int = 2,
) -> Path:
    """A small run folder: 3 hospitals x 4 rounds, config.json, metrics.csv, privacy.csv."""
    run = root / "run-synthetic"
    run.mkdir()
    metrics: list[list[object]] = [
        [r, "global", "holdout", "dice_mean", v] for r, v in enumerate(DICE_HOLDOUT)
    ]
    for site, values in DICE_TEST.items():
        for r, v in enumerate(values, start=1):
            metrics += [[r, site, "test", "dice_mean", v], [r, site, "test", "dice_csf", v - 0.1],
                        [r, site, "train", "train_loss", 1.0 - v]]
    write_csv(run / "metrics.csv", ["round", "site", "split", "metric", "value"], metrics)
    privacy_config = {"mode": mode, "target_epsilon": TARGET if mode != "off" else None, "delta": DELTA,
                      "pretrain_rounds": pretrain_rounds}
    config = {"config": {"privacy": privacy_config, "world": {"seed": 7}}, "seed": 7, "num_hospitals": 3}
    (run / "config.json").write_text(json.dumps(config))
    if mode != "off":
        write_csv(run / "privacy.csv", privacy_header, privacy_rows() if privacy is None else privacy)
    return run


class Resources(HTMLParser):
    """Collects every src/href and the start tags of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.links += [value or "" for name, value in attrs if name in ("src", "href")]


def test_load_privacy_parses_flags_infinities_and_empty_prv(tmp_path: Path) -> None:
    # Prepare
    rows = privacy_rows()
    rows[0][6] = "inf"  # hospital 0 round 1: noise 0
    run = make_run(tmp_path, privacy=rows)

    # Execute
    privacy = load_privacy(run)

    # Assert
    assert list(privacy.columns) == list(PRIVACY_COLUMNS)
    assert len(privacy) == 16
    assert math.isinf(privacy.loc[(privacy["site"] == "0") & (privacy["round"] == 1), "epsilon_rdp"].item())
    client = privacy[privacy["site"] == "client-level"]
    assert client["epsilon_prv"].isna().all() and client["participated"].all()
    exhausted = privacy[privacy["budget_exhausted"]]
    assert exhausted[["site", "round"]].values.tolist() == [["2", 3], ["2", 4]]
    assert not privacy.loc[privacy["site"] == "2", "participated"].tolist()[2]


def test_worst_case_is_the_max_of_final_epsilons_never_the_mean(tmp_path: Path) -> None:
    # Prepare
    privacy = load_privacy(make_run(tmp_path))

    # Execute
    summary = budget_summary(privacy)

    # Assert
    assert summary["site"].tolist() == ["0", "1", "2", WORST_CASE]
    worst = summary[summary["site"] == WORST_CASE].iloc[0]
    assert worst["epsilon_rdp"] == pytest.approx(2.6)  # max(2.6, 1.8, 2.4), not the mean 2.27
    assert worst["epsilon_rdp"] != pytest.approx(sum(v[-1] for v in EPS_RDP.values()) / 3)
    assert worst["epsilon_prv"] == pytest.approx(2.3)
    assert summary["epsilon_rdp"].tolist()[:3] == pytest.approx([2.6, 1.8, 2.4])
    assert 10.0 not in summary["epsilon_rdp"].tolist()  # client-level ε stays out


def test_summary_counts_steps_rounds_and_the_round_the_budget_ran_out(tmp_path: Path) -> None:
    # Prepare
    privacy = load_privacy(make_run(tmp_path))

    # Execute
    summary = budget_summary(privacy).set_index("site")

    # Assert
    assert summary["steps"].tolist() == [76, 76, 38, 76]
    assert summary["rounds_participated"].tolist() == [4, 4, 2, 4]
    assert summary["budget_exhausted_round"].tolist() == [None, None, 3, 3]


def test_report_shows_every_hospital_the_worst_case_and_client_level_apart(tmp_path: Path) -> None:
    # Prepare
    run = make_run(tmp_path)

    # Execute
    md_path, html_path = build_report(run)

    # Assert
    assert (md_path, html_path) == (run / REPORT_MD, run / REPORT_HTML)
    md = md_path.read_text()
    assert "- **privacy mode**: both" in md and "- **δ**: 1e-05" in md and "- **target ε**: 3" in md
    assert "- **hospitals**: 3" in md and "- **seed**: 7" in md
    assert "Each simulated patient contributes exactly one slice, so per-sample DP-SGD is per-patient" in md
    assert "- **public pre-training**: 2 rounds" in md
    assert "public ICBM152 template" in md and "costs no patient privacy" in md
    assert "| hospital 2 | 2.400 | 2.100 | 1e-05 | 38 | 2 | 3 |" in md
    assert "| **worst case** | **2.600** | **2.300** | **1e-05** | **76** | **4** | **3** |" in md
    assert "Hospital 2 ran out of budget in round 3" in md
    assert "| client-level | 4 | 1 | 0.8 | 10.000 | n/a | 1e-05 |" in md
    assert "the two are not added" in md
    assert "| hospital 0 | 0.6600 | 4 | 2.600 | 2.300 |" in md
    for png in ("privacy_epsilon.png", "privacy_client_epsilon.png", "privacy_dice_epsilon.png"):
        assert f"]({png})" in md
        assert (run / png).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_html_is_self_contained_with_valid_embedded_pngs(tmp_path: Path) -> None:
    # Prepare
    run = make_run(tmp_path)

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
    run = make_run(tmp_path)
    first = [p.read_bytes() for p in build_report(run)]

    # Execute
    second = [p.read_bytes() for p in build_report(run)]

    # Assert
    assert first == second


def test_infinite_epsilon_is_reported_not_hidden(tmp_path: Path) -> None:
    # Prepare: hospital 1 trained without noise in its last round
    rows = privacy_rows()
    rows[7][5:7] = [0.0, "inf"]
    run = make_run(tmp_path, privacy=rows)

    # Execute
    md = build_report(run)[0].read_text()

    # Assert
    assert budget_summary(load_privacy(run)).set_index("site").loc[WORST_CASE, "epsilon_rdp"] == math.inf
    assert "| hospital 1 | ∞ |" in md and "| **worst case** | **∞** |" in md
    assert "noise multiplier 0 gives no privacy" in md


def test_privacy_off_run_folder_works_and_says_so(tmp_path: Path) -> None:
    # Prepare
    run = make_run(tmp_path, mode="off", pretrain_rounds=0)

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
    assert load_privacy(run).empty and budget_summary(load_privacy(run)).empty


def test_missing_privacy_column_raises_naming_the_file_and_column(tmp_path: Path) -> None:
    # Prepare
    header = [c for c in PRIVACY_COLUMNS if c != "epsilon_prv"]
    rows = [row[:7] + row[8:] for row in privacy_rows()]
    run = make_run(tmp_path, privacy=rows, privacy_header=header)

    # Execute / Assert
    with pytest.raises(ReportError, match=r"privacy\.csv has missing column\(s\) 'epsilon_prv'"):
        build_report(run)
    with pytest.raises(ValueError, match="epsilon_prv"):
        load_privacy(run)


def test_malformed_privacy_value_names_line_column_and_value(tmp_path: Path) -> None:
    # Prepare
    rows = privacy_rows()
    rows[2][3] = "-4"
    run = make_run(tmp_path, privacy=rows)

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
    run = make_run(tmp_path)
    (run / "metrics.csv").unlink()

    # Execute / Assert
    with pytest.raises(ReportError, match="is not a folder"):
        build_report(run / "config.json")
    with pytest.raises(ReportError, match="has no metrics.csv"):
        build_report(run)


def test_privacy_mode_on_without_privacy_rows_warns_instead_of_claiming_off(tmp_path: Path) -> None:
    # Prepare: mode "sample" in config.json, but privacy.csv holds only its header
    run = make_run(tmp_path, mode="sample", privacy=[])

    # Execute
    md = build_report(run)[0].read_text()

    # Assert
    assert "**Warning: no privacy accounting was recorded.**" in md and "privacy mode 'sample'" in md
    assert "Privacy was off" not in md


def test_pretrain_epochs_as_sims_config_writes_them_are_reported(tmp_path: Path) -> None:
    # Prepare: sims.config's PrivacySpec names the key pretrain_epochs
    run = make_run(tmp_path, pretrain_rounds=0)
    record = json.loads((run / "config.json").read_text())
    record["config"]["privacy"] = {"mode": "both", "target_epsilon": TARGET, "delta": DELTA}
    record["config"]["privacy"]["pretrain_epochs"] = 1
    (run / "config.json").write_text(json.dumps(record))

    # Execute
    md = build_report(run)[0].read_text()

    # Assert
    assert "- **public pre-training**: 1 epoch\n" in md
    assert "Pre-training (1 epoch) ran on the public ICBM152 template" in md


def test_a_round_given_twice_for_one_hospital_is_rejected(tmp_path: Path) -> None:
    # Prepare
    rows = privacy_rows()
    rows.append(list(rows[1]))  # hospital 0, round 2 again
    run = make_run(tmp_path, privacy=rows)

    # Execute / Assert
    with pytest.raises(ReportError, match=r"two rows for round 2 and site '0' \(second one on line 18\)"):
        load_privacy(run)
