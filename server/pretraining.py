"""Pre-training on public data before round 1 (costs no patient privacy)."""

from __future__ import annotations

import torch

from clients.training import train_one_round
from sims.config import FedscanConfig
from sims.hospitals import load_hospital, make_public_cohort
from sims.seeding import make_torch_generator


def pretrain_on_public_data(model: torch.nn.Module, config: FedscanConfig) -> float:
    """Train ``model`` in place for ``privacy.pretrain_epochs`` on the public cohort.

    Returns the mean loss of the last epoch. The public cohort is template slices through
    a perfect scanner (:func:`sims.hospitals.make_public_cohort`): no hospital's patient is
    in it, so no hospital's privacy budget is touched.
    """
    spec = make_public_cohort(config.world)
    images, labels = load_hospital(config.world, spec, config.cache_dir)["train"]
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
