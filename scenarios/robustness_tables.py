"""The robustness scenario's table, ``robustness.csv``: its schema and the pooled ``all`` rows.

The server writes it from the Dice values the hospitals sent (:mod:`server.scenario_phase`); the
report reads it (:mod:`scenarios.robustness_report`). Tidy: one row per hospital (``site``) and
perturbation, strength and metric, plus ``site = all``, the patient-weighted mean over hospitals.
"""

from __future__ import annotations

import pandas as pd

ROBUSTNESS_CSV = "robustness.csv"
ROBUSTNESS_COLUMNS = ("site", "perturbation", "family", "strength", "unit", "metric", "value", "n")
ALL = "all"


def with_pooled_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (per-hospital rows of :data:`ROBUSTNESS_COLUMNS`) with the ``all`` rows appended:
    per perturbation, strength and metric, the mean weighted by each hospital's ``n`` patients."""
    if frame.empty:
        return frame
    keys = ["perturbation", "family", "strength", "unit", "metric"]
    weighted = frame.assign(weighted=frame["value"] * frame["n"]).groupby(keys, sort=False)
    pooled = weighted[["weighted", "n"]].sum().reset_index()
    pooled["value"] = pooled["weighted"] / pooled["n"]
    pooled["site"] = ALL
    return pd.concat([frame, pooled[list(ROBUSTNESS_COLUMNS)]], ignore_index=True)
