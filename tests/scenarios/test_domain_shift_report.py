"""Domain-shift outputs: the tidy domain_shift.csv (with each test hospital's scanner), fairness (mean, worst hospital, spread, per-class
worst), the train-unseen gap per unseen severity with AdaBN and fine-tuning, forgetting of a late joiner, the local models' site-by-site matrix,
seeds aggregated with the sample std, and the sections the run and sweep reports add only when a
run is a domain-shift run. Run folders are written by the server's own writers (RunOutputs)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from privacy.report import ReportError, build_report
from scenarios.domain_shift_report import DROP_PNG, LATE_PNG, MATRIX_PNG, SWEEP_FIGURES
from scenarios.domain_shift_tables import (
    COLUMNS,
    DOMAIN_SHIFT_CSV,
    domain_shift_rows,
    fairness,
    gap_table,
    late_join,
    load_run,
    local_matrix,
    over_seeds,
    setting_label,
    severity_gaps,
    shift_drop,
    sweep_rows,
    write_domain_shift,
)
from server.outputs import MetricRow, RunOutputs
from server.sweep_report import build_sweep_report
from sims.config import config_from_run_config

CLASSES = ("csf", "grey_matter", "white_matter")
# Final-round dice_mean; earlier rounds are lower by 0.1 a round. Hospitals 0-2 train, 3-4 are unseen.
TRAIN = {0: 0.80, 1: 0.70, 2: 0.75}
UNSEEN = {3: 0.60, 4: 0.50}
# Final-round per-class Dice (csf, grey_matter, white_matter).
PER_CLASS = {
    0: (0.70, 0.85, 0.85), 1: (0.50, 0.90, 0.70), 2: (0.65, 0.80, 0.80),
    3: (0.40, 0.70, 0.70), 4: (0.30, 0.60, 0.60), 5: (0.20, 0.50, 0.50), 6: (0.10, 0.40, 0.40),
}  # fmt: skip
DISTANCE = {0: 0.01, 1: 0.02, 2: 0.03, 3: 0.10, 4: 0.20, 5: 0.30, 6: 0.40}
ROUNDS = 3


def role(site: int, kind: str = "train", join_round: int | None = None, noise: float = 0.0,
         severity: float = 1.0) -> dict[str, Any]:  # fmt: skip
    """A config.json role; unseen hospitals at the world's severity (1) unless told, as site_roles
    gives them without shift.unseen-severities."""
    return {
        "site": site, "role": kind, "archetype": ["noisy", "blurry", "bias_contrast", "ringing_spikes"][site % 4],
        "severity": 1.0 if kind == "train" else severity,
        "join_round": (1 if kind == "train" else 0) if join_round is None else join_round,
        "label_noise_rate": noise,
    }  # fmt: skip


def write_run(
    root: Path,
    rows: list[tuple[int, str, str, str, float]],
    *,
    roles: list[dict[str, Any]] | None,
    run_config: dict[str, Any] | None = None,
    seed: int = 3,
) -> Path:
    """A run folder written by RunOutputs: config.json (FedscanConfig.to_dict(), seed, roles) and metrics.csv."""
    config = config_from_run_config({"seed": seed, **(run_config or {})})
    outputs = RunOutputs.create(root, "ds")
    extra: dict[str, Any] = {"seed": seed, "num_hospitals": len(roles or [])}
    if roles is not None:
        extra["roles"] = roles
    outputs.write_config(config.to_dict(), **extra)
    outputs.add(MetricRow(*row) for row in rows)
    return outputs.run_dir


def shift_metrics(
    train: dict[int, float] = TRAIN, unseen: dict[int, float] = UNSEEN, *, rounds: int = ROUNDS
) -> list[tuple[int, str, str, str, float]]:
    """metrics.csv rows of a fedavg domain-shift run: test and unseen every round (plus their global
    rows, train loss and the server's public rows, which the tables must leave out), shift at round 0."""
    rows: list[tuple[int, str, str, str, float]] = [(0, str(s), "shift", "histogram_distance", d)
                                                    for s, d in DISTANCE.items() if s in {**train, **unseen}]
    for r in range(1, rounds + 1):
        lower = 0.1 * (rounds - r)
        for split, sites in (("test", train), ("unseen", unseen)):
            for site, final in sites.items():
                rows.append((r, str(site), split, "dice_mean", final - lower))
                for name, value in zip(CLASSES, PER_CLASS[site], strict=True):
                    rows.append((r, str(site), split, f"dice_{name}", value - lower))
            if sites:
                rows.append((r, "global", split, "dice_mean", 0.99))
        rows += [(r, "0", "train", "train_loss", 0.3), (r, "global", "public", "dice_mean", 0.42)]
    return rows


FEDAVG = {"scenario": "domain_shift", "shift.unseen-hospitals": 2, "num-server-rounds": ROUNDS}


def shift_run(root: Path, **kwargs: Any) -> Path:
    roles = [role(0), role(1), role(2), role(3, "unseen"), role(4, "unseen")]
    return write_run(root, shift_metrics(), roles=roles, run_config=FEDAVG, **kwargs)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------------- tidy table


def test_csv_has_the_columns_and_one_row_per_hospital_split_round_metric(tmp_path: Path) -> None:
    run = shift_run(tmp_path)

    path = write_domain_shift(run)

    rows = read_csv(path)
    assert tuple(rows[0]) == COLUMNS
    # test: 3 hospitals x 3 rounds x 4 metrics; unseen: 2 x 3 x 4; shift: 5 hospitals at round 0.
    assert len(rows) == 36 + 24 + 5
    assert {r["split"] for r in rows} == {"test", "unseen", "shift"}
    assert all(r["test_hospital"].isdigit() for r in rows)  # no global rows
    first = rows[0]
    assert (first["setting"], first["strategy"], first["mitigation"], first["seed"]) == ("fedavg", "fedavg", "none", "3")
    assert {(r["test_hospital"], r["test_role"], r["test_archetype"], r["test_severity"]) for r in rows} == {
        ("0", "train", "noisy", "1.0"), ("1", "train", "blurry", "1.0"), ("2", "train", "bias_contrast", "1.0"),
        ("3", "unseen", "ringing_spikes", "1.0"), ("4", "unseen", "noisy", "1.0"),
    }  # fmt: skip
    assert {r["train_hospital"] for r in rows} == {"federation"}
    final = [r for r in rows if r["split"] == "unseen" and r["round"] == "3" and r["metric"] == "dice_mean"]
    assert {r["test_hospital"]: float(r["value"]) for r in final} == {"3": 0.60, "4": 0.50}


def test_fairness_gives_mean_worst_hospital_spread_and_per_class_worst(tmp_path: Path) -> None:
    rows = domain_shift_rows(shift_run(tmp_path))

    fair = fairness(rows).set_index("view")

    test, unseen = fair.loc["test"], fair.loc["unseen"]
    assert test["n_hospitals"] == 3 and unseen["n_hospitals"] == 2
    assert test["dice_mean"] == pytest.approx(0.75)
    assert (test["dice_worst"], test["worst_hospital"]) == (pytest.approx(0.70), 1)
    assert test["dice_spread"] == pytest.approx(0.10)
    assert (unseen["dice_worst"], unseen["worst_hospital"]) == (pytest.approx(0.50), 4)
    assert test["csf_mean"] == pytest.approx((0.70 + 0.50 + 0.65) / 3)
    assert test["csf_worst"] == pytest.approx(0.50)
    assert test["grey_matter_worst"] == pytest.approx(0.80)
    assert unseen["white_matter_worst"] == pytest.approx(0.60)

    gap = gap_table(fairness(rows)).iloc[0]
    assert gap["gap"] == pytest.approx(0.75 - 0.55)
    assert (gap["unseen_worst_hospital"], gap["unseen_spread"]) == (4, pytest.approx(0.10))


def test_shift_drop_is_the_training_mean_minus_the_hospital(tmp_path: Path) -> None:
    rows = domain_shift_rows(shift_run(tmp_path))

    drop = shift_drop(rows).set_index("test_hospital")

    assert drop.loc[3, "distance"] == pytest.approx(0.10)
    assert drop.loc[3, "drop"] == pytest.approx(0.75 - 0.60)
    assert drop.loc[4, "drop"] == pytest.approx(0.25)
    assert drop.loc[0, "drop"] == pytest.approx(-0.05)
    assert list(drop["test_role"]) == ["train", "train", "train", "unseen", "unseen"]


def test_late_joiner_curve_and_forgetting(tmp_path: Path) -> None:
    # Hospital 2 trains from round 3; the originals (0, 1) average 0.70 in round 2 and 0.66 at the end.
    originals = {0: [0.50, 0.70, 0.60, 0.62, 0.64], 1: [0.50, 0.70, 0.70, 0.66, 0.68]}
    late = [0.20, 0.25, 0.40, 0.60, 0.70]
    metrics = [(r + 1, str(s), "test", "dice_mean", v) for s, vs in {**originals, 2: late}.items()
               for r, v in enumerate(vs)]  # fmt: skip
    run = write_run(tmp_path, metrics, roles=[role(0), role(1), role(2, join_round=3)],
                    run_config={"num-server-rounds": 5, "shift.late-join-round": 3})  # fmt: skip

    rows = domain_shift_rows(run)
    curve = late_join(rows, 2, 3)

    assert set(rows["test_role"]) == {"train", "late"}
    assert rows["setting"].iloc[0] == "fedavg · late@3"
    assert curve.originals.to_dict() == pytest.approx({1: 0.5, 2: 0.7, 3: 0.65, 4: 0.64, 5: 0.66})
    assert curve.forgetting == pytest.approx(0.70 - 0.66)
    assert (curve.late_before, curve.late_final) == (pytest.approx(0.25), pytest.approx(0.70))

    markdown = build_report(run)[0].read_text()
    assert "**Forgetting**" in markdown and "= +0.040" in markdown
    assert (run / LATE_PNG).stat().st_size > 1000


def local_metrics() -> list[tuple[int, str, str, str, float]]:
    """Strategy local: hospitals 0-2 train their own models (test = own model), 3 is unseen; at the
    final round model-i is evaluated at every other hospital: 0.5 + 0.1 i - 0.05 j."""
    rows = []
    for r in (1, 2):
        for i in range(3):
            rows.append((r, str(i), "test", "dice_mean", 0.9 - 0.1 * i - (0.2 if r == 1 else 0.0)))
    for i in range(3):
        for j in range(4):
            if i != j:
                rows.append((2, str(j), f"model-{i}", "dice_mean", 0.5 + 0.1 * i - 0.05 * j))
    return rows


def test_local_models_give_the_site_by_site_matrix(tmp_path: Path) -> None:
    run = write_run(tmp_path, local_metrics(), roles=[role(0), role(1), role(2), role(3, "unseen")],
                    run_config={"strategy": "local", "num-server-rounds": 2, "shift.unseen-hospitals": 1})  # fmt: skip

    rows = domain_shift_rows(run)
    matrix = local_matrix(rows)

    assert len(rows) == 6 + 9  # own test rows of 2 rounds, and 3 models x 3 other hospitals
    models = rows[rows["split"].str.startswith("model-")]
    assert set(models["train_hospital"]) == {"hospital-0", "hospital-1", "hospital-2"}
    assert set(rows.loc[rows["split"] == "test", "train_hospital"]) == {"hospital-0", "hospital-1", "hospital-2"}
    assert matrix.shape == (3, 4)
    assert matrix.loc[1, 3] == pytest.approx(0.5 + 0.1 - 0.15)
    assert [matrix.loc[i, i] for i in range(3)] == pytest.approx([0.9, 0.8, 0.7])  # own test split, final round
    # No shared model: the unseen hospital's Dice is the mean over the local models at it.
    unseen = fairness(rows).set_index("view").loc["unseen"]
    assert bool(unseen["derived"]) and unseen["dice_mean"] == pytest.approx(0.5 + 0.1 - 0.15)

    markdown = build_report(run)[0].read_text()
    assert "mean over local models" in markdown
    assert (run / MATRIX_PNG).stat().st_size > 1000


def test_setting_label_names_the_non_default_settings() -> None:
    config = config_from_run_config({
        "strategy": "fedbn", "norm": "batch", "mitigation.standardize": "histogram",
        "mitigation.scanner-augment": True, "mitigation.tta": "adabn", "shift.late-join-round": 5,
        "shift.label-noise-hospital": 0, "shift.label-noise-rate": 0.5, "shift.holdout-archetype": "blurry",
    }).to_dict()  # fmt: skip

    label = setting_label(config)

    assert label == "fedbn(batch) · histogram+augment+adabn · late@5 · noise h0 50% · loso:blurry"
    assert setting_label(config_from_run_config({}).to_dict()) == "fedavg"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda run: (run / "metrics.csv").unlink(), "has no metrics.csv"),
        (lambda run: (run / "config.json").unlink(), "has no config.json"),
        (lambda run: (run / "config.json").write_text("{not json"), "config.json is not readable JSON"),
        (lambda run: (run / "config.json").write_text('{"config": {}, "roles": [{"site": -1, "role": "train"}]}'),
         "roles[0] must be an object with an integer 'site' >= 0"),
        (lambda run: (run / "metrics.csv").write_text("round,site,split,metric,value\n1,0,test,dice_mean,high\n"),
         "column 'value' must be a number. Got 'high' instead."),
    ],
)  # fmt: skip
def test_a_missing_or_garbled_file_is_one_sentence(tmp_path: Path, damage: Any, message: str) -> None:
    run = shift_run(tmp_path)
    damage(run)

    with pytest.raises(ReportError, match=None) as caught:
        domain_shift_rows(run)

    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_roles_missing_from_config_are_derived_from_the_metrics(tmp_path: Path) -> None:
    run = write_run(tmp_path, shift_metrics(), roles=None, run_config=FEDAVG)

    _, info = load_run(run)

    assert info.roles_source == "derived from metrics.csv"
    assert [(r.site, r.test_role) for r in info.roles] == [(0, "train"), (1, "train"), (2, "train"),
                                                           (3, "unseen"), (4, "unseen")]  # fmt: skip
    rows = domain_shift_rows(run)  # the scanner is unknown: an empty severity cell, one severity group
    assert set(rows["test_archetype"]) == {"unknown"} and rows["test_severity"].isna().all()
    gaps = severity_gaps(rows)
    assert len(gaps) == 1 and math.isnan(gaps["severity"].iloc[0])
    assert gaps["gap"].iloc[0] == pytest.approx(0.75 - 0.55)


# ----------------------------------------------------------------------------------- run report


def test_run_report_adds_the_section_and_writes_the_csv(tmp_path: Path) -> None:
    run = shift_run(tmp_path)

    md_path, html_path = build_report(run)

    markdown = md_path.read_text()
    section = markdown[markdown.index("## Domain shift"):]
    assert "| training hospitals | 3 | 0.750 | 0.700 (h1) | 0.100 | – |" in section
    assert "| unseen hospitals | 2 | 0.550 | 0.500 (h4) | 0.100 | 0.200 |" in section
    assert "| training hospitals | 0.617 / 0.500 | 0.850 / 0.800 | 0.783 / 0.700 |" in section  # per class
    assert "| h4 | unseen | noisy | 1 | never | 0.500 | 0.2000 | +0.250 |" in section
    assert (run / DROP_PNG).stat().st_size > 1000
    assert len(read_csv(run / DOMAIN_SHIFT_CSV)) == 65
    assert "Domain shift</h2>" in html_path.read_text()


def test_run_report_without_the_scenario_is_unchanged(tmp_path: Path) -> None:
    metrics = [r for r in shift_metrics(unseen={}) if r[2] != "shift"]
    run = write_run(tmp_path, metrics, roles=[role(0), role(1), role(2)], run_config={"num-server-rounds": ROUNDS})

    markdown = build_report(run)[0].read_text()

    assert "Domain shift" not in markdown
    assert not (run / DOMAIN_SHIFT_CSV).exists() and not (run / DROP_PNG).exists()


# --------------------------------------------------------------------------------- sweep report


def sweep_trial(trial: str, strategy: str, seed: int, train: dict[int, float], unseen: dict[int, float],
                *, own_config: bool = True) -> tuple[dict[str, Any], list[list[Any]]]:  # fmt: skip
    """A trials.jsonl record (with the run's config.json as run_config_json, or without it) and its
    results.csv rows."""
    flat = {**FEDAVG, "strategy": strategy, "seed": seed}
    record: dict[str, Any] = {
        "trial": trial, "swept": {"strategy": strategy, "seed": seed}, "status": "completed", "config": flat,
        "federation": {"num-supernodes": 5}, "run_dir": f"/runs/{trial}",
    }
    if own_config:
        roles = [role(s) for s in train] + [role(s, "unseen") for s in unseen]
        config = config_from_run_config(flat).to_dict()
        record["run_config_json"] = {"config": config, "seed": seed, "num_hospitals": 5, "roles": roles}
    rows = [[trial, strategy, seed, *row] for row in shift_metrics(train, unseen, rounds=2)]
    return record, rows


def write_sweep(folder: Path, trials: list[tuple[dict[str, Any], list[list[Any]]]]) -> Path:
    folder.mkdir(parents=True)
    ids = [record["trial"] for record, _ in trials]
    info = {"name": "ds", "swept_keys": ["strategy", "seed"], "seed_key": "seed", "trials": ids}
    (folder / "sweep.json").write_text(json.dumps(info))
    (folder / "trials.jsonl").write_text("".join(json.dumps(record) + "\n" for record, _ in trials))
    with (folder / "results.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trial", "strategy", "seed", "round", "site", "split", "metric", "value"])
        for _, rows in trials:
            writer.writerows(rows)
    return folder


def shift_sweep(folder: Path) -> Path:
    """fedavg: training means 0.75, 0.70, 0.80 and unseen means 0.55, 0.45, 0.50 over seeds 0-2 (seed 2
    without its config.json in trials.jsonl); fedprox: one seed."""
    fedavg = [({0: 0.80, 1: 0.70, 2: 0.75}, {3: 0.60, 4: 0.50}),
              ({0: 0.75, 1: 0.65, 2: 0.70}, {3: 0.50, 4: 0.40}),
              ({0: 0.85, 1: 0.75, 2: 0.80}, {3: 0.45, 4: 0.55})]  # fmt: skip
    trials = [sweep_trial(f"a{s}", "fedavg", s, *fedavg[s], own_config=s < 2) for s in range(3)]
    trials.append(sweep_trial("b0", "fedprox", 0, {0: 0.8, 1: 0.8, 2: 0.8}, {3: 0.7, 4: 0.7}))
    return write_sweep(folder, trials)


def test_sweep_rows_carry_the_trial_and_seed_and_aggregate_with_the_sample_std(tmp_path: Path) -> None:
    folder = shift_sweep(tmp_path / "sweep")
    trials = [json.loads(line) for line in (folder / "trials.jsonl").read_text().splitlines()]
    results = pd.read_csv(folder / "results.csv", dtype={"site": str})

    rows, infos = sweep_rows({t["trial"]: t for t in trials}, results, "seed")
    gaps = gap_table(fairness(rows))
    stats = over_seeds(gaps, ("train_dice", "unseen_dice", "gap")).set_index("setting")

    assert list(rows.columns) == ["trial", *COLUMNS]
    assert len(rows) == 4 * (24 + 16 + 5)  # 2 rounds: test 3 x 2 x 4, unseen 2 x 2 x 4, shift 5
    # The trial without its config.json gets its roles from the run config (or, failing that, metrics).
    assert infos["a2"].roles_source != "config.json"
    assert set(rows.loc[rows["trial"] == "a2", "test_role"]) == {"train", "unseen"}
    assert sorted(rows.loc[rows["trial"] == "a2", "seed"].unique()) == [2]
    fedavg = stats.loc["fedavg"]
    assert fedavg["n_seeds"] == 3
    assert fedavg["train_dice_mean"] == pytest.approx(0.75)
    assert fedavg["train_dice_std"] == pytest.approx(0.05)
    assert fedavg["unseen_dice_mean"] == pytest.approx(0.50)
    assert fedavg["gap_mean"] == pytest.approx(0.25) and fedavg["gap_std"] == pytest.approx(0.05)
    assert stats.loc["fedprox", "n_seeds"] == 1 and math.isnan(stats.loc["fedprox", "gap_std"])


def test_sweep_report_adds_the_section_and_the_csv(tmp_path: Path) -> None:
    folder = shift_sweep(tmp_path / "sweep")

    md_path, html_path = build_sweep_report(folder)

    markdown = md_path.read_text()
    section = markdown[markdown.index("## Domain shift"):markdown.index("## Trials")]
    # One severity: one group of unseen columns, in one table.
    assert "| setting | seeds | training Dice | unseen Dice | gap | worst unseen |" in section
    assert "| fedavg | 3 | 0.750 ± 0.050 | 0.500 ± 0.050 | 0.250 ± 0.050 | 0.450 ± 0.050, h4 (2/3) |" in section
    assert "| fedprox | 1 | 0.800 ± – | 0.700 ± – | 0.100 ± – | 0.700 ± –, h3 (1/1) |" in section
    assert "sev 2" not in section and "TTA" not in section and "fine-tuned" not in section
    assert "### Fairness" in section
    table = read_csv(folder / DOMAIN_SHIFT_CSV)
    assert list(table[0]) == ["trial", *COLUMNS] and len(table) == 4 * 45
    for name in ("sweep_domain_shift_heatmap.png", "sweep_domain_shift_bars.png", "sweep_domain_shift_drop.png"):
        assert name in SWEEP_FIGURES and (folder / name).stat().st_size > 1000
    assert "Domain shift</h2>" in html_path.read_text()


def test_sweep_heatmap_holds_the_mean_over_seeds_and_the_local_matrix(tmp_path: Path) -> None:
    from scenarios.domain_shift_report import _sweep_heatmap

    folder = shift_sweep(tmp_path / "sweep")
    trials = {t["trial"]: t for t in map(json.loads, (folder / "trials.jsonl").read_text().splitlines())}
    results = pd.read_csv(folder / "results.csv", dtype={"site": str})
    rows, _ = sweep_rows(trials, results, "seed")
    local_run = write_run(tmp_path, local_metrics(), roles=[role(0), role(1), role(2), role(3, "unseen")],
                          run_config={"strategy": "local", "num-server-rounds": 2, "shift.unseen-hospitals": 1})
    local = domain_shift_rows(local_run).assign(trial="l0")  # fmt: skip

    heat, roles = _sweep_heatmap(pd.concat([rows, local], ignore_index=True))

    assert heat.loc["fedavg", 0] == pytest.approx((0.80 + 0.75 + 0.85) / 3)
    assert heat.loc["fedavg", 4] == pytest.approx((0.50 + 0.40 + 0.55) / 3)
    assert heat.loc["local: model of h1", 3] == pytest.approx(0.45)
    assert heat.loc["local: model of h2", 2] == pytest.approx(0.7)
    assert roles[0] == "train" and roles[4] == "unseen"


def test_sweep_report_without_the_scenario_has_no_section(tmp_path: Path) -> None:
    record, rows = sweep_trial("a0", "fedavg", 0, TRAIN, {})
    record["config"]["scenario"] = "none"
    record["run_config_json"]["config"]["scenario"] = "none"
    folder = write_sweep(tmp_path / "sweep", [(record, [r for r in rows if r[5] != "shift"])])

    markdown = build_sweep_report(folder)[0].read_text()

    assert "Domain shift" not in markdown and not (folder / DOMAIN_SHIFT_CSV).exists()


def test_sweep_late_joiner_forgetting_is_averaged_over_seeds(tmp_path: Path) -> None:
    # Originals' mean Dice in round 2 minus round 4: 0.04 with seed 0, 0.06 with seed 1.
    trials = []
    for seed, end in ((0, 0.66), (1, 0.64)):
        metrics = [(r, str(s), "test", "dice_mean", v) for s in (0, 1)
                   for r, v in ((1, 0.5), (2, 0.7), (3, 0.68), (4, end))]  # fmt: skip
        metrics += [(r, "2", "test", "dice_mean", v) for r, v in ((1, 0.2), (2, 0.25), (3, 0.5), (4, 0.6))]
        flat = {"scenario": "domain_shift", "num-server-rounds": 4, "shift.late-join-round": 3, "seed": seed}
        record = {
            "trial": f"l{seed}", "swept": {"strategy": "fedavg", "seed": seed}, "status": "completed",
            "config": flat, "federation": {"num-supernodes": 3},
            "run_config_json": {"config": config_from_run_config(flat).to_dict(), "seed": seed,
                                "roles": [role(0), role(1), role(2, join_round=3)]},
        }  # fmt: skip
        trials.append((record, [[f"l{seed}", "fedavg", seed, *row] for row in metrics]))
    folder = write_sweep(tmp_path / "sweep", trials)

    markdown = build_sweep_report(folder)[0].read_text()

    assert "hospital 2 joins in round 3; forgetting" in markdown
    assert "+0.050 ± 0.014 over 2 seeds" in markdown
    assert (folder / "sweep_domain_shift_late_join.png").stat().st_size > 1000


# ------------------------------------------------------------------ unseen severities, AdaBN, fine-tuning

SEVERITY = {3: 2.0, 4: 2.0, 5: 3.0, 6: 3.0}
TWO_SEVERITIES = {**FEDAVG, "shift.unseen-hospitals": 4, "shift.unseen-severities": "2,3"}


def severity_metrics(unseen: dict[int, float], tta_gain: dict[int, float]) -> list[tuple[int, str, str, str, float]]:
    """Training hospitals as TRAIN (0.75 on average), four unseen hospitals at severities 2 and 3, AdaBN
    rows (unseen-tta) where ``tta_gain`` names the hospital, fine-tuned rows 0.01 above the training ones."""
    rows = shift_metrics(TRAIN, unseen)
    rows += [(ROUNDS, str(s), "unseen-tta", "dice_mean", unseen[s] + g) for s, g in tta_gain.items()]
    rows += [(ROUNDS, str(s), "finetuned", "dice_mean", v + 0.01) for s, v in TRAIN.items()]
    return rows


def severity_roles() -> list[dict[str, Any]]:
    return [role(0), role(1), role(2), *(role(s, "unseen", severity=v) for s, v in SEVERITY.items())]


def test_unseen_hospitals_are_reported_per_severity_with_the_adabn_gain(tmp_path: Path) -> None:
    # Severity 2: h3 0.60, h4 0.50; severity 3: h5 0.40, h6 0.30. AdaBN at h3 +0.02, h4 +0.04, h6 +0.09
    # (none at h5: the gain pairs hospitals, 0.09 at severity 3, not 0.39 - 0.35).
    metrics = severity_metrics({3: 0.60, 4: 0.50, 5: 0.40, 6: 0.30}, {3: 0.02, 4: 0.04, 6: 0.09})
    run = write_run(tmp_path, metrics, roles=severity_roles(), run_config=TWO_SEVERITIES)

    gaps = severity_gaps(domain_shift_rows(run)).set_index("severity")
    markdown = build_report(run)[0].read_text()

    assert list(gaps.index) == [2.0, 3.0] and list(gaps["n_unseen"]) == [2, 2]
    assert gaps["train_dice"].tolist() == pytest.approx([0.75, 0.75])
    assert gaps["finetuned_dice"].tolist() == pytest.approx([0.76, 0.76])
    assert gaps["unseen_dice"].tolist() == pytest.approx([0.55, 0.35])
    assert gaps["gap"].tolist() == pytest.approx([0.20, 0.40])
    assert gaps["unseen_worst"].tolist() == pytest.approx([0.50, 0.30])
    assert gaps["unseen_worst_hospital"].tolist() == [4, 6]
    assert gaps["tta_dice"].tolist() == pytest.approx([0.58, 0.39])
    assert gaps["tta_worst_hospital"].tolist() == [4, 6]
    assert gaps["tta_gain"].tolist() == pytest.approx([0.03, 0.09])
    section = markdown[markdown.index("## Domain shift"):]
    assert "| unseen hospitals, severity 2 | 2 | 0.550 | 0.500 (h4) | 0.100 | 0.200 |" in section
    assert "| unseen hospitals, severity 3 | 2 | 0.350 | 0.300 (h6) | 0.100 | 0.400 |" in section
    assert "| unseen hospitals after TTA, severity 2 | 2 | 0.580 | 0.540 (h4) | 0.080 | 0.170 |" in section
    assert "| unseen hospitals after TTA, severity 3 | 1 | 0.390 | 0.390 (h6) | 0.000 | 0.360 |" in section
    assert "| training hospitals after fine-tuning | 3 | 0.760 | 0.710 (h1) | 0.100 | – |" in section
    assert "| unseen hospitals |" not in section  # replaced by the rows per severity
    assert "mean over the hospitals): severity 2 +0.030, severity 3 +0.090." in section


def test_sweep_table_has_a_group_per_severity_with_adabn_and_fine_tuning(tmp_path: Path) -> None:
    # Seed 1: every unseen hospital 0.10 lower than seed 0; AdaBN gains 0.05 (sev 2) and 0.06 (sev 3).
    trials = []
    for seed, unseen, gain in ((0, {3: 0.60, 4: 0.50, 5: 0.40, 6: 0.30}, {3: 0.02, 4: 0.04, 6: 0.09}),
                               (1, {3: 0.50, 4: 0.40, 5: 0.30, 6: 0.20}, {3: 0.04, 4: 0.06, 5: 0.05, 6: 0.07})):
        flat = {**TWO_SEVERITIES, "seed": seed}
        record = {
            "trial": f"s{seed}", "swept": {"strategy": "fedavg", "seed": seed}, "status": "completed",
            "config": flat, "federation": {"num-supernodes": 7},
            "run_config_json": {"config": config_from_run_config(flat).to_dict(), "seed": seed,
                                "roles": severity_roles()},
        }  # fmt: skip
        trials.append((record, [[f"s{seed}", "fedavg", seed, *row] for row in severity_metrics(unseen, gain)]))
    folder = write_sweep(tmp_path / "sweep", trials)

    markdown = build_sweep_report(folder)[0].read_text()

    section = markdown[markdown.index("## Domain shift"):markdown.index("### Fairness")]
    # Too wide for one table: training and gaps; worst; AdaBN and fine-tuning (each within the page).
    assert ("| setting | seeds | training Dice | unseen sev 2 Dice | gap sev 2 | unseen sev 3 Dice | gap sev 3 |\n"
            "|---|---|---|---|---|---|---|\n"
            "| fedavg · unseen sev 2/3 | 2 | 0.750 ± 0.000 | 0.500 ± 0.071 | 0.250 ± 0.071 | 0.300 ± 0.071 | "
            "0.450 ± 0.071 |") in section  # fmt: skip
    assert ("| setting | worst sev 2 | worst sev 3 |\n|---|---|---|\n"
            "| fedavg · unseen sev 2/3 | 0.450 ± 0.071, h4 (2/2) | 0.250 ± 0.071, h6 (2/2) |") in section  # fmt: skip
    assert ("| setting | TTA sev 2 Dice | TTA gain sev 2 | TTA sev 3 Dice | TTA gain sev 3 | "
            "fine-tuned training Dice |\n|---|---|---|---|---|---|\n"
            "| fedavg · unseen sev 2/3 | 0.540 ± 0.057 | +0.040 ± 0.014 | 0.350 ± 0.057 | +0.075 ± 0.021 | "
            "0.760 ± 0.000 |") in section  # fmt: skip
    assert "| fedavg · unseen sev 2/3 | unseen hospitals after TTA, severity 3 | 2 | 0.350 ± 0.057 |" in markdown
    assert (folder / "sweep_domain_shift_bars.png").stat().st_size > 1000
