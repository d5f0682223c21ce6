"""Pre-training on public data before round 1 (costs no patient privacy)."""

from __future__ import annotations

import numpy as np
import torch

from sims.config import FedscanConfig
from sims.hospitals import PUBLIC_SCANNERS, load_hospital, make_public_cohort
from sims.seeding import make_torch_generator
from sims.training import train_one_round


def pretrain_on_public_data(model: torch.nn.Module, config: FedscanConfig) -> float:
    """Train ``model`` in place for ``privacy.pretrain_epochs`` on public cohorts.

    Returns the mean loss. The public data are template slices through a perfect scanner
    and through four simulated non-hospital scanners (one per archetype) (:func:`make_public_cohort`): no
    hospital's patient is in them, so no hospital's privacy budget is touched.
    """
    parts = [load_hospital(config.world, make_public_cohort(config.world, index=k), config.cache_dir)["train"]
             for k in range(PUBLIC_SCANNERS)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    t = config.train
    result = train_one_round(
        model,
        images,
        labels,
        epochs=config.privacy.pretrain_epochs,
        lr=t.lr,
        batch_size=t.batch_size,
        generator=make_torch_generator(config.seed, "public", "pretrain"),
        augment=config.world.augment,
    )
    return result.loss
