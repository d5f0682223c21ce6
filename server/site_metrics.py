"""Keep every hospital's metrics, not just Flower's weighted average.

Flower strategies take ``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn``;
:class:`SiteMetrics` provides both. Each records one row per hospital and metric (the
hospital echoes its ``site`` and ``server-round``) and returns, for Flower's log, the
weighted mean of the model metrics and the *worst case* (max) of the privacy ones.
Privacy metrics (``privacy_*``) go to their own sink: epsilon is never averaged.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import MetricRecord, RecordDict

from server.outputs import MetricRow

BOOKKEEPING = ("site", "server-round", "num-examples", "uniform-weight")
PRIVACY_PREFIX = "privacy_"

PrivacyRow = dict[str, float | int | str]


class SiteMetrics:
    """Aggregation callbacks that forward per-site rows to ``sink`` and ``privacy_sink``."""

    def __init__(
        self,
        sink: Callable[[list[MetricRow]], None],
        privacy_sink: Callable[[int, list[PrivacyRow]], None] | None = None,
    ) -> None:
        self._sink = sink
        self._privacy_sink = privacy_sink

    def train(self, contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        return self._collect(contents, weighted_by_key, split="train")

    def evaluate(self, contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        return self._collect(contents, weighted_by_key, split="test")

    def collect(self, contents: list[RecordDict], *, split: str) -> MetricRecord:
        """Record replies outside the strategy's phases (unseen hospitals, site-by-site
        evaluation) under ``split``; ``global`` rows are patient-weighted means."""
        return self._collect(contents, "num-examples", split=split)

    def _collect(self, contents: list[RecordDict], weighted_by_key: str, *, split: str) -> MetricRecord:
        rows: list[MetricRow] = []
        privacy: list[PrivacyRow] = []
        server_round = 0
        sums: dict[tuple[str, str], float] = {}
        weights: dict[tuple[str, str], float] = {}
        worst: dict[str, float] = {}
        for content in contents:
            record = _metric_record(content)
            site = str(int(_number(record, "site")))
            server_round = int(_number(record, "server-round"))
            weight = _number(record, weighted_by_key)
            private = {k[len(PRIVACY_PREFIX) :]: _number(record, k) for k in record if k.startswith(PRIVACY_PREFIX)}
            if private:
                privacy.append({"site": site, **private})
                for key in ("epsilon_rdp", "epsilon_prv"):
                    if key in private:
                        worst[key] = max(worst.get(key, 0.0), private[key])
            for key in record:
                if key in BOOKKEEPING or key.startswith(PRIVACY_PREFIX):
                    continue
                value = _number(record, key)
                # "finetuned/dice_mean": another split of the same hospital's evaluation.
                row_split, metric = key.split("/", 1) if "/" in key else (split, key)
                rows.append(MetricRow(server_round, site, row_split, metric, value))
                sums[row_split, metric] = sums.get((row_split, metric), 0.0) + weight * value
                weights[row_split, metric] = weights.get((row_split, metric), 0.0) + weight
        averaged = {k: v / weights[k] for k, v in sums.items() if weights[k]}
        rows += [MetricRow(server_round, "global", k[0], k[1], v) for k, v in averaged.items()]
        self._sink(rows)
        if privacy and self._privacy_sink is not None:
            self._privacy_sink(server_round, privacy)
        shown = {metric: v for (row_split, metric), v in averaged.items() if row_split == split}
        return MetricRecord({**shown, **{f"{k}_worst": v for k, v in worst.items()}})


def _number(record: MetricRecord, key: str) -> float:
    value = record[key]
    if not isinstance(value, int | float):
        raise ValueError(f"a hospital's metric {key!r} must be a number, got {value!r}")
    return float(value)


def _metric_record(content: RecordDict) -> MetricRecord:
    records = list(content.metric_records.values())
    if len(records) != 1:
        raise ValueError(f"expected one MetricRecord in a hospital's reply, got {len(records)}")
    return records[0]
