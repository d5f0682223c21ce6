"""Choose and configure a Flower strategy from the run's config."""

from __future__ import annotations

from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedProx,
    Strategy,
)

from server.site_metrics import SiteMetrics
from sims.config import PrivacySpec, TrainSpec


def make_strategy(
    train: TrainSpec, num_hospitals: int, site_metrics: SiteMetrics, privacy: PrivacySpec | None = None
) -> Strategy:
    """Flower's own strategy, wrapped for client-level DP when asked.

    Without client-level DP every hospital trains and evaluates every round
    (cross-silo). With it, ``clients_per_round`` hospitals train each round (0 = all),
    updates are averaged *uniformly* (a patient-count weighting would let one hospital
    move the mean by more than the clipping norm / m that the noise is calibrated to),
    and Flower's ``DifferentialPrivacyServerSideFixedClipping`` clips each update and
    adds Gaussian noise. ``fedadam`` uses ``server_lr`` as ``eta`` and ``lr`` as
    ``eta_l`` (Reddi et al., 2021); ``fedprox`` sends ``proximal_mu`` to the hospitals.
    """
    privacy = privacy or PrivacySpec()
    m = num_hospitals
    if privacy.client_level and privacy.clients_per_round:
        m = min(privacy.clients_per_round, num_hospitals)
    common = dict(
        fraction_train=m / num_hospitals,
        fraction_evaluate=1.0,
        min_train_nodes=m,
        min_evaluate_nodes=num_hospitals,
        min_available_nodes=num_hospitals,
        weighted_by_key="uniform-weight" if privacy.client_level else "num-examples",
        train_metrics_aggr_fn=site_metrics.train,
        evaluate_metrics_aggr_fn=site_metrics.evaluate,
    )
    strategy: Strategy
    if train.strategy == "fedprox":
        strategy = FedProx(**common, proximal_mu=train.proximal_mu)
    elif train.strategy == "fedadam":
        strategy = FedAdam(**common, eta=train.server_lr, eta_l=train.lr)
    else:
        strategy = FedAvg(**common)
    if privacy.client_level:
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy,
            noise_multiplier=privacy.client_noise_multiplier,
            clipping_norm=privacy.client_clipping_norm,
            num_sampled_clients=m,
        )
    return strategy
