"""A hospital's view of the simulated world: its spec, its data and its model.

Flower-free, so the ClientApp adapter stays thin and tests can drive a hospital directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from clients.training import LocalTrainResult, train_one_round
from sims.anatomy import class_names
from sims.config import FedscanConfig, round_lr
from sims.evaluation import evaluate_segmentation
from sims.hospitals import HospitalSpec, WorldSpec, load_hospital, make_federation
from sims.model import make_model
from sims.seeding import make_torch_generator


@lru_cache(maxsize=8)
def _hospital_data(
    world: WorldSpec, spec: HospitalSpec, cache_dir: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # Bounded: one simulation process may serve many hospitals in turn; the disk cache
    # makes a re-load cheap, so memory stays flat however many hospitals there are.
    return load_hospital(world, spec, cache_dir)


@dataclass(frozen=True)
class Hospital:
    """One simulated hospital (a Flower SuperNode's ``partition-id``)."""

    config: FedscanConfig
    spec: HospitalSpec

    @classmethod
    def from_partition(cls, config: FedscanConfig, partition_id: int, num_partitions: int) -> Hospital:
        specs = make_federation(config.world, num_partitions)
        return cls(config=config, spec=specs[partition_id])

    @property
    def site(self) -> int:
        return self.spec.hospital_id

    def data(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return _hospital_data(self.config.world, self.spec, self.config.cache_dir)[split]

    def new_model(self) -> torch.nn.Module:
        return make_model(len(class_names(self.config.world.lesions)), self.config.train.unet_channels)

    def train(self, model: torch.nn.Module, server_round: int, *, proximal_mu: float = 0.0) -> LocalTrainResult:
        """One round of local training on the train split, in place."""
        images, labels = self.data("train")
        t = self.config.train
        return train_one_round(
            model,
            images,
            labels,
            epochs=t.local_epochs,
            lr=round_lr(t, server_round),
            batch_size=t.batch_size,
            generator=make_torch_generator(self.config.seed, self.site, server_round, "train"),
            augment=self.config.world.augment,
            proximal_mu=proximal_mu,
        )

    def evaluate(self, model: torch.nn.Module, split: str = "test") -> tuple[dict[str, float], int]:
        """Dice scores of ``model`` on one split, and the number of patients in it."""
        images, labels = self.data(split)
        return evaluate_segmentation(model, images, labels, class_names(self.config.world.lesions)), len(images)
