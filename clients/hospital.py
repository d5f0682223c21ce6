"""A hospital's view of the simulated world: its spec, its data and its model.

Flower-free, so the ClientApp adapter stays thin and tests can drive a hospital directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch

from privacy.events import DPEvent
from privacy.ledger import PrivacyLedger
from scenarios.domain_shift import SiteRole, federation_specs, site_roles
from sims.anatomy import LESION, class_names
from sims.config import FedscanConfig, MitigationSpec, round_lr
from sims.evaluation import evaluate_segmentation
from sims.hospitals import HospitalSpec, WorldSpec, load_hospital
from sims.model import head_parameter_names, make_model
from sims.seeding import make_rng, make_torch_generator
from sims.training import Adversary, LocalTrainResult, augment_batch, make_loss, train_one_round

if TYPE_CHECKING:
    from scenarios.ood import FeatureStats
    from scenarios.ood_eval import ScoredImages
    from scenarios.robustness import RobustnessRow

BatchTransform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@lru_cache(maxsize=8)
def _hospital_data(
    world: WorldSpec, spec: HospitalSpec, cache_dir: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    # Bounded: one simulation process may serve many hospitals in turn; the disk cache
    # makes a re-load cheap, so memory stays flat however many hospitals there are.
    return load_hospital(world, spec, cache_dir)


@lru_cache(maxsize=16)
def _landmarks(world: WorldSpec, spec: HospitalSpec, cache_dir: str) -> tuple[float, ...]:
    from scenarios.mitigations import image_landmarks

    return tuple(float(v) for v in image_landmarks(_hospital_data(world, spec, cache_dir)["train"][0]))


@lru_cache(maxsize=16)
def _prepared(
    world: WorldSpec, spec: HospitalSpec, cache_dir: str, split: str, noise: tuple[float, str],
    mitigation: MitigationSpec, own_landmarks: tuple[float, ...], standard: tuple[float, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """One split after the hospital's annotation noise and intensity standardisation."""
    images, labels = _hospital_data(world, spec, cache_dir)[split]
    rate, kind = noise
    if rate > 0:
        from scenarios.label_noise import corrupt_labels

        rng = make_rng(world.seed, spec.hospital_id, split, "label-noise")
        labels = corrupt_labels(labels, rate=rate, kind=kind, rng=rng, lesion_class=LESION if world.lesions else None)
    return _standardize(images, mitigation, own_landmarks, standard), labels


def _standardize(
    images: np.ndarray, mitigation: MitigationSpec, own_landmarks: tuple[float, ...], standard: tuple[float, ...]
) -> np.ndarray:
    """``images`` under ``mitigation.standardize``: per-image z-score, or histogram standardisation
    from this hospital's landmarks to the federation's ``standard`` (unchanged until it has one)."""
    if mitigation.standardize == "zscore":
        from scenarios.mitigations import zscore_images

        return zscore_images(images)
    if mitigation.standardize == "histogram" and standard:
        from scenarios.mitigations import apply_histogram_standardization

        return apply_histogram_standardization(images, np.asarray(own_landmarks), np.asarray(standard))
    return images


def _zscore_batch(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    from scenarios.mitigations import zscore_images

    return torch.from_numpy(zscore_images(x.numpy())), y


@dataclass(frozen=True)
class Hospital:
    """One simulated hospital (a Flower SuperNode's ``partition-id``).

    ``hist_standard`` is the federation's histogram-standardisation scale (the mean of the
    training hospitals' landmarks, from the server), used with ``mitigation.standardize =
    "histogram"``; empty until the server has it.
    """

    config: FedscanConfig
    spec: HospitalSpec
    role: SiteRole | None = None
    hist_standard: tuple[float, ...] = ()

    @classmethod
    def from_partition(
        cls, config: FedscanConfig, partition_id: int, num_partitions: int, *, hist_standard: tuple[float, ...] = ()
    ) -> Hospital:
        specs = federation_specs(config, num_partitions)
        role = site_roles(config, num_partitions)[partition_id]
        return cls(config=config, spec=specs[partition_id], role=role, hist_standard=tuple(hist_standard))

    @property
    def site(self) -> int:
        return self.spec.hospital_id

    @property
    def trains(self) -> bool:
        """Whether this hospital ever trains (an unseen hospital only evaluates)."""
        return self.role is None or self.role.join_round > 0

    def raw_data(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """A split as the scanner made it (no annotation noise, no standardisation)."""
        return _hospital_data(self.config.world, self.spec, self.config.cache_dir)[split]

    def data(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """A split as this hospital evaluates on it: its own annotations (noisy when
        ``shift.label-noise-hospital`` names it) and the standardisation ``mitigation`` asks for."""
        return self._data(split, self.config.mitigation)

    def training_data(self) -> tuple[np.ndarray, np.ndarray]:
        """The train split as training reads it: like :meth:`data`, except that a per-image
        z-score is left to :meth:`batch_transform`, after augmentation (which clips at 0 and
        would erase the negative half of a z-scored brain)."""
        mitigation = self.config.mitigation
        if mitigation.standardize == "zscore":
            mitigation = dataclasses.replace(mitigation, standardize="none")
        return self._data("train", mitigation)

    def _data(self, split: str, mitigation: MitigationSpec) -> tuple[np.ndarray, np.ndarray]:
        noise = (self.role.label_noise_rate if self.role else 0.0, self.config.shift.label_noise_kind)
        if noise[0] == 0 and mitigation.standardize == "none":
            return self.raw_data(split)
        own: tuple[float, ...] = ()
        if mitigation.standardize == "histogram" and self.hist_standard:
            own = tuple(float(v) for v in self.landmarks())
        return _prepared(self.config.world, self.spec, self.config.cache_dir, split, noise, mitigation, own,
                         self.hist_standard)



    def landmarks(self) -> np.ndarray:
        """This hospital's histogram landmarks (mean foreground percentiles of its train images): a
        summary of P numbers, what it shares for federated histogram standardisation."""
        return np.asarray(_landmarks(self.config.world, self.spec, self.config.cache_dir))

    def intensity_histogram(self) -> np.ndarray:
        """The normalised intensity histogram of its test images (a summary), for the shift measure."""
        from scenarios.shift_measures import intensity_histogram

        return intensity_histogram(self.raw_data("test")[0])

    def new_model(self) -> torch.nn.Module:
        t = self.config.train
        return make_model(len(class_names(self.config.world.lesions)), t.unet_channels, norm=t.norm)

    def batch_transform(self) -> BatchTransform | None:
        """The training-time transform of each batch: flips/gain/gamma (``augment``), random
        scanner effects (``mitigation.scanner-augment``), then the per-image z-score
        (``mitigation.standardize = "zscore"``); ``None`` when all are off."""
        steps: list[BatchTransform] = []
        if self.config.world.augment:
            steps.append(augment_batch)
        if self.config.mitigation.scanner_augment:
            from scenarios.mitigations import scanner_augment_batch

            steps.append(scanner_augment_batch)
        if self.config.mitigation.standardize == "zscore":
            steps.append(_zscore_batch)
        if not steps:
            return None
        if len(steps) == 1:
            return steps[0]

        def chain(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            for step in steps:
                x, y = step(x, y, generator)
            return x, y

        return chain

    @property
    def clip(self) -> tuple[float | None, float | None]:
        """Intensity range of the model's inputs: raw magnitudes are >= 0; standardised images
        (z-score, histogram standardisation's piecewise-linear map) may be negative."""
        return (0.0, None) if self.config.mitigation.standardize == "none" else (None, None)

    def adversary(self) -> Adversary | None:
        """Adversarial training's batch transform (``adv-train.*``), or ``None`` when it is off."""
        a = self.config.adv_train
        if a.ratio == 0:
            return None
        from scenarios.adversarial import make_adversary

        return make_adversary(ratio=a.ratio, eps=a.eps / 255.0, steps=a.steps, clip=self.clip)

    def train(self, model: torch.nn.Module, server_round: int, *, proximal_mu: float = 0.0) -> LocalTrainResult:
        """One round of local training on the train split, in place."""
        images, labels = self.training_data()
        t = self.config.train
        return train_one_round(
            model,
            images,
            labels,
            epochs=t.local_epochs,
            lr=round_lr(t, server_round),
            batch_size=t.batch_size,
            generator=make_torch_generator(self.config.seed, self.site, server_round, "train"),
            augment=False,
            transform=self.batch_transform(),
            proximal_mu=proximal_mu,
            adversary=self.adversary(),
        )

    def finetune(self, model: torch.nn.Module) -> LocalTrainResult:
        """Personalisation: ``finetune-epochs`` epochs of local training of ``model`` (in place)
        at the run's base learning rate; its own random stream."""
        images, labels = self.training_data()
        t = self.config.train
        return train_one_round(
            model, images, labels, epochs=t.finetune_epochs, lr=t.lr, batch_size=t.batch_size,
            generator=make_torch_generator(self.config.seed, self.site, t.num_server_rounds, "finetune"),
            augment=False, transform=self.batch_transform(),
        )

    def adapt(self, model: torch.nn.Module) -> None:
        """Test-time adaptation (in place) from this hospital's unlabelled train images:
        ``mitigation.tta = "adabn"`` re-estimates the BatchNorm statistics; ``"tent"`` does that
        (when there is BatchNorm) and then one pass of entropy minimisation on the normalisation
        layers' scale and shift, in a fixed order (no randomness)."""
        from scenarios.normalization import adapt_batch_norm, entropy_minimization

        images = self.data("train")[0]
        batch = self.config.train.batch_size * 4
        adapt_batch_norm(model, images, batch_size=batch)  # a no-op without BatchNorm
        if self.config.mitigation.tta == "tent":
            entropy_minimization(model, images, epochs=1, batch_size=batch)

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
        images, labels = self.training_data()
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
            transform=self.batch_transform(),
            adversary=self.adversary(),
        )
        for weight in frozen:
            weight.requires_grad_(True)
        event = DPEvent(server_round, plan.noise_multiplier, plan.sample_rate, result.steps)
        return LocalTrainResult(loss=result.loss, steps=result.steps, num_examples=len(images)), event

    def evaluate(self, model: torch.nn.Module, split: str = "test") -> tuple[dict[str, float], int]:
        """Dice scores of ``model`` on one split, and the number of patients in it."""
        images, labels = self.data(split)
        return evaluate_segmentation(model, images, labels, class_names(self.config.world.lesions)), len(images)

    # ------------------------------------------------------------------ scenarios: OOD and robustness

    def standardize(self, images: np.ndarray) -> np.ndarray:
        """``images`` (as a scanner made them) standardised the way :meth:`data` standardises this
        hospital's own (``mitigation.standardize``): what the model sees of a corrupted acquisition."""
        mitigation = self.config.mitigation
        histogram = mitigation.standardize == "histogram" and self.hist_standard
        own = tuple(float(v) for v in self.landmarks()) if histogram else ()
        return _standardize(images, mitigation, own, self.hist_standard)

    def feature_stats(self, model: torch.nn.Module) -> FeatureStats:
        """Sufficient statistics (count, sum, sum of outer products; per image class) of the model's
        features (scenarios.ood_eval.feature_blocks) on this hospital's train images: what it shares for Mahalanobis scores."""
        from scenarios.ood_eval import feature_stats

        images, labels = self.data("train")
        return feature_stats(model, images, labels, lesion_class=LESION if self.config.world.lesions else None)

    def ood_sets(self) -> list[tuple[str, str, np.ndarray, np.ndarray | None]]:
        """The image sets this hospital scores: ``(name, kind, images, labels or None)``.

        A training hospital: its test split (``"in"``), its validation split (``"val"``: where the
        server calibrates the accept threshold) and every generated set of ``ood.sets``,
        made from its own test acquisitions (then standardised as usual). An evaluate-only
        hospital: its own test split, an unseen scanner (``unseen-scanner`` near OOD at the
        training severity, ``scanner-sev<S>`` far OOD at a higher one).
        """
        images, labels = self.data("test")
        if not self.trains:
            severity = self.role.severity if self.role is not None else self.config.world.scanner_severity
            if severity <= self.config.world.scanner_severity:
                return [("unseen-scanner", "near", images, labels)]
            return [(f"scanner-sev{severity:g}", "far", images, labels)]
        from scenarios.corruptions import OOD_SETS, make_ood_set

        raw = self.raw_data("test")[0]
        sets: list[tuple[str, str, np.ndarray, np.ndarray | None]] = [
            ("in", "in", images, labels), ("val", "val", *self.data("val"))
        ]
        for name in self.config.ood.sets:
            spec = OOD_SETS[name]
            made = make_ood_set(name, raw, make_rng(self.config.seed, self.site, "ood-set", name))
            sets.append((name, spec.kind, self.standardize(made), labels if spec.has_labels else None))
        return sets

    def ood_scores(self, model: torch.nn.Module, stats: FeatureStats | None) -> list[tuple[str, str, ScoredImages]]:
        """Every OOD score of ``ood.scores`` (and per-image Dice where there are labels) of every set
        of :meth:`ood_sets`: ``(set name, kind, scored images)``."""
        from scenarios.ood_eval import score_images

        o = self.config.ood
        classes = class_names(self.config.world.lesions)
        return [
            (name, kind, score_images(model, images, labels, families=o.scores, class_names=classes, stats=stats,
                                      top_percent=o.top_percent))
            for name, kind, images, labels in self.ood_sets()
        ]

    def robustness(self, model: torch.nn.Module) -> list[RobustnessRow]:
        """Dice on this hospital's test split under every corruption and attack of ``robustness.*``
        and ``attack.*`` (strength 0 = clean)."""
        from scenarios.robustness import robustness_curves

        raw = self.raw_data("test")[0]
        labels = self.data("test")[1]
        return robustness_curves(
            model, raw, labels, self.config.robustness, class_names=class_names(self.config.world.lesions),
            seed=self.config.seed, site=self.site, clip=self.clip, prepare=self.standardize,
        )
