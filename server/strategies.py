"""Choose and configure a Flower strategy from the run's config.

How many hospitals take part in a round is decided in one place, :func:`round_sampling`:
``clients-per-round`` (= ``privacy.clients-per-round``; 0 = all) hospitals train each
round, in every mode, and Flower's ``fraction_*`` / ``min_*_nodes`` are derived from it.
When fewer than all train, exactly the hospitals sampled to train are evaluated in that
round (not all K, and not an independent sample): the per-round cost stays ``m``
hospitals however large the federation, and every hospital that trained reports its
privacy state (``privacy.csv``) and saves its state in the round it trained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from server.site_metrics import SiteMetrics
from sims.config import PrivacySpec, TrainSpec, clients_per_round


@dataclass(frozen=True)
class RoundSampling:
    """How many hospitals a round asks for, in Flower's terms; see :func:`round_sampling`.

    Attributes
    ----------
    per_round : int
        ``m``: hospitals sampled to train each round, in ``[1, num_hospitals]``.
    num_hospitals : int
        ``K``: hospitals in the federation.
    fraction_train, min_train_nodes : float, int
        Flower samples ``max(int(K * fraction_train), min_train_nodes)`` = ``m`` nodes.
    fraction_evaluate, min_evaluate_nodes : float, int
        ``1.0, K`` when every hospital trains; with ``m < K`` Flower's own evaluation
        sampling is bypassed (the trained hospitals are evaluated) and these are ``m / K, m``.
    min_available_nodes : int
        Nodes that must be connected before a round samples (Flower waits for them).
    evaluate_trained : bool
        ``m < K``: evaluate exactly the hospitals sampled to train in the round.
    """

    per_round: int
    num_hospitals: int
    fraction_train: float
    min_train_nodes: int
    fraction_evaluate: float
    min_evaluate_nodes: int
    min_available_nodes: int
    evaluate_trained: bool

    def flower_kwargs(self) -> dict[str, Any]:
        return {
            "fraction_train": self.fraction_train,
            "fraction_evaluate": self.fraction_evaluate,
            "min_train_nodes": self.min_train_nodes,
            "min_evaluate_nodes": self.min_evaluate_nodes,
            "min_available_nodes": self.min_available_nodes,
        }


def round_sampling(
    train: TrainSpec, num_hospitals: int, *, min_available: int | None = None
) -> RoundSampling:
    """Derive every Flower sampling parameter from ``clients-per-round`` (the one place).

    Parameters
    ----------
    train : TrainSpec
        ``train.clients_per_round`` (0 = all); config validation has already made it agree
        with ``privacy.clients-per-round``.
    num_hospitals : int
        ``K``, the connected hospitals.
    min_available : int or None
        Hospitals that must be connected for a round to start; ``None`` = all ``K`` (the
        cross-silo default). Clipped to ``[m, K]``: Flower cannot sample ``m`` of fewer.
    """
    m = clients_per_round(train.clients_per_round, num_hospitals)
    available = num_hospitals if min_available is None else min(max(min_available, m), num_hospitals)
    every = m == num_hospitals
    return RoundSampling(
        per_round=m,
        num_hospitals=num_hospitals,
        fraction_train=1.0 if every else m / num_hospitals,
        min_train_nodes=m,
        fraction_evaluate=1.0 if every else m / num_hospitals,
        min_evaluate_nodes=num_hospitals if every else m,
        min_available_nodes=available,
        evaluate_trained=not every,
    )


class EvaluateTrained:
    """Strategy mixin: evaluate exactly the hospitals sampled to train in the same round.

    Flower's ``configure_evaluate`` samples its own nodes; here it sends the evaluation to
    the nodes ``configure_train`` addressed (the round loop always calls it first), so a
    round costs ``m`` hospitals, and a hospital that trained always reports (its privacy
    row, its saved state) in that round.
    """

    _trained_nodes: list[int] | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self._trained_nodes = [msg.metadata.dst_node_id for msg in messages]
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self._trained_nodes is None:
            return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]
        nodes, self._trained_nodes = self._trained_nodes, None
        log(INFO, "configure_evaluate: the %s nodes sampled to train", len(nodes))
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})  # type: ignore[attr-defined]
        return self._construct_messages(record, nodes, MessageType.EVALUATE)  # type: ignore[attr-defined]


def _evaluating_trained(base: type[FedAvg]) -> type[FedAvg]:
    # Same class name as Flower's, so the log ("Starting FedAvg strategy") reads the same.
    return type(base.__name__, (EvaluateTrained, base), {"__module__": __name__, "__doc__": base.__doc__})


class LocalOnly(FedAvg):
    """Local-only baseline: every hospital trains its own model; nothing is averaged.

    The hospitals' replies (their local models) are kept, by hospital, for the site-by-site
    evaluation at the end (:attr:`local_models`); the global model never changes.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.local_models: dict[int, ArrayRecord] = {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            site = int(reply.content.metric_records["metrics"]["site"])  # type: ignore[arg-type]
            self.local_models[site] = reply.content.array_records["arrays"]
        _, metrics = super().aggregate_train(server_round, replies)
        return None, metrics


PoolTrainer = Callable[[int, ArrayRecord], tuple[ArrayRecord, float]]


class Pooled(FedAvg):
    """The centralised upper bound: the server trains on the training hospitals' pooled train
    splits (a hypothetical: in a real federation nobody holds them); hospitals only evaluate.

    ``trainer(round, arrays) -> (arrays, mean loss)`` trains one round.
    """

    trains_at_server = True

    def __init__(self, trainer: PoolTrainer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._trainer = trainer

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._arrays = arrays
        return []

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, loss = self._trainer(server_round, self._arrays)
        return arrays, MetricRecord({"train_loss": loss})


_FLOWER: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedbn": FedAvg, "local": LocalOnly, "pooled": Pooled,
}
_SAMPLED = {name: _evaluating_trained(cls) for name, cls in _FLOWER.items()}


def make_strategy(
    train: TrainSpec,
    num_hospitals: int,
    site_metrics: SiteMetrics,
    privacy: PrivacySpec | None = None,
    *,
    min_available: int | None = None,
    pool_trainer: PoolTrainer | None = None,
) -> Strategy:
    """Flower's own strategy, wrapped for client-level DP when asked.

    ``clients_per_round`` hospitals train each round (0 = all, the cross-silo default; see
    :func:`round_sampling`). With client-level DP, updates are averaged *uniformly* (a
    patient-count weighting would let one hospital move the mean by more than the clipping
    norm / m that the noise is calibrated to), and Flower's
    ``DifferentialPrivacyServerSideFixedClipping`` clips each update and adds Gaussian noise
    for ``m`` sampled hospitals. ``fedadam`` uses ``server_lr`` as ``eta`` and ``lr`` as
    ``eta_l`` (Reddi et al., 2021); ``fedprox`` sends ``proximal_mu`` to the hospitals.
    ``fedbn`` is FedAvg at the server (the hospitals keep their normalisation layers and send
    back the values they received for them); ``local`` is :class:`LocalOnly`; ``pooled`` is
    :class:`Pooled` and needs ``pool_trainer``.
    """
    privacy = privacy or PrivacySpec()
    sampling = round_sampling(train, num_hospitals, min_available=min_available)
    common = dict(
        **sampling.flower_kwargs(),
        weighted_by_key="uniform-weight" if privacy.client_level else "num-examples",
        train_metrics_aggr_fn=site_metrics.train,
        evaluate_metrics_aggr_fn=site_metrics.evaluate,
    )
    extra: dict[str, Any] = {}  # the strategy-specific arguments
    if train.strategy == "fedprox":
        extra = {"proximal_mu": train.proximal_mu}
    elif train.strategy == "fedadam":
        extra = {"eta": train.server_lr, "eta_l": train.lr}
    elif train.strategy == "pooled":
        if pool_trainer is None:
            raise ValueError("The 'pooled' strategy needs a pool_trainer.")
        extra = {"trainer": pool_trainer}
    # Pooled sends no train message, so "evaluate the hospitals that trained" would evaluate none.
    sampled = sampling.evaluate_trained and train.strategy != "pooled"
    cls = (_SAMPLED if sampled else _FLOWER)[train.strategy]
    strategy: Strategy = cls(**common, **extra)
    if privacy.client_level:
        from server.privacy_plan import client_noise_multiplier  # Opacus, only when needed

        # The calibrated noise when a client-level target is set: the one PrivacyLog accounts.
        sigma = client_noise_multiplier(privacy, num_hospitals, sampling.per_round, train.num_server_rounds)
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy,
            noise_multiplier=sigma,
            clipping_norm=privacy.client_clipping_norm,
            num_sampled_clients=sampling.per_round,
        )
    return strategy
