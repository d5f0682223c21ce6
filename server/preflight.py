"""Checks made before anything starts: by the CLI (and the launcher) and again by the ServerApp.

One function, so ``fedscan run``, the launcher library and the ServerApp refuse exactly the
same plans with exactly the same sentence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sims.config import FedscanConfig, ShiftSpec

if TYPE_CHECKING:
    from server.checkpointing import ResumeState


def preflight(config: FedscanConfig, num_hospitals: int) -> ResumeState | None:
    """Raise :class:`sims.config.ConfigError` if this run cannot go as configured.

    Checks that the domain-shift settings leave hospitals to train, that every hospital's privacy plan can be met, that the checkpoint to resume from
    (if any) exists, verifies with its keys and belongs to this config and federation size,
    and that a configured keyring holds the server's and every hospital's keys.

    Returns the verified, decrypted state to resume from (``None`` for a fresh run), so the
    ServerApp does not read and decrypt the checkpoint a second time.
    """
    trainers = num_hospitals
    if config.shift != ShiftSpec():  # torch and MONAI (the scanners) only when a shift is configured
        from scenarios.domain_shift import site_roles, training_sites

        trainers = len(training_sites(site_roles(config, num_hospitals)))  # raises on impossible shift settings
    if config.privacy.sample_level:
        from server.privacy_plan import check_privacy_plan  # Opacus, only when needed

        check_privacy_plan(config, num_hospitals)
    if config.privacy.client_level:
        from server.privacy_plan import check_client_privacy_plan  # Opacus, only when needed

        check_client_privacy_plan(config, trainers)  # q = m / K over the hospitals that train
    if not (config.checkpoint.resume_from or config.checkpoint.keyring):
        return None
    from server.checkpointing import check_configured_keyring, load_resume  # torch: only when needed

    resume = load_resume(config, num_hospitals) if config.checkpoint.resume_from else None
    check_configured_keyring(config, num_hospitals)
    return resume
