"""Checks made before anything starts: by the CLI (and the launcher) and again by the ServerApp.

One function, so ``fedscan run``, the launcher library and the ServerApp refuse exactly the
same plans with exactly the same sentence.
"""

from __future__ import annotations

from sims.config import FedscanConfig


def preflight(config: FedscanConfig, num_hospitals: int) -> None:
    """Raise :class:`sims.config.ConfigError` if this run cannot go as configured.

    Checks that every hospital's privacy plan can be met, and that the checkpoint to resume
    from (if any) exists, verifies with its keys and belongs to this config and federation.
    """
    if config.privacy.sample_level:
        from server.privacy_plan import check_privacy_plan  # Opacus, only when needed

        check_privacy_plan(config, num_hospitals)
    if config.checkpoint.resume_from:
        from server.checkpointing import load_resume

        load_resume(config)
