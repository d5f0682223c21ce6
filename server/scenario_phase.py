"""The OOD and robustness scenarios' phase after the last round (``ood.*``, ``robustness.*``, ``attack.*``).

Once the federation has its final model — after the last round, or, on a resume from the last
round's checkpoint, straight after the roll call (the scenarios on a trained model, without
training) — the server asks the hospitals, through the round loop's ``ask`` (EVALUATE messages
with a ``scenario-step``):

1. ``feature-stats`` (with a Mahalanobis score): every training hospital sends the count, sum
   and sum of outer products of its train images' features (scenarios.ood_eval.feature_blocks); the server adds them up
   (:meth:`scenarios.ood.FeatureStats.merge`, equal to the pooled statistics);
2. ``ood``: every hospital scores its image sets with the final model (the merged statistics
   travel in the request) and sends one score per image and method, and each image's Dice;
   the server writes ``ood_scores.csv`` and computes ``ood.csv`` (:mod:`scenarios.ood_tables`);
3. ``robustness``: every training hospital sends its Dice under each corruption and attack;
   the server writes ``robustness.csv`` (per hospital, and ``all``: the patient-weighted mean).

The time of each phase goes into ``metrics.csv`` (site ``server``, split ``scenario``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO
from pathlib import Path

import numpy as np
import pandas as pd
from flwr.app import ArrayRecord
from flwr.common.logger import log

from scenarios.robustness_tables import ROBUSTNESS_COLUMNS, ROBUSTNESS_CSV, with_pooled_rows
from server.driver import Ask
from server.outputs import MetricRow
from sims.config import FedscanConfig

SCENARIO_SPLIT = "scenario"


class ScenarioPhase:
    """Runs the OOD and robustness steps once, after the last round's evaluation."""

    def __init__(
        self,
        config: FedscanConfig,
        run_dir: Path,
        sink: Callable[[list[MetricRow]], None],
        *,
        trainers: list[int],
        evaluators: list[int],
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.sink = sink
        self.trainers = trainers
        self.evaluators = evaluators  # every hospital (training and evaluate-only)

    @property
    def wanted(self) -> bool:
        return bool(self.config.ood.scores) or self.config.robustness.enabled

    def run(self, server_round: int, arrays: ArrayRecord, ask: Ask) -> None:
        """The phase, on the final model (``run_rounds``' ``after_last``)."""
        if not self.wanted:
            return
        if self.config.ood.scores:
            started = time.monotonic()
            self._ood(arrays, ask)
            self._time(server_round, "ood_seconds", started)
        if self.config.robustness.enabled:
            started = time.monotonic()
            self._robustness(arrays, ask)
            self._time(server_round, "robustness_seconds", started)

    def _time(self, server_round: int, metric: str, started: float) -> None:
        seconds = time.monotonic() - started
        log(INFO, "fedscan: scenario phase %s: %.1f s", metric.removesuffix("_seconds"), seconds)
        self.sink([MetricRow(server_round, "server", SCENARIO_SPLIT, metric, seconds)])

    # ------------------------------------------------------------------ OOD

    def _ood(self, arrays: ArrayRecord, ask: Ask) -> None:
        from scenarios.ood import FeatureStats
        from scenarios.ood_eval import stats_from_lists, stats_to_lists
        from scenarios.ood_tables import OOD_CSV, OOD_SCORES_CSV, SCORES_COLUMNS, ood_rows

        extra: dict[str, object] = {}
        if "mahalanobis" in self.config.ood.scores:
            replies = ask(
                [(s, arrays, {"scenario-step": "feature-stats"}) for s in self.trainers], "ood-stats"
            )
            parts = [stats_from_lists(dict(r.content.config_records["stats"])) for r in replies]
            if parts:
                merged = stats_to_lists(FeatureStats.merge(parts))
                extra = {f"ood-stats/{k}": v for k, v in merged.items()}
        replies = ask([(s, arrays, {"scenario-step": "ood", **extra}) for s in self.evaluators], "ood")
        rows: list[tuple[int, str, str, int, str, float, float]] = []
        for reply in replies:
            site = int(reply.content.metric_records["metrics"]["site"])  # type: ignore[arg-type]
            sets = reply.content.config_records["sets"]
            scores = reply.content.array_records["scores"]
            names: list[str] = [str(n) for n in sets["names"]]  # type: ignore[union-attr]
            kinds: list[str] = [str(k) for k in sets["kinds"]]  # type: ignore[union-attr]
            for name, kind in zip(names, kinds, strict=True):
                dice_key = f"{name}::dice"
                dice = scores[dice_key].numpy() if dice_key in scores else None
                for key in scores:
                    set_name, _, method = key.partition("::")
                    if set_name != name or method == "dice":
                        continue
                    values = scores[key].numpy()
                    for i, value in enumerate(values):
                        rows.append(
                            (
                                site,
                                str(name),
                                str(kind),
                                i,
                                method,
                                float(value),
                                float(dice[i]) if dice is not None else np.nan,
                            )
                        )
        frame = pd.DataFrame(rows, columns=list(SCORES_COLUMNS))
        frame.to_csv(self.run_dir / OOD_SCORES_CSV, index=False, lineterminator="\n")
        table = ood_rows(frame, tpr=self.config.ood.tpr)
        table.to_csv(self.run_dir / OOD_CSV, index=False, lineterminator="\n")
        log(
            INFO,
            "fedscan: OOD scores of %d images from %d hospitals -> %s, %s",
            frame["image"].count(),
            len(replies),
            OOD_SCORES_CSV,
            OOD_CSV,
        )

    # ------------------------------------------------------------------ robustness

    def _robustness(self, arrays: ArrayRecord, ask: Ask) -> None:
        replies = ask([(s, arrays, {"scenario-step": "robustness"}) for s in self.trainers], "robustness")
        rows: list[dict[str, object]] = []
        for reply in replies:
            site = int(reply.content.metric_records["metrics"]["site"])  # type: ignore[arg-type]
            got = reply.content.config_records["rows"]
            columns = ("perturbation", "family", "strength", "unit", "dice", "n")
            for values in zip(*(list(got[c]) for c in columns), strict=True):  # type: ignore[arg-type]
                record = dict(zip(columns, values, strict=True))
                rows.append(
                    {
                        "site": str(site),
                        "perturbation": record["perturbation"],
                        "family": record["family"],
                        "strength": float(record["strength"]),
                        "unit": record["unit"],
                        "metric": "dice_mean",
                        "value": float(record["dice"]),
                        "n": int(record["n"]),
                    }
                )
        frame = with_pooled_rows(pd.DataFrame(rows, columns=list(ROBUSTNESS_COLUMNS)))
        frame.to_csv(self.run_dir / ROBUSTNESS_CSV, index=False, lineterminator="\n")
        log(INFO, "fedscan: robustness curves of %d hospitals -> %s", len(replies), ROBUSTNESS_CSV)
