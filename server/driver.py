"""The round loop of :meth:`flwr.serverapp.strategy.Strategy.start`: resumable, reproducible, fault-tolerant.

``Strategy.start`` always begins at round 1, offers no hook between rounds, waits for every
reply without checking it, and samples hospitals from Flower's random node ids (so a seed
does not fix which hospitals train). This loop runs the strategy's own four hooks in the
same order (train, aggregate, evaluate, aggregate, server-side evaluation) from any round,
and around them:

- a **roll call** before round 1 learns which hospital (``partition-id``) sits at which
  node, and lets every hospital restore its private state on a resume;
- hospitals are listed to the strategy **in hospital order** and Python's ``random`` (which
  Flower samples with) is re-seeded from ``(seed, round)`` before each sampling, so the
  same seed samples the same hospitals, on a resume too;
- every reply is **checked** before aggregation (an error, no reply within the round
  timeout, NaN/Inf, a wrong set of arrays, shape or dtype) and rejected with a logged
  reason into ``failures.csv``; replies are aggregated in hospital order, so sums are
  bit-for-bit reproducible;
- a round with fewer usable updates than ``faults.min-available`` fails the run (it can
  be resumed from the last checkpoint), unless every missing update was a hospital
  declining to protect its privacy budget;
- ``after_round`` checkpoints; ``before_round`` may stop the federation (a server-side
  privacy budget).

The log lines are Flower's where Flower has them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.failures import FAULT_KINDS, Failure
from sims.seeding import derive_seed

BUDGET_EXHAUSTED = 4001  # Error code of a reply that declines a round to protect the budget
HOSPITAL_CRASHED = 4002  # Error code of a (simulated) hospital that failed after training

RoundConfig = Callable[[int], dict[str, Any]]
MessageSink = Callable[[list[tuple[int, str, str, int]]], None]
Job = tuple[int, ArrayRecord, dict[str, Any]]
"""An evaluation the server asks of one hospital: ``(hospital id, arrays, extra config)``."""
Ask = Callable[[list[Job], str], list[Message]]
"""``ask(jobs, phase)`` sends each job as an EVALUATE message and returns the usable replies."""


class FederationError(RuntimeError):
    """The federation cannot go on (too few usable updates, hospitals missing at the roll call)."""


class SiteOrderedGrid:
    """A :class:`Grid` whose node ids come in hospital order (Flower's are random per run).

    With ``sites``, only those hospitals' nodes are listed: a strategy given this grid can
    neither sample nor address any other (an evaluate-only hospital is never asked to train).
    """

    def __init__(self, grid: Grid, site_of: dict[int, int], sites: Collection[int] | None = None) -> None:
        self._grid = grid
        self._site_of = site_of
        self._sites = None if sites is None else set(sites)

    def get_node_ids(self) -> list[int]:
        nodes = self._grid.get_node_ids()
        if self._sites is not None:
            nodes = [n for n in nodes if self._site_of.get(n) in self._sites]
        return sorted(nodes, key=lambda n: self._site_of.get(n, 1 << 62))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


@dataclass
class Exchange:
    """What came back from one phase of a round."""

    usable: list[Message] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)  # message ids still out (stragglers)


def roll_call(
    grid: Grid, config: dict[str, Any], *, timeout: float, expected: int,
    summaries: dict[int, MetricRecord] | None = None,
) -> dict[int, int]:
    """Ask every node which hospital it is; each hospital also restores its state if resuming.

    Returns ``{node id: hospital id}``; ``summaries``, when given, is filled with each
    hospital's reply (``{hospital id: MetricRecord}``: summaries of its images it was asked for).

    Raises
    ------
    FederationError
        If a node fails to answer or two nodes claim the same hospital.
    """
    node_ids = sorted(grid.get_node_ids())
    messages = [
        Message(RecordDict({"config": ConfigRecord(dict(config))}), dst_node_id=n, message_type=MessageType.QUERY)
        for n in node_ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    site_of: dict[int, int] = {}
    for reply in replies:
        if reply.has_error():
            raise FederationError(f"A hospital failed the roll call: {reply.error.reason}")
        site = reply.content.metric_records["metrics"]["site"]
        if isinstance(site, bool) or not isinstance(site, int | float):
            raise FederationError(f"A hospital answered the roll call with site {site!r}, not a number.")
        site_of[reply.metadata.src_node_id] = int(site)
        if summaries is not None:
            summaries[int(site)] = reply.content.metric_records["metrics"]
    if len(site_of) < len(node_ids) or len(set(site_of.values())) != len(site_of) or len(site_of) != expected:
        raise FederationError(
            f"The roll call heard {len(set(site_of.values()))} distinct hospitals of {expected} within {timeout:g} s."
        )
    return site_of


def _error_kind(code: int) -> str:
    return {BUDGET_EXHAUSTED: "budget", HOSPITAL_CRASHED: "crash"}.get(code, "error")


def check_update(reply: Message, reference: dict[str, np.ndarray]) -> str | None:
    """Why a train reply's model update cannot be aggregated, or ``None`` if it can."""
    arrays = list(reply.content.array_records.values())
    if len(arrays) != 1:
        return f"it holds {len(arrays)} ArrayRecords, expected 1"
    if len(reply.content.metric_records) != 1:
        return f"it holds {len(reply.content.metric_records)} MetricRecords, expected 1"
    record = arrays[0]
    if set(record.keys()) != set(reference):
        missing, extra = sorted(set(reference) - set(record.keys())), sorted(set(record.keys()) - set(reference))
        return f"its arrays differ from the model's (missing {missing[:3]}, unexpected {extra[:3]})"
    for name, expected in reference.items():
        try:
            got = record[name].numpy()
        except Exception as err:  # a malformed buffer is a corrupt update, whatever numpy says
            return f"array {name!r} cannot be read ({type(err).__name__})"
        if got.shape != expected.shape:
            return f"array {name!r} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        if got.dtype != expected.dtype:
            return f"array {name!r} has dtype {got.dtype}, expected {expected.dtype}"
        if np.issubdtype(got.dtype, np.floating) and not np.isfinite(got).all():
            return f"array {name!r} holds NaN or Inf"
    metrics = next(iter(reply.content.metric_records.values()))
    for key in ("num-examples", "uniform-weight"):
        value = metrics.get(key)
        if not isinstance(value, int | float) or not np.isfinite(value) or value <= 0:
            return f"its metric {key!r} is {value!r}, expected a finite number > 0"
    return None


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    *,
    server_round: int,
    phase: str,
    site_of: dict[int, int],
    timeout: float,
    reference: dict[str, np.ndarray] | None = None,
    message_sink: MessageSink | None = None,
) -> Exchange:
    """Send ``messages``, collect replies until ``timeout``, and sort them into usable and failed.

    Usable replies come back in hospital order. With ``reference`` (the global model's arrays)
    each reply's update is checked against it (:func:`check_update`). ``message_sink`` hears
    ``(round, phase, message type, hospital)`` for every message sent (``messages.csv``).
    """
    messages = list(messages)
    if message_sink is not None:
        message_sink([(server_round, phase, m.metadata.message_type, site_of.get(m.metadata.dst_node_id, -1))
                      for m in messages])
    dst_of: dict[str, int] = {}
    ids = list(grid.push_messages(messages))
    for msg_id, msg in zip(ids, messages, strict=True):
        dst_of[msg_id] = msg.metadata.dst_node_id
    outstanding = set(ids)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while outstanding and time.monotonic() < deadline:
        got = list(grid.pull_messages(list(outstanding)))
        replies += got
        outstanding -= {m.metadata.reply_to_message_id for m in got}
        if outstanding:
            time.sleep(0.05)
    result = Exchange(pending=sorted(outstanding))
    for msg_id in sorted(outstanding, key=lambda i: site_of.get(dst_of[i], -1)):
        site = site_of.get(dst_of[msg_id], -1)
        result.failures.append(Failure(server_round, site, phase, "late", f"no reply within {timeout:g} s"))
    for reply in sorted(replies, key=lambda m: site_of.get(m.metadata.src_node_id, -1)):
        site = site_of.get(reply.metadata.src_node_id, -1)
        if reply.has_error():
            kind = _error_kind(reply.error.code)
            result.failures.append(Failure(server_round, site, phase, kind, reply.error.reason or "(no reason given)"))
            continue
        why = check_update(reply, reference) if reference is not None else None
        if why is not None:
            result.failures.append(Failure(server_round, site, phase, "corrupt", f"update rejected: {why}"))
            continue
        result.usable.append(reply)
    for failure in result.failures:
        level = INFO if failure.kind == "budget" else WARNING
        log(level, "fedscan: round %d %s: hospital %d %s: %s", server_round, phase, failure.site, failure.kind,
            failure.reason)
    return result


def drain(grid: Grid, pending: list[str], *, timeout: float) -> None:
    """Wait (up to ``timeout``) for late replies and drop them.

    A straggler keeps working after the round closed; the next message it gets must not be
    processed beside its late one (both would start from the same hospital state).
    """
    outstanding, deadline = set(pending), time.monotonic() + timeout
    while outstanding and time.monotonic() < deadline:
        got = list(grid.pull_messages(list(outstanding)))
        outstanding -= {m.metadata.reply_to_message_id for m in got}
        if outstanding:
            time.sleep(0.1)
    if outstanding:
        log(WARNING, "fedscan: %d late replies never arrived (waited %.0f s more)", len(outstanding), timeout)


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    *,
    template: dict[str, np.ndarray],
    first_round: int,
    num_rounds: int,
    seed: int,
    num_hospitals: int,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
    after_round: Callable[[int, ArrayRecord], None],
    failure_sink: Callable[[list[Failure]], None],
    round_config: RoundConfig,
    roll_call_config: dict[str, Any],
    round_timeout: float,
    min_available: int = 1,
    stop_after: int = 0,
    before_round: Callable[[int], str | None] | None = None,
    train_sites: Callable[[int], Collection[int]] | None = None,
    evaluate_sites: Collection[int] | None = None,
    after_evaluate: Callable[[int, ArrayRecord, Ask], None] | None = None,
    on_roll_call: Callable[[dict[int, MetricRecord]], None] | None = None,
    message_sink: MessageSink | None = None,
    after_last: Callable[[int, ArrayRecord, Ask], None] | None = None,
) -> ArrayRecord:
    """Run rounds ``first_round..num_rounds`` (or up to ``stop_after``); return the arrays.

    ``template`` is the model's own ``state_dict`` as arrays: every update must have its
    names, shapes and dtypes (the global arrays may have been widened by the strategy).

    ``before_round(r)`` is asked before round ``r`` starts; a returned sentence ends the
    federation there (e.g. a server-side privacy budget that round ``r`` would overshoot).

    ``train_sites(r)`` are the hospitals the strategy may sample to train in round ``r`` and
    ``evaluate_sites`` those it evaluates (``None``: all): the strategy sees a grid that lists
    only their nodes. ``after_evaluate(r, arrays, ask)`` runs after the strategy's evaluation:
    it may ``ask`` any hospital to evaluate any arrays (evaluate-only hospitals, site-by-site
    evaluation). ``on_roll_call`` hears every hospital's roll-call reply (``{hospital: record}``).
    ``after_last(num_rounds, arrays, ask)`` runs once the federation has its final model: after
    round ``num_rounds``, whether this run trained it or resumed from its checkpoint (a resume from
    the last round trains nothing and only runs this); not when the run stopped before it.
    A strategy that trains at the server (``trains_at_server``) sends no train message; its
    ``aggregate_train`` trains.

    Raises
    ------
    FederationError
        When a round gets fewer than ``min_available`` usable updates for any reason other
        than hospitals declining to protect their privacy budgets.
    """
    log(INFO, "Starting %s strategy (rounds %d-%d):", strategy.__class__.__name__, first_round, num_rounds)
    strategy.summary()
    started = time.time()
    summaries: dict[int, MetricRecord] = {}
    site_of = roll_call(grid, roll_call_config, timeout=max(round_timeout, 60.0), expected=num_hospitals,
                        summaries=summaries)
    if on_roll_call is not None:
        on_roll_call(summaries)
    node_of = {site: node for node, site in site_of.items()}
    evaluate_grid = SiteOrderedGrid(grid, site_of, evaluate_sites)

    def ask(jobs: list[Job], phase: str) -> list[Message]:
        # Called from after_evaluate: `server_round` and `config` are the current round's.
        messages = [
            Message(
                RecordDict({"arrays": arrays, "config": ConfigRecord({**config, **extra, "server-round": server_round})}),
                dst_node_id=node_of[site], message_type=MessageType.EVALUATE,
            )
            for site, arrays, extra in jobs
        ]
        result = exchange(grid, messages, server_round=server_round, phase=phase, site_of=site_of,
                          timeout=round_timeout, message_sink=message_sink)
        failure_sink(result.failures)
        drain(grid, result.pending, timeout=round_timeout + 60)
        return result.usable

    last_round = first_round - 1  # the last round whose model `arrays` is
    if first_round == 1 and evaluate_fn is not None:
        log(INFO, "Initial global evaluation results: %s", evaluate_fn(0, arrays))
    for server_round in range(first_round, num_rounds + 1):
        if before_round is not None and (reason := before_round(server_round)):
            log(INFO, "fedscan: stopping before round %d: %s", server_round, reason)
            break
        log(INFO, "")
        log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
        config = round_config(server_round)

        random.seed(derive_seed(seed, "sample-train", server_round))
        # The deadline travels with the request (a straggler replies just after it).
        train_config = ConfigRecord({**config, "reply-by": time.time() + round_timeout})
        train_grid = SiteOrderedGrid(grid, site_of, None if train_sites is None else train_sites(server_round))
        messages = list(strategy.configure_train(server_round, arrays, train_config, train_grid))  # type: ignore[arg-type]
        trained = exchange(grid, messages, server_round=server_round, phase="train", site_of=site_of,
                           timeout=round_timeout, reference=template, message_sink=message_sink)
        faults = [f for f in trained.failures if f.kind in FAULT_KINDS]
        at_server = bool(getattr(strategy, "trains_at_server", False))
        if not at_server and len(trained.usable) < min_available and (faults or not trained.failures):
            failure_sink(trained.failures)
            drain(grid, trained.pending, timeout=round_timeout + 60)
            raise FederationError(
                f"Round {server_round} got {len(trained.usable)} usable updates, fewer than faults.min-available = "
                f"{min_available} ({'; '.join(f'hospital {f.site}: {f.kind}' for f in trained.failures) or 'none sent'}). "
                "Resume from the last checkpoint with checkpoint.resume-from."
            )
        usable = trained.usable
        sampled = getattr(strategy, "num_sampled_clients", None)  # Flower's client-level DP wrapper
        if sampled and len(usable) < sampled:
            # Its noise is calibrated to the mean of `sampled` clipped updates; a mean of fewer
            # would be more sensitive than accounted. Release nothing this round instead.
            log(WARNING, "fedscan: round %d: %d of %d sampled updates usable; client-level DP releases no "
                "update this round (the model stays as it was)", server_round, len(usable), sampled)
            usable = []
        aggregated, train_metrics = strategy.aggregate_train(server_round, usable)
        if aggregated is not None:
            arrays = aggregated
        if train_metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", train_metrics)
        drain(grid, trained.pending, timeout=round_timeout + 60)

        random.seed(derive_seed(seed, "sample-evaluate", server_round))
        messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(config)), evaluate_grid))  # type: ignore[arg-type]
        evaluated = exchange(grid, messages, server_round=server_round, phase="evaluate", site_of=site_of,
                             timeout=round_timeout, message_sink=message_sink)
        failure_sink(trained.failures + evaluated.failures)
        evaluate_metrics = strategy.aggregate_evaluate(server_round, evaluated.usable)
        if evaluate_metrics is not None:
            log(INFO, "\t└──> Aggregated MetricRecord: %s", evaluate_metrics)
        drain(grid, evaluated.pending, timeout=round_timeout + 60)
        if after_evaluate is not None:
            after_evaluate(server_round, arrays, ask)
        if evaluate_fn is not None:
            log(INFO, "Global evaluation")
            log(INFO, "\t└──> MetricRecord: %s", evaluate_fn(server_round, arrays))
        after_round(server_round, arrays)
        last_round = server_round
        if stop_after and server_round >= stop_after:
            log(INFO, "fedscan: stopping after round %d (checkpoint.stop-after)", server_round)
            break
    if after_last is not None and last_round == num_rounds:
        server_round, config = num_rounds, round_config(num_rounds)  # what `ask` sends
        after_last(num_rounds, arrays, ask)
    log(INFO, "")
    log(INFO, "Strategy execution finished in %.2fs", time.time() - started)
    return arrays
