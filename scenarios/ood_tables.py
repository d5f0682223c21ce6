"""The OOD scenario's tables, computed at the server from the scores the hospitals sent.

``ood_scores.csv`` holds, per image, exactly what left the hospitals (one score per method and
one Dice); ``ood.csv`` (tidy: ``ood_set, kind, method, metric, value``) holds, per OOD set and
method, the detection metrics (scikit-learn's AUROC and AUPR, FPR at the TPR; OOD = positive)
over the training hospitals' in-distribution test images pooled, and the selective prediction:
the accept threshold is calibrated on the hospitals' validation images (the lowest score that
accepts ``tpr`` of them), then applied to the mixed set (in-distribution test images plus the OOD
set's); ``dice_accepted`` is the mean Dice of the accepted images, ``dice_gap`` how far it falls
short of the in-distribution Dice. ``near-mixed`` pools every near-OOD set that has labels.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from scenarios.ood import accept_threshold, ood_metrics

OOD_SCORES_CSV = "ood_scores.csv"
OOD_CSV = "ood.csv"
SCORES_COLUMNS = ("site", "ood_set", "kind", "image", "method", "score", "dice")
OOD_COLUMNS = ("ood_set", "kind", "method", "metric", "value")
IN, VAL, NEAR_MIXED = "in", "val", "near-mixed"


def ood_rows(scores: pd.DataFrame, *, tpr: float) -> pd.DataFrame:
    """``ood.csv`` from ``ood_scores.csv`` rows (see the module docstring)."""
    rows: list[tuple[str, str, str, str, float]] = []
    if scores.empty:
        return pd.DataFrame(columns=list(OOD_COLUMNS))
    for method, per_method in scores.groupby("method", sort=True):
        inside = per_method[per_method["kind"] == IN]
        if inside.empty:
            continue
        val = per_method[per_method["kind"] == VAL]
        calibration = val if not val.empty else inside
        threshold = accept_threshold(calibration["score"].to_numpy(), tpr=tpr)
        out_sets = [
            (name, part)
            for name, part in per_method.groupby("ood_set", sort=True)
            if part["kind"].iloc[0] in ("near", "far")
        ]
        near = per_method[(per_method["kind"] == "near") & per_method["dice"].notna()]
        if not near.empty:
            out_sets.append((NEAR_MIXED, near))
        for name, out in out_sets:
            kind = str(out["kind"].iloc[0])

            def add(
                metric: str, value: float, name: str = str(name), kind: str = kind, method: str = str(method)
            ) -> None:
                rows.append((name, kind, method, metric, float(value)))

            m = ood_metrics(inside["score"].to_numpy(), out["score"].to_numpy(), tpr=tpr)
            add("auroc", m["auroc"])
            add("aupr", m["aupr"])
            add("fpr_at_tpr", m["fpr_at_95_tpr"])
            add("tpr", tpr)
            add("n_in", len(inside))
            add("n_out", len(out))
            if out["dice"].notna().all() and inside["dice"].notna().all():
                mixed = pd.concat([inside, out])
                accepted = mixed[mixed["score"] <= threshold]
                dice_in = float(inside["dice"].mean())
                dice_accepted = float(accepted["dice"].mean()) if len(accepted) else math.nan
                add("dice_in", dice_in)
                add("dice_out", float(out["dice"].mean()))
                add("dice_mixed", float(mixed["dice"].mean()))
                add("dice_accepted", dice_accepted)
                add("coverage", len(accepted) / len(mixed))
                add("accepted_in", float(np.mean(inside["score"] <= threshold)))
                add("accepted_out", float(np.mean(out["score"] <= threshold)))
                add("dice_gap", dice_in - dice_accepted)
    return pd.DataFrame(rows, columns=list(OOD_COLUMNS))
