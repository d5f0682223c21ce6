"""Check, before any training, that every hospital's privacy plan can be met."""

from __future__ import annotations

from privacy.accounting import calibrate_noise_multiplier, epsilon
from privacy.dpsgd import sample_rate, steps_per_epoch
from privacy.events import DPEvent
from sims.config import ConfigError, FedscanConfig
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
        q = sample_rate(n, t.batch_size)
        steps = t.local_epochs * steps_per_epoch(n, t.batch_size)
        if p.calibrate_noise:
            try:
                calibrate_noise_multiplier(
                    target_epsilon=p.target_epsilon, delta=p.delta, sample_rate=q, steps=steps * t.num_server_rounds
                )
            except ValueError as err:
                raise ConfigError(
                    f"The 'privacy.target-epsilon' parameter ({p.target_epsilon:g}) cannot be met by hospital "
                    f"{spec.hospital_id} with {t.num_server_rounds} rounds x {steps} steps at q = {q:.3g}: {err}"
                ) from None
        else:
            one_round = epsilon([DPEvent(1, p.noise_multiplier, q, steps)], delta=p.delta)
            if one_round > p.target_epsilon:
                raise ConfigError(
                    f"The 'privacy.target-epsilon' parameter ({p.target_epsilon:g}) cannot be met with the planned "
                    f"steps: one round of hospital {spec.hospital_id} ({steps} steps at q = {q:.3g}, noise "
                    f"{p.noise_multiplier:g}) already spends epsilon {one_round:.3g}. Raise the noise, lower the "
                    "steps, or set privacy.calibrate-noise=true."
                )
