"""Per-site metrics: model metrics averaged by weight, epsilon never averaged."""

from __future__ import annotations

import math

from flwr.app import MetricRecord, RecordDict

from server.outputs import MetricRow
from server.site_metrics import SiteMetrics


def _reply(site: int, n: int, dice: float, eps: float) -> RecordDict:
    return RecordDict(
        {
            "metrics": MetricRecord(
                {
                    "dice_mean": dice,
                    "privacy_epsilon_rdp": eps,
                    "privacy_epsilon_prv": eps * 0.9,
                    "privacy_steps": 13,
                    "num-examples": n,
                    "uniform-weight": 1,
                    "site": site,
                    "server-round": 4,
                }
            )
        }
    )


def test_epsilon_is_reported_per_site_and_as_worst_case_never_as_a_mean() -> None:
    rows: list[MetricRow] = []
    privacy: list[tuple[int, list[dict]]] = []
    collector = SiteMetrics(rows.extend, lambda r, p: privacy.append((r, p)))

    logged = collector.evaluate([_reply(0, 30, 0.8, 2.0), _reply(1, 10, 0.4, 6.0)], "num-examples")

    assert math.isclose(logged["dice_mean"], 0.8 * 0.75 + 0.4 * 0.25)
    assert logged["epsilon_rdp_worst"] == 6.0  # the max, not the (weighted) mean 3.0 / 4.0
    assert not any("epsilon" in k and "worst" not in k for k in logged)
    assert not any("epsilon" in r.metric for r in rows)  # epsilon stays out of metrics.csv
    (global_row,) = [r for r in rows if r.site == "global"]
    assert global_row.metric == "dice_mean" and math.isclose(global_row.value, 0.7)
    (rnd, sites), = privacy
    assert rnd == 4 and [s["site"] for s in sites] == ["0", "1"]
    assert [s["epsilon_rdp"] for s in sites] == [2.0, 6.0]


def test_uniform_weighting_for_client_level_dp() -> None:
    rows: list[MetricRow] = []

    logged = SiteMetrics(rows.extend).train([_reply(0, 30, 0.8, 1.0), _reply(1, 10, 0.4, 1.0)], "uniform-weight")

    assert math.isclose(logged["dice_mean"], 0.6)
