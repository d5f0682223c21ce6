"""ood.csv from the per-image scores the hospitals sent: detection metrics and selective prediction."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from scenarios.ood_tables import NEAR_MIXED, SCORES_COLUMNS, ood_rows


def _scores() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []

    def add(site: int, name: str, kind: str, scores: np.ndarray, dice: np.ndarray | None) -> None:
        for i, s in enumerate(scores):
            rows.append((site, name, kind, i, "energy/foreground", float(s), np.nan if dice is None else float(dice[i])))

    for site in (0, 1):
        add(site, "in", "in", rng.normal(0, 1, 20), rng.uniform(0.7, 0.9, 20))
        add(site, "val", "val", rng.normal(0, 1, 10), rng.uniform(0.7, 0.9, 10))
        add(site, "noise", "near", rng.normal(1, 1, 20), rng.uniform(0.3, 0.6, 20))
        add(site, "shapes", "far", rng.normal(5, 1, 20), None)
    add(2, "unseen-scanner", "near", rng.normal(0.5, 1, 15), rng.uniform(0.4, 0.7, 15))
    return pd.DataFrame(rows, columns=list(SCORES_COLUMNS))


def _value(table: pd.DataFrame, ood_set: str, metric: str) -> float:
    row = table[(table["ood_set"] == ood_set) & (table["metric"] == metric)]
    assert len(row) == 1, (ood_set, metric)
    return float(row["value"].iloc[0])


def test_detection_metrics_pool_the_hospitals_and_equal_scikit_learns() -> None:
    scores = _scores()
    table = ood_rows(scores, tpr=0.95)

    inside = scores[scores["kind"] == "in"]["score"].to_numpy()
    for name in ("noise", "shapes", "unseen-scanner"):
        out = scores[scores["ood_set"] == name]["score"].to_numpy()
        y = np.r_[np.zeros(len(inside)), np.ones(len(out))]
        assert _value(table, name, "auroc") == pytest.approx(roc_auc_score(y, np.r_[inside, out]))
        assert _value(table, name, "aupr") == pytest.approx(average_precision_score(y, np.r_[inside, out]))
        assert _value(table, name, "n_in") == 40 and _value(table, name, "n_out") == len(out)
    assert set(table["ood_set"]) == {"noise", "shapes", "unseen-scanner", NEAR_MIXED}


def test_selective_prediction_uses_the_validation_threshold_on_the_mixed_set() -> None:
    scores = _scores()
    table = ood_rows(scores, tpr=0.9)

    val = np.sort(scores[scores["kind"] == "val"]["score"].to_numpy())
    threshold = val[int(np.ceil(0.9 * len(val))) - 1]  # the lowest accepting >= 90% of validation images
    inside = scores[scores["kind"] == "in"]
    out = scores[scores["ood_set"] == "noise"]
    mixed = pd.concat([inside, out])
    accepted = mixed[mixed["score"] <= threshold]
    assert _value(table, "noise", "dice_accepted") == pytest.approx(accepted["dice"].mean())
    assert _value(table, "noise", "coverage") == pytest.approx(len(accepted) / len(mixed))
    assert _value(table, "noise", "dice_gap") == pytest.approx(inside["dice"].mean() - accepted["dice"].mean())
    near = scores[scores["kind"] == "near"]
    assert _value(table, NEAR_MIXED, "n_out") == len(near)  # every near set with labels, pooled
    assert table[(table["ood_set"] == "shapes") & (table["metric"] == "dice_accepted")].empty


def test_no_scores_no_rows() -> None:
    assert ood_rows(pd.DataFrame(columns=list(SCORES_COLUMNS)), tpr=0.95).empty
