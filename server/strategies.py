"""Choose and configure a Flower strategy from the run's :class:`TrainSpec`."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from server.site_metrics import SiteMetrics
from sims.config import TrainSpec


def make_strategy(train: TrainSpec, num_hospitals: int, site_metrics: SiteMetrics) -> Strategy:
    """Every hospital trains and evaluates every round (cross-silo federation).

    ``fedadam`` uses ``server_lr`` as the server step ``eta`` and the local ``lr`` as
    ``eta_l`` (Reddi et al., 2021); ``fedprox`` sends ``proximal_mu`` to the hospitals.
    """
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=num_hospitals,
        min_evaluate_nodes=num_hospitals,
        min_available_nodes=num_hospitals,
        train_metrics_aggr_fn=site_metrics.train,
        evaluate_metrics_aggr_fn=site_metrics.evaluate,
    )
    if train.strategy == "fedprox":
        return FedProx(**common, proximal_mu=train.proximal_mu)
    if train.strategy == "fedadam":
        return FedAdam(**common, eta=train.server_lr, eta_l=train.lr)
    return FedAvg(**common)
