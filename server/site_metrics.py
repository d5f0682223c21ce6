"""Keep every hospital's metrics, not just Flower's weighted average.

Flower strategies take ``train_metrics_aggr_fn`` / ``evaluate_metrics_aggr_fn``;
:class:`SiteMetrics` provides both. Each records one row per hospital and metric (the
hospital echoes its ``site`` and ``server-round``) and then returns Flower's usual
weighted average for the log, plus the ``global`` rows.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from server.outputs import MetricRow

BOOKKEEPING = ("site", "server-round", "num-examples")


class SiteMetrics:
    """Aggregation callbacks that forward per-site rows to ``sink``."""

    def __init__(self, sink: Callable[[list[MetricRow]], None]) -> None:
        self._sink = sink

    def train(self, contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        return self._collect(contents, weighted_by_key, split="train")

    def evaluate(self, contents: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        return self._collect(contents, weighted_by_key, split="test")

    def _collect(self, contents: list[RecordDict], weighted_by_key: str, *, split: str) -> MetricRecord:
        rows: list[MetricRow] = []
        server_round = 0
        for content in contents:
            record = _metric_record(content)
            site = str(int(record["site"]))
            server_round = int(record["server-round"])
            rows += [
                MetricRow(server_round, site, split, key, float(value))
                for key, value in record.items()
                if key not in BOOKKEEPING
            ]
        mean = aggregate_metricrecords(contents, weighted_by_key)
        averaged = {k: v for k, v in mean.items() if k not in BOOKKEEPING}
        rows += [MetricRow(server_round, "global", split, k, float(v)) for k, v in averaged.items()]
        self._sink(rows)
        return MetricRecord(averaged)


def _metric_record(content: RecordDict) -> MetricRecord:
    records = list(content.metric_records.values())
    if len(records) != 1:
        raise ValueError(f"expected one MetricRecord in a hospital's reply, got {len(records)}")
    return records[0]
