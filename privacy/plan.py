"""The DP plan: what each private mechanism of a run will do per round, fixed before round 1.

One home for the plan, so the hospital that trains, the server that checks the plan before
anything starts, the strategy that adds the noise and the log that accounts for it all use
the same numbers:

- :func:`plan_sample_level`: a hospital's DP-SGD per round (Poisson rate ``q = batch_size /
  n_train``, ``local_epochs * round(1/q)`` steps, the noise multiplier);
- :func:`plan_client_level`: the server's DP-FedAvg per round (client rate ``q =
  clients_per_round / num_clients``, one Gaussian release, the noise multiplier).

With a target and ``calibrate=True`` the noise multiplier is calibrated so that *all*
planned rounds together meet the target (:func:`privacy.accounting.calibrate_noise_multiplier`,
never above it by Opacus' or ``dp_accounting``'s RDP accountant); otherwise the given noise
multiplier is kept and the target is only the cap of the budget guard. Planning for every
round is the conservative choice when participation is sampled. Pure functions of numbers,
keyword-only, cached (a plan is asked for several times a round).
"""

from __future__ import annotations

from functools import lru_cache

from privacy.accounting import calibrate_noise_multiplier
from privacy.dpsgd import sample_rate, steps_per_epoch
from privacy.events import DPEvent, InvalidParameterError, check_float, check_int

__all__ = ["plan_client_level", "plan_sample_level"]


def plan_sample_level(
    *,
    n_train: int,
    batch_size: int,
    local_epochs: int,
    num_rounds: int,
    target_epsilon: float | None,
    delta: float,
    noise_multiplier: float,
    calibrate: bool,
) -> DPEvent:
    """One hospital's planned DP-SGD round (Abadi et al. 2016, Poisson sampling).

    Parameters
    ----------
    n_train : int
        Patients in the hospital's train split, >= 1 (one slice each: a sample is a patient).
    batch_size : int
        Expected Poisson batch, >= 1.
    local_epochs : int
        Local epochs per round, >= 1.
    num_rounds : int
        Planned federated rounds, >= 1; calibration covers all of them.
    target_epsilon : float or None
        Per-patient budget, > 0; ``None``: no target (``noise_multiplier`` is used).
    delta : float
        Target delta, in (0, 1).
    noise_multiplier : float
        Noise multiplier used without calibration, >= 0.
    calibrate : bool
        With a target: calibrate the noise multiplier to it (``True``) or keep
        ``noise_multiplier`` (``False``; the target is then only the guard's cap).

    Returns
    -------
    DPEvent
        ``round = 0`` (a plan, not a record), the noise multiplier, ``sample_rate = q`` and
        the steps of one round.

    Raises
    ------
    InvalidParameterError
        (a ``ValueError``) for an invalid argument.
    ValueError
        If ``calibrate`` and the target cannot be met with a noise multiplier up to
        :data:`privacy.accounting.MAX_NOISE_MULTIPLIER`.

    Examples
    --------
    >>> plan = plan_sample_level(n_train=106, batch_size=8, local_epochs=2, num_rounds=30,
    ...                          target_epsilon=None, delta=1e-5, noise_multiplier=1.1, calibrate=True)
    >>> plan.noise_multiplier, round(plan.sample_rate, 4), plan.steps
    (1.1, 0.0755, 26)
    """
    owner = "plan_sample_level"
    n_train = check_int("n_train", n_train, owner=owner, low=1)
    batch_size = check_int("batch_size", batch_size, owner=owner, low=1)
    local_epochs = check_int("local_epochs", local_epochs, owner=owner, low=1)
    q = sample_rate(n_train, batch_size)
    steps = local_epochs * steps_per_epoch(n_train, batch_size)
    sigma = _noise(owner, target_epsilon, delta, noise_multiplier, calibrate, q, steps, num_rounds)
    return DPEvent(round=0, noise_multiplier=sigma, sample_rate=q, steps=steps)


def plan_client_level(
    *,
    num_clients: int,
    clients_per_round: int,
    num_rounds: int,
    target_epsilon: float | None,
    delta: float,
    noise_multiplier: float,
    calibrate: bool,
) -> DPEvent:
    """The server's planned DP-FedAvg round (McMahan et al. 2018): one Gaussian release of the
    clipped mean of ``clients_per_round`` sampled hospitals.

    Accounted as Poisson subsampling at ``q = clients_per_round / num_clients`` (the paper's
    analysis; Flower samples a fixed-size subset, for which it is the usual approximation;
    ``q = 1`` has no amplification at all).

    Parameters
    ----------
    num_clients : int
        Hospitals in the federation, >= 1.
    clients_per_round : int
        Hospitals sampled per round, in [1, num_clients] (already resolved: not 0 = all).
    num_rounds : int
        Planned rounds, >= 1; calibration covers all of them.
    target_epsilon : float or None
        Client-level budget, > 0; ``None``: no target.
    delta : float
        Target delta, in (0, 1).
    noise_multiplier : float
        Server noise multiplier (noise std / clipping norm) used without calibration, >= 0.
    calibrate : bool
        With a target: calibrate the noise multiplier to it, or keep ``noise_multiplier``.

    Returns
    -------
    DPEvent
        ``round = 0``, the noise multiplier, ``sample_rate = q``, ``steps = 1``.

    Raises
    ------
    InvalidParameterError
        (a ``ValueError``) for an invalid argument.
    ValueError
        If ``calibrate`` and the target cannot be met.
    """
    owner = "plan_client_level"
    num_clients = check_int("num_clients", num_clients, owner=owner, low=1)
    clients_per_round = check_int("clients_per_round", clients_per_round, owner=owner, low=1)
    if clients_per_round > num_clients:
        raise ValueError(
            f"The 'clients_per_round' parameter of {owner} must be an int in [1, num_clients={num_clients}]. "
            f"Got {clients_per_round} instead."
        )
    q = clients_per_round / num_clients
    sigma = _noise(owner, target_epsilon, delta, noise_multiplier, calibrate, q, 1, num_rounds)
    return DPEvent(round=0, noise_multiplier=sigma, sample_rate=q, steps=1)


def _noise(
    owner: str,
    target_epsilon: float | None,
    delta: float,
    noise_multiplier: float,
    calibrate: bool,
    q: float,
    steps: int,
    num_rounds: int,
) -> float:
    num_rounds = check_int("num_rounds", num_rounds, owner=owner, low=1)
    delta = check_float("delta", delta, owner=owner, low=0.0, high=1.0, low_open=True, high_open=True)
    noise_multiplier = check_float("noise_multiplier", noise_multiplier, owner=owner, low=0.0)
    if not isinstance(calibrate, bool):
        raise InvalidParameterError(
            f"The 'calibrate' parameter of {owner} must be a bool. Got {calibrate!r} instead."
        )
    if target_epsilon is None:
        return noise_multiplier
    target_epsilon = check_float("target_epsilon", target_epsilon, owner=owner, low=0.0, low_open=True)
    if not calibrate:
        return noise_multiplier
    return _calibrated(target_epsilon, delta, q, steps * num_rounds)


@lru_cache(maxsize=256)
def _calibrated(target_epsilon: float, delta: float, q: float, steps: int) -> float:
    return calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=q, steps=steps)
