"""The robustness sections of the run and sweep reports, from run folders and trial records that follow
the schema the runs write (robustness.csv, metrics.csv's train_seconds rows, config.json's adv_train,
privacy and mitigation sections)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from privacy.report import ReportError, build_report
from scenarios.robustness_report import (
    ROBUSTNESS_COLUMNS,
    ROBUSTNESS_CSV,
    STRENGTH_PNG,
    SWEEP_PNG,
    Setting,
    run_section,
    setting_of,
    strength_table,
    sweep_section,
)
from server.sweep_report import build_sweep_report

STRENGTHS = {
    "noise": ("corruption", "std", (0.0, 0.02, 0.05, 0.1)),
    "blur": ("corruption", "sigma (px)", (0.0, 0.5, 1.0)),
    "fgsm": ("attack", "eps (1/255)", (0.0, 2.0, 4.0, 8.0)),
    "pgd-linf": ("attack", "eps (1/255)", (0.0, 2.0, 4.0, 8.0)),
    "pgd-l2": ("attack", "eps (L2)", (0.0, 0.5, 1.0)),
}
PATIENTS = {"0": 10, "1": 30}


def dice_at(site: str, perturbation: str, level: int, clean: float, slope: float) -> float:
    """Hospital 0 is 0.1 below hospital 1; each strength level costs ``slope`` (attacks twice that)."""
    base = clean - (0.1 if site == "0" else 0.0)
    return round(base - level * slope * (2 if STRENGTHS[perturbation][0] == "attack" else 1), 6)


def robustness_rows(clean: float = 0.8, slope: float = 0.05) -> list[list[str]]:
    """robustness.csv as rows (header first): two hospitals and their patient-weighted 'all'."""
    rows = [list(ROBUSTNESS_COLUMNS)]
    for perturbation, (family, unit, strengths) in STRENGTHS.items():
        for level, strength in enumerate(strengths):
            values = {s: dice_at(s, perturbation, level, clean, slope) for s in PATIENTS}
            values["all"] = sum(values[s] * n for s, n in PATIENTS.items()) / sum(PATIENTS.values())
            for site, value in values.items():
                n = PATIENTS.get(site, sum(PATIENTS.values()))
                rows.append(
                    [site, perturbation, family, f"{strength:g}", unit, "dice_mean", f"{value:.6f}", str(n)]
                )
    return rows


def config(adv_ratio: float = 0.0, privacy: str = "off", augment: bool = False) -> dict[str, Any]:
    return {
        "scenario": "robustness",
        "train": {"strategy": "fedavg"},
        "privacy": {"mode": privacy},
        "mitigation": {"scanner_augment": augment},
        "adv_train": {"ratio": adv_ratio, "eps": 4.0, "steps": 3},
        "robustness": {"noise": [0, 0.02, 0.05, 0.1], "attack_kinds": ["fgsm", "pgd-linf", "pgd-l2"]},
    }


def metric_rows(seconds: float) -> list[list[Any]]:
    rows: list[list[Any]] = [["round", "site", "split", "metric", "value"]]
    for rnd in (1, 2):
        rows += [[rnd, site, "test", "dice_mean", 0.7] for site in PATIENTS]
    return rows


def timing_rows(seconds: float) -> list[list[Any]]:
    """``timings.csv``: wall-clock seconds live apart from ``metrics.csv`` (which repeats to the byte)."""
    rows: list[list[Any]] = [["round", "site", "split", "metric", "value"]]
    for rnd in (1, 2):
        rows += [[rnd, site, "train", "train_seconds", seconds + int(site)] for site in PATIENTS]
    rows.append([2, "server", "scenario", "robustness_seconds", 12.5])
    return [[str(v) for v in row] for row in rows]


def write_csv(path: Path, rows: list[list[Any]]) -> None:
    with path.open("w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)


def robust_run(root: Path, rows: list[list[str]] | None = None) -> Path:
    run = root / "run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": config(0.5), "seed": 1}))
    write_csv(run / "metrics.csv", metric_rows(2.0))
    write_csv(run / "timings.csv", timing_rows(2.0))
    write_csv(run / ROBUSTNESS_CSV, rows or robustness_rows())
    return run


def metrics_of(run: Path) -> pd.DataFrame:
    from privacy.report import _load_metrics

    return _load_metrics(run)


# ---------------------------------------------------------------------------------------- a run


def test_strength_table_gives_the_weighted_dice_its_drop_and_the_worst_hospital(tmp_path: Path) -> None:
    run = robust_run(tmp_path)
    rows = pd.read_csv(run / ROBUSTNESS_CSV, dtype={"site": str})

    table = strength_table(rows).set_index(["perturbation", "strength"])

    noise = table.loc[("noise", 0.05)]  # level 2: hospital 1 at 0.7, hospital 0 at 0.6; all = (6 + 21) / 40
    assert noise["dice"] == pytest.approx(0.675)
    assert noise["drop"] == pytest.approx(0.775 - 0.675)  # clean (all) minus noise
    assert (noise["worst"], noise["worst_site"]) == (pytest.approx(0.6), "0")
    assert table.loc[("pgd-linf", 8.0), "drop"] == pytest.approx(0.3)  # attacks cost twice a level


def test_run_report_adds_the_section_with_tables_cost_and_figure(tmp_path: Path) -> None:
    run = robust_run(tmp_path)

    md_path, html_path = build_report(run)

    section = md_path.read_text().split("## Robustness", 1)[1]
    assert "**clean Dice**: 0.775 (worst hospital h0: 0.700)" in section
    assert "adv. training (50%, 4/255, 3 steps)" in section
    assert "2.50 s of training per hospital per round" in section  # (2 + 3) / 2
    assert "12.5 s" in section
    assert "| noise | 0.05 | std | 0.675 | +0.100 | 0.600 (h0) |" in section
    assert "| pgd-l2 | 1 | eps (L2) | 0.575 | +0.200 | 0.500 (h0) |" in section
    assert section.index("**Corruptions**") < section.index("**Attacks**")
    assert (run / STRENGTH_PNG).stat().st_size > 5000
    assert "Robustness</h2>" in html_path.read_text()


def test_nothing_without_robustness_csv(tmp_path: Path) -> None:
    run = robust_run(tmp_path)
    (run / ROBUSTNESS_CSV).unlink()

    assert run_section(run, metrics_of(run)) == []
    assert "Robustness" not in build_report(run)[0].read_text()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda rows: [r[:-1] for r in rows], "has no column(s) 'n'"),
        (lambda rows: [*rows[:3], [*rows[3][:6], "high", rows[3][7]], *rows[4:]],
         "line 4: column 'value' must be a number. Got 'high' instead."),
        (lambda rows: [*rows[:2], rows[2][:4], *rows[3:]], "line 3: 4 cells where the header has 8"),
        (lambda rows: [], "is empty; it must start with the header line site,perturbation"),
    ],
)  # fmt: skip
def test_a_malformed_robustness_csv_is_one_sentence_naming_it(
    tmp_path: Path, damage: Any, message: str
) -> None:
    run = robust_run(tmp_path, damage(robustness_rows()) or [[""]])

    with pytest.raises(ReportError) as caught:
        build_report(run)

    text = str(caught.value)
    assert message in text and ROBUSTNESS_CSV in text and "\n" not in text


# -------------------------------------------------------------------------------------- a sweep


def setting_rows(clean: float, slope: float) -> list[list[str]]:
    return robustness_rows(clean, slope)


def trial(name: str, seed: int, cfg: dict[str, Any], clean: float, slope: float, seconds: float,
          status: str = "completed") -> tuple[dict[str, Any], list[list[Any]]]:  # fmt: skip
    record = {
        "trial": name, "swept": {"seed": seed}, "status": status, "config": {"seed": seed},
        "run_config_json": {"config": cfg, "seed": seed},
        "tables": {ROBUSTNESS_CSV: setting_rows(clean, slope), "timings.csv": timing_rows(seconds)},
    }  # fmt: skip
    results = [[name, seed, *row] for row in metric_rows(seconds)[1:]]
    return record, results


def write_sweep(folder: Path, trials: list[tuple[dict[str, Any], list[list[Any]]]]) -> Path:
    folder.mkdir(parents=True)
    ids = [record["trial"] for record, _ in trials]
    info = {"name": "robust", "swept_keys": ["seed"], "seed_key": "seed", "trials": ids}
    (folder / "sweep.json").write_text(json.dumps(info))
    (folder / "trials.jsonl").write_text("".join(json.dumps(record) + "\n" for record, _ in trials))
    write_csv(folder / "results.csv", [["trial", "seed", "round", "site", "split", "metric", "value"]]
              + [row for _, rows in trials for row in rows])  # fmt: skip
    return folder


def robust_sweep(folder: Path) -> Path:
    """Plain FedAvg (clean 0.80 / 0.82, slope 0.10), with adversarial training (clean 0.76 / 0.78, slope
    0.05, three times the time), with scanner augmentation (slope 0.08), and a failed trial."""
    return write_sweep(folder, [
        trial("p0", 0, config(), 0.80, 0.10, 2.0),
        trial("p1", 1, config(), 0.82, 0.10, 2.0),
        trial("a0", 0, config(0.5), 0.76, 0.05, 6.0),
        trial("a1", 1, config(0.5), 0.78, 0.05, 6.0),
        trial("s0", 0, config(augment=True), 0.80, 0.08, 2.0),
        trial("f0", 0, config(privacy="sample"), 0.5, 0.1, 2.0, status="failed"),
    ])  # fmt: skip


def test_setting_labels_name_adversarial_training_privacy_and_augmentation() -> None:
    assert setting_of(config()).label == "FedAvg"
    assert setting_of(config(0.5, "sample", True)).label == (
        "FedAvg + adv. training (50%, 4/255, 3 steps) + DP-SGD + scanner augment"
    )
    assert setting_of(config(0.5)).without(adversarial=True) == Setting()


def test_sweep_section_aggregates_over_seeds_and_computes_the_effects(tmp_path: Path) -> None:
    folder = robust_sweep(tmp_path / "sweep")
    records = {r["trial"]: r for r in map(json.loads, (folder / "trials.jsonl").read_text().splitlines())}
    results = pd.read_csv(folder / "results.csv", dtype={"site": str, "trial": str})

    blocks = sweep_section(folder, records, results, "seed")

    text = "\n".join(str(b) for b in blocks)
    # FedAvg: the 'all' rows sit 0.025 below the hospital-1 clean; PGD 4/255 is level 2, attacks twice a level.
    plain_clean, adv_clean = (0.775 + 0.795) / 2, (0.735 + 0.755) / 2
    plain_pgd, adv_pgd = plain_clean - 0.4, adv_clean - 0.2
    assert f"{plain_clean:.3f} ± 0.014" in text and f"{plain_pgd:.3f} ± 0.014" in text
    gain, cost = adv_pgd - plain_pgd, plain_clean - adv_clean
    assert f"raised the PGD-L∞ 4/255 Dice by {gain:+.3f} for a clean-Dice cost of {cost:+.3f}" in text
    assert "at 2.60× the training time per round" in text  # (6 + 7) / 2 against (2 + 3) / 2
    assert "changed the noise drop from 0.200 to 0.160" in text  # 2 levels x 0.10 against 2 x 0.08
    tidy = pd.read_csv(folder / ROBUSTNESS_CSV, dtype={"site": str})
    assert list(tidy.columns) == ["trial", "setting", "seed", *ROBUSTNESS_COLUMNS]
    assert set(tidy["site"]) == {"all"} and set(tidy["trial"]) == {
        "p0",
        "p1",
        "a0",
        "a1",
        "s0",
    }  # failed left out
    assert set(tidy.loc[tidy["trial"] == "s0", "setting"]) == {"FedAvg + scanner augment"}


def test_sweep_report_adds_the_section_and_figure(tmp_path: Path) -> None:
    folder = robust_sweep(tmp_path / "sweep")

    md_path, _ = build_sweep_report(folder)

    assert "## Robustness" in md_path.read_text()
    assert (folder / SWEEP_PNG).stat().st_size > 5000


def test_sweep_without_robustness_tables_has_no_section(tmp_path: Path) -> None:
    record, results = trial("p0", 0, config(), 0.8, 0.1, 2.0)
    del record["tables"]
    folder = write_sweep(tmp_path / "sweep", [(record, results)])
    (folder / SWEEP_PNG).write_bytes(b"old")

    markdown = build_sweep_report(folder)[0].read_text()

    assert "Robustness" not in markdown
    assert not (folder / ROBUSTNESS_CSV).exists() and not (folder / SWEEP_PNG).exists()


def test_a_malformed_trial_table_names_the_trial(tmp_path: Path) -> None:
    record, results = trial("p0", 0, config(), 0.8, 0.1, 2.0)
    record["tables"][ROBUSTNESS_CSV][2][6] = "lots"
    folder = write_sweep(tmp_path / "sweep", [(record, results)])

    with pytest.raises(ReportError, match=r"^trials.jsonl, trial p0, robustness.csv, line 3: column 'value' must "
                                          r"be a number. Got 'lots' instead.$"):  # fmt: skip
        build_sweep_report(folder)
