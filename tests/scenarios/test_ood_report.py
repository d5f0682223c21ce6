"""The OOD sections of the run and sweep reports, from run folders and trial records that follow the
schema the runs write: ood.csv computed with scenarios.ood from per-image scores, ood_scores.csv the
scores themselves."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from privacy.report import ReportError, _load_metrics, _Table, build_report
from scenarios.ood import accept_threshold, ood_metrics
from scenarios.ood_report import (
    COVERAGE_PNG,
    OOD_COLUMNS,
    OOD_CSV,
    OOD_SCORES_CSV,
    ROC_PNG,
    best_methods,
    run_section,
    selective_table,
    sweep_section,
)
from server.sweep_report import build_sweep_report

METHODS = ("msp/foreground", "energy/foreground", "mahalanobis/global")
# How far each method pushes each set's scores above the in-distribution ones (in-distribution: uniform
# in [0, 1)): the best method differs by set.
SHIFT = {
    "noise": ("near", {"msp/foreground": 0.9, "energy/foreground": 0.5, "mahalanobis/global": 0.2}),
    "blur": ("near", {"msp/foreground": 0.3, "energy/foreground": 0.8, "mahalanobis/global": 0.4}),
    "near-mixed": ("near", {"msp/foreground": 0.6, "energy/foreground": 0.7, "mahalanobis/global": 0.3}),
    "shapes": ("far", {"msp/foreground": 0.6, "energy/foreground": 0.7, "mahalanobis/global": 1.2}),
}
N = 20  # images per hospital and set


def scores_rows(scale: float = 1.0) -> list[list[Any]]:
    """ood_scores.csv: two hospitals, N in-distribution images each (Dice 0.85 falling with the score) and
    N images per OOD set (near-mixed with Dice 0.5; sets without labels with an empty Dice)."""
    rows: list[list[Any]] = [["site", "ood_set", "kind", "image", "method", "score", "dice"]]
    base = (np.arange(N) + 0.5) / N
    for site in ("0", "1"):
        for method in METHODS:
            for i, score in enumerate(base):
                rows.append([site, "in", "in", i, method, f"{score:.6f}", f"{0.85 - 0.05 * score:.6f}"])
            for ood_set, (kind, shifts) in SHIFT.items():
                for i, score in enumerate(base):
                    dice = f"{0.5:.6f}" if ood_set == "near-mixed" else ""
                    rows.append(
                        [site, ood_set, kind, i, method, f"{score + shifts[method] * scale:.6f}", dice]
                    )
    return rows


def ood_rows(scores: pd.DataFrame, tpr: float = 0.95) -> list[list[Any]]:
    """ood.csv as the runs compute it from ood_scores.csv (scenarios.ood's metrics; selective figures
    for near-mixed at the threshold accepting `tpr` of the in-distribution images)."""
    rows: list[list[Any]] = [list(OOD_COLUMNS)]
    inside = scores[scores["ood_set"] == "in"]
    for ood_set, (kind, _) in SHIFT.items():
        for method in METHODS:
            s_in = inside.loc[inside["method"] == method, "score"].to_numpy()
            out = scores[(scores["ood_set"] == ood_set) & (scores["method"] == method)]
            found = ood_metrics(s_in, out["score"].to_numpy(), tpr=tpr)
            values = {"auroc": found["auroc"], "aupr": found["aupr"], "fpr_at_tpr": found["fpr_at_95_tpr"],
                      "tpr": tpr, "n_in": len(s_in), "n_out": len(out)}  # fmt: skip
            if ood_set == "near-mixed":
                mixed = pd.concat([inside[inside["method"] == method], out])
                accepted = mixed[mixed["score"] <= accept_threshold(s_in, tpr=tpr)]
                dice_in = float(inside.loc[inside["method"] == method, "dice"].mean())
                values |= {"dice_in": dice_in, "dice_mixed": float(mixed["dice"].mean()),
                           "dice_accepted": float(accepted["dice"].mean()), "coverage": len(accepted) / len(mixed),
                           "dice_gap": dice_in - float(accepted["dice"].mean())}  # fmt: skip
            rows += [[ood_set, kind, method, metric, value] for metric, value in values.items()]
    return rows


def write_csv(path: Path, rows: list[list[Any]]) -> None:
    with path.open("w", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)


def config() -> dict[str, Any]:
    return {"scenario": "ood", "train": {"strategy": "fedavg"}, "privacy": {"mode": "off"},
            "ood": {"scores": ["msp", "energy", "mahalanobis"], "tpr": 0.95, "top_percent": 10.0}}  # fmt: skip


def ood_run(root: Path, *, with_scores: bool = True) -> Path:
    run = root / "run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": config(), "seed": 1}))
    write_csv(run / "metrics.csv", [["round", "site", "split", "metric", "value"], [1, "0", "test", "dice_mean", 0.8]])
    write_csv(run / "timings.csv", [["round", "site", "split", "metric", "value"],
                                    [1, "server", "scenario", "ood_seconds", 3.25]])  # fmt: skip
    write_csv(run / OOD_SCORES_CSV, scores_rows())
    write_csv(run / OOD_CSV, ood_rows(pd.read_csv(run / OOD_SCORES_CSV, dtype={"site": str})))
    if not with_scores:
        (run / OOD_SCORES_CSV).unlink()
    return run


def read_ood(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / OOD_CSV)


# ---------------------------------------------------------------------------------------- a run


def test_the_best_method_of_each_set_has_the_highest_auroc(tmp_path: Path) -> None:
    ood = read_ood(ood_run(tmp_path))
    auroc = ood[ood["metric"] == "auroc"].pivot(index="ood_set", columns="method", values="value")

    best = best_methods(ood)

    assert best == {"noise": "msp/foreground", "blur": "energy/foreground", "near-mixed": "energy/foreground",
                    "shapes": "mahalanobis/global"}  # fmt: skip
    for ood_set, method in best.items():
        assert auroc.loc[ood_set, method] == auroc.loc[ood_set].max()


def test_selective_table_takes_the_best_methods_figures(tmp_path: Path) -> None:
    ood = read_ood(ood_run(tmp_path))

    table = selective_table(ood)

    assert list(table["ood_set"]) == ["near-mixed"] and table["method"].iloc[0] == "energy/foreground"
    expected = ood[(ood["ood_set"] == "near-mixed") & (ood["method"] == "energy/foreground")].set_index(
        "metric"
    )
    assert table["dice_gap"].iloc[0] == pytest.approx(expected.loc["dice_gap", "value"])
    assert table["dice_gap"].iloc[0] == pytest.approx(
        table["dice_in"].iloc[0] - table["dice_accepted"].iloc[0]
    )


def test_run_report_adds_the_section_targets_and_figures(tmp_path: Path) -> None:
    run = ood_run(tmp_path)

    md_path, html_path = build_report(run)

    section = md_path.read_text().split("## Out-of-distribution detection", 1)[1]
    ood = read_ood(run)
    shapes = ood[(ood["ood_set"] == "shapes") & (ood["method"] == "mahalanobis/global")].set_index("metric")[
        "value"
    ]
    assert (
        f"**{shapes['auroc']:.3f}** | mahalanobis/global | {shapes['aupr']:.3f} | {shapes['fpr_at_tpr']:.3f} |"
        in (section)
    )
    assert "**far AUROC ≥ 0.99 (lowest set: shapes)**: 1.000, **met**" in section
    assert "**near AUROC ≥ 0.9 (lowest set: blur)**: 0.980, **met**" in section  # noise's best is 0.995
    gap = ood[
        (ood["ood_set"] == "near-mixed")
        & (ood["method"] == "energy/foreground")
        & (ood["metric"] == "dice_gap")
    ]
    assert f"**Dice gap ≤ 0.02 (largest over near sets)**: {gap['value'].iloc[0]:.3f}, **not met**" in section
    assert "h0: 100, h1: 100 images" in section  # 20 in-distribution + 4 sets x 20, per hospital
    assert "sum of outer products" in section and "3.2 s" in section
    assert (run / ROC_PNG).stat().st_size > 5000 and (run / COVERAGE_PNG).stat().st_size > 5000
    assert "Out-of-distribution detection</h2>" in html_path.read_text()


def test_without_scores_the_tables_stay_and_the_figures_go(tmp_path: Path) -> None:
    run = ood_run(tmp_path, with_scores=False)

    blocks = run_section(run, _load_metrics(run))

    text = "\n".join(map(str, blocks))
    assert "No `ood_scores.csv`" in text and "_Figure" not in text and "_Table" in text


def test_nothing_without_ood_csv(tmp_path: Path) -> None:
    run = ood_run(tmp_path)
    (run / OOD_CSV).unlink()

    assert run_section(run, _load_metrics(run)) == []


@pytest.mark.parametrize(
    ("file", "damage", "message"),
    [
        (OOD_CSV, lambda rows: [[c for i, c in enumerate(r) if i != 2] for r in rows], "has no column(s) 'method'"),
        (OOD_CSV, lambda rows: [*rows[:1], [*rows[1][:4], "good"], *rows[2:]],
         "line 2: column 'value' must be a number. Got 'good' instead."),
        (OOD_SCORES_CSV, lambda rows: [*rows[:5], [*rows[5][:5], "?", rows[5][6]], *rows[6:]],
         "line 6: column 'score' must be a number. Got '?' instead."),
    ],
)  # fmt: skip
def test_a_malformed_table_is_one_sentence_naming_it(
    tmp_path: Path, file: str, damage: Any, message: str
) -> None:
    run = ood_run(tmp_path)
    with (run / file).open() as fh:
        rows = list(csv.reader(fh))
    write_csv(run / file, damage(rows))

    with pytest.raises(ReportError) as caught:
        build_report(run)

    text = str(caught.value)
    assert message in text and str(run / file) in text and "\n" not in text


# -------------------------------------------------------------------------------------- a sweep


def trial(name: str, seed: int, scale: float, adv: float = 0.0) -> dict[str, Any]:
    scores = pd.DataFrame(scores_rows(scale)[1:], columns=scores_rows()[0])
    scores[["score", "dice"]] = scores[["score", "dice"]].replace("", np.nan).astype(float)
    cfg = {**config(), "adv_train": {"ratio": adv, "eps": 4.0, "steps": 3}}
    table = [[str(c) for c in row] for row in ood_rows(scores)]
    return {"trial": name, "swept": {"seed": seed}, "status": "completed", "config": {"seed": seed},
            "run_config_json": {"config": cfg, "seed": seed}, "tables": {OOD_CSV: table}}  # fmt: skip


def write_sweep(folder: Path, records: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True)
    info = {
        "name": "ood",
        "swept_keys": ["seed"],
        "seed_key": "seed",
        "trials": [r["trial"] for r in records],
    }
    (folder / "sweep.json").write_text(json.dumps(info))
    (folder / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_csv(folder / "results.csv", [["trial", "seed", "round", "site", "split", "metric", "value"]])
    return folder


def test_sweep_section_gives_the_best_scores_auroc_over_seeds_and_writes_the_csv(tmp_path: Path) -> None:
    records = [trial("a", 0, 1.0), trial("b", 1, 0.5), trial("c", 0, 1.0, adv=0.5)]
    folder = write_sweep(tmp_path / "sweep", records)

    blocks = sweep_section(folder, {r["trial"]: r for r in records}, pd.DataFrame(), "seed")

    aurocs = []
    for record in records[:2]:
        ood = pd.DataFrame(record["tables"][OOD_CSV][1:], columns=OOD_COLUMNS)
        chosen = ood[
            (ood["ood_set"] == "blur") & (ood["method"] == "energy/foreground") & (ood["metric"] == "auroc")
        ]
        aurocs.append(float(chosen["value"].iloc[0]))
    expected = f"{np.mean(aurocs):.3f} ± {np.std(aurocs, ddof=1):.3f} (energy/foreground)"
    table = next(b for b in blocks if isinstance(b, _Table))
    assert table.header == ("OOD set", "kind", "FedAvg", "FedAvg + adv. training (50%, 4/255, 3 steps)")
    blur = next(r for r in table.rows if r[0] == "blur")
    assert blur[2] == expected and blur[3].endswith("± – (energy/foreground)")  # one seed: no std
    tidy = pd.read_csv(folder / OOD_CSV)
    assert list(tidy.columns) == ["trial", "setting", "seed", *OOD_COLUMNS] and len(tidy) == sum(
        len(r["tables"][OOD_CSV]) - 1 for r in records
    )
    assert "Selective prediction" in "\n".join(map(str, blocks))


def test_sweep_report_with_and_without_ood_tables(tmp_path: Path) -> None:
    with_tables = write_sweep(tmp_path / "with", [trial("a", 0, 1.0)])
    plain = trial("a", 0, 1.0)
    del plain["tables"]
    without = write_sweep(tmp_path / "without", [plain])

    assert "## Out-of-distribution detection" in build_sweep_report(with_tables)[0].read_text()
    assert "Out-of-distribution" not in build_sweep_report(without)[0].read_text()
    assert not (without / OOD_CSV).exists()
