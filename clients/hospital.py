"""A hospital's view of the simulated world: its spec, its data and its model.

Flower-free, so the ClientApp adapter stays thin and tests can drive a hospital directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from privacy.events import DPEvent
from privacy.ledger import PrivacyLedger
from sims.anatomy import class_names
from sims.config import FedscanConfig, round_lr
from sims.evaluation import evaluate_segmentation
from sims.hospitals import HospitalSpec, WorldSpec, load_hospital, make_federation
from sims.model import head_parameter_names, make_model
from sims.seeding import make_torch_generator
from sims.training import LocalTrainResult, augment_batch, make_loss, train_one_round


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

    # ------------------------------------------------------------------ privacy

    def dp_plan(self) -> DPEvent:
        """This hospital's per-round DP-SGD event as planned (``round`` left at 0).

        Sample rate ``q = batch_size / n_train``; ``local_epochs * round(1/q)`` steps per
        round; the noise multiplier is calibrated (with a target and ``calibrate_noise``)
        so that *every* planned round together meets the target: planning for all rounds
        is the conservative choice when hospitals are sampled. The same function as the
        server's pre-flight check (:func:`privacy.plan.plan_sample_level`).
        """
        from privacy.plan import plan_sample_level  # Opacus loads lazily: 0.7 s

        return plan_sample_level(**self.config.dp_plan_inputs(len(self.data("train")[0])))

    def projected_epsilon(self, ledger: PrivacyLedger, server_round: int) -> float:
        """Epsilon (RDP) this hospital would have after taking ``server_round`` as planned."""
        from privacy.accounting import epsilon

        plan = self.dp_plan()
        event = DPEvent(server_round, plan.noise_multiplier, plan.sample_rate, plan.steps)
        return epsilon([*ledger.events, event], delta=self.config.privacy.delta)

    def budget_allows(self, ledger: PrivacyLedger, server_round: int) -> bool:
        """The budget guard: may this hospital take its next round without overshooting?"""
        from privacy.accounting import would_exceed

        p = self.config.privacy
        if p.target_epsilon is None:
            return True
        plan = self.dp_plan()
        event = DPEvent(server_round, plan.noise_multiplier, plan.sample_rate, plan.steps)
        return not would_exceed(ledger.events, event, target_epsilon=p.target_epsilon, delta=p.delta)

    def train_private(self, model: torch.nn.Module, server_round: int) -> tuple[LocalTrainResult, DPEvent]:
        """One round of DP-SGD (Opacus) on the train split, in place; returns its ledger event."""
        from privacy.dpsgd import train_dp_round

        trainable = set(head_parameter_names(model)) if self.config.privacy.dp_layers == "head" else None
        frozen = [w for n, w in model.named_parameters() if trainable is not None and n not in trainable]
        for weight in frozen:
            weight.requires_grad_(False)
        images, labels = self.data("train")
        plan = self.dp_plan()
        t, p = self.config.train, self.config.privacy
        result = train_dp_round(
            model,
            torch.from_numpy(images),
            torch.from_numpy(labels),
            loss_fn=make_loss(),
            steps=plan.steps,
            sample_rate=plan.sample_rate,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=p.max_grad_norm,
            lr=round_lr(t, server_round),
            generator=make_torch_generator(self.config.seed, self.site, server_round, "dp-sgd"),
            transform=augment_batch if self.config.world.augment else None,
        )
        for weight in frozen:
            weight.requires_grad_(True)
        event = DPEvent(server_round, plan.noise_multiplier, plan.sample_rate, result.steps)
        return LocalTrainResult(loss=result.loss, steps=result.steps, num_examples=len(images)), event

    def evaluate(self, model: torch.nn.Module, split: str = "test") -> tuple[dict[str, float], int]:
        """Dice scores of ``model`` on one split, and the number of patients in it."""
        images, labels = self.data(split)
        return evaluate_segmentation(model, images, labels, class_names(self.config.world.lesions)), len(images)

