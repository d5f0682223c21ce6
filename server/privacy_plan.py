"""The run's DP plan from its config: checked before any training, used by the strategy and the log.

Thin adapters from :class:`sims.config.FedscanConfig` to the pure plan functions of
:mod:`privacy.plan` (which the hospitals call too), so the server checks, adds and accounts
exactly the noise the plan says.
"""

from __future__ import annotations

from privacy.accounting import epsilon
from privacy.dpsgd import sample_rate, steps_per_epoch
from privacy.events import DPEvent
from privacy.plan import plan_client_level, plan_sample_level
from sims.config import ConfigError, FedscanConfig, PrivacySpec, clients_per_round
from sims.hospitals import make_federation, split_sizes


def check_privacy_plan(config: FedscanConfig, num_hospitals: int) -> None:
    """Raise :class:`ConfigError` if some hospital's target epsilon cannot be met.

    With calibration, the target must be reachable with a finite noise multiplier for the
    planned steps; without it, one round at the fixed noise must fit in the budget (else
    the hospital could never train).
    """
    p, t = config.privacy, config.train
    if not p.sample_level or p.target_epsilon is None:
        return
    for spec in make_federation(config.world, num_hospitals):
        n = split_sizes(config.world, spec)["train"]
        try:
            plan = plan_sample_level(**config.dp_plan_inputs(n))
        except ValueError as err:
            q, steps = sample_rate(n, t.batch_size), t.local_epochs * steps_per_epoch(n, t.batch_size)
            raise ConfigError(
                f"The 'privacy.target-epsilon' parameter ({p.target_epsilon:g}) cannot be met by hospital "
                f"{spec.hospital_id} with {t.num_server_rounds} rounds x {steps} steps at q = {q:.3g}: {err}"
            ) from None
        if not p.calibrate_noise:
            one_round = epsilon([plan], delta=p.delta)
            if one_round > p.target_epsilon:
                raise ConfigError(
                    f"The 'privacy.target-epsilon' parameter ({p.target_epsilon:g}) cannot be met with the "
                    f"planned steps: one round of hospital {spec.hospital_id} ({plan.steps} steps at "
                    f"q = {plan.sample_rate:.3g}, noise {p.noise_multiplier:g}) already spends epsilon "
                    f"{one_round:.3g}. Raise the noise, lower the steps, or set privacy.calibrate-noise=true."
                )


def client_level_plan(privacy: PrivacySpec, num_hospitals: int, per_round: int, num_rounds: int) -> DPEvent:
    """The server's DP-FedAvg round as planned: noise multiplier, client rate ``q``, one release.

    Parameters
    ----------
    privacy : PrivacySpec
        ``client_target_epsilon``, ``calibrate_noise``, ``client_noise_multiplier``, ``delta``.
    num_hospitals : int
        Hospitals in the federation.
    per_round : int
        Hospitals trained per round, resolved (see :func:`sims.config.clients_per_round`).
    num_rounds : int
        Planned rounds (``num-server-rounds``).

    Raises
    ------
    ValueError
        If the client-level target cannot be met with calibration (see
        :func:`check_client_privacy_plan` for the user-facing sentence).
    """
    return plan_client_level(
        num_clients=num_hospitals,
        clients_per_round=per_round,
        num_rounds=num_rounds,
        target_epsilon=privacy.client_target_epsilon,
        delta=privacy.delta,
        noise_multiplier=privacy.client_noise_multiplier,
        calibrate=privacy.calibrate_noise,
    )


def client_noise_multiplier(
    privacy: PrivacySpec, num_hospitals: int, per_round: int, num_rounds: int
) -> float:
    """The noise multiplier DP-FedAvg adds and :class:`server.privacy_log.PrivacyLog` accounts.

    ``privacy.client_noise_multiplier``, or with a ``client_target_epsilon`` and
    ``calibrate_noise`` the one calibrated to it for ``num_rounds`` rounds at
    ``q = per_round / num_hospitals``.
    """
    return client_level_plan(privacy, num_hospitals, per_round, num_rounds).noise_multiplier


def check_client_privacy_plan(config: FedscanConfig, num_hospitals: int) -> None:
    """Raise :class:`ConfigError` if the client-level target epsilon cannot be met.

    With calibration, the target must be reachable for the planned rounds; without it, one
    round at ``privacy.client-noise-multiplier`` must fit in the budget (else the server's
    guard would stop the federation before round 1).
    """
    p, t = config.privacy, config.train
    if not p.client_level or p.client_target_epsilon is None:
        return
    m = clients_per_round(t.clients_per_round, num_hospitals)
    q = m / num_hospitals
    try:
        plan = client_level_plan(p, num_hospitals, m, t.num_server_rounds)
    except ValueError as err:
        raise ConfigError(
            f"The 'privacy.client-target-epsilon' parameter ({p.client_target_epsilon:g}) cannot be met with "
            f"{t.num_server_rounds} rounds at client sampling rate q = {m}/{num_hospitals}: {err}"
        ) from None
    if not p.calibrate_noise:
        one_round = epsilon([plan], delta=p.delta)
        if one_round > p.client_target_epsilon:
            raise ConfigError(
                f"The 'privacy.client-target-epsilon' parameter ({p.client_target_epsilon:g}) cannot be "
                f"met: one round of DP-FedAvg (noise {p.client_noise_multiplier:g}, q = {q:.3g}, delta "
                f"{p.delta:g}) already spends client-level epsilon {one_round:.3g}. Raise "
                "privacy.client-noise-multiplier, sample fewer hospitals per round, or set "
                "privacy.calibrate-noise=true."
            )
