"""The round loop of :meth:`flwr.serverapp.strategy.Strategy.start`, resumable.

``Strategy.start`` always begins at round 1 and offers no hook between rounds; this loop
runs the strategy's own four hooks in the same order (train, aggregate, evaluate,
aggregate, server-side evaluation), from any round, and calls ``after_round`` so the run
can checkpoint. The log lines are Flower's, so tools reading them see no difference.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    *,
    first_round: int,
    num_rounds: int,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
    after_round: Callable[[int, ArrayRecord], None],
    round_config: dict[str, str | int] | None = None,
    stop_after: int = 0,
    before_round: Callable[[int], str | None] | None = None,
    timeout: float = 3600,
) -> ArrayRecord:
    """Run rounds ``first_round..num_rounds`` (or up to ``stop_after``); return the arrays.

    ``before_round(r)`` is asked before round ``r`` starts; a returned sentence ends the
    federation there (e.g. a server-side privacy budget that round ``r`` would overshoot).
    """
    log(INFO, "Starting %s strategy (rounds %d-%d):", strategy.__class__.__name__, first_round, num_rounds)
    strategy.summary()
    started = time.time()
    if first_round == 1 and evaluate_fn is not None:
        log(INFO, "Initial global evaluation results: %s", evaluate_fn(0, arrays))
    for server_round in range(first_round, num_rounds + 1):
        if before_round is not None and (reason := before_round(server_round)):
            log(INFO, "fedscan: stopping before round %d: %s", server_round, reason)
            break
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
        replies = grid.send_and_receive(
            messages=strategy.configure_train(server_round, arrays, ConfigRecord(dict(round_config or {})), grid),
            timeout=timeout,
        )
        aggregated, train_metrics = strategy.aggregate_train(server_round, replies)
        if aggregated is not None:
            arrays = aggregated
        if train_metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", train_metrics)
        replies = grid.send_and_receive(
            messages=strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(round_config or {})), grid),
            timeout=timeout,
        )
        evaluate_metrics = strategy.aggregate_evaluate(server_round, replies)
        if evaluate_metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", evaluate_metrics)
        if evaluate_fn is not None:
            log(INFO, "Global evaluation")
            log(INFO, "\t└──> MetricRecord: %s", evaluate_fn(server_round, arrays))
        after_round(server_round, arrays)
        if stop_after and server_round >= stop_after:
            log(INFO, "fedscan: stopping after round %d (checkpoint.stop-after)", server_round)
            break
    log(INFO, "")
    log(INFO, "Strategy execution finished in %.2fs", time.time() - started)
    return arrays
