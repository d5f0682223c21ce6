"""Robustness curves at one hospital: Dice against the strength of corruptions and attacks.

Flower-free: :meth:`clients.hospital.Hospital.robustness` calls :func:`robustness_curves` on its
own test split with the global model; only the resulting Dice values (one number per
perturbation and strength) leave the hospital.

Corruptions (:mod:`scenarios.corruptions`): Gaussian noise, salt-and-pepper, contrast (gamma),
blur and rotation, each at every listed strength; strength 0 is the clean image. Attacks
(:mod:`scenarios.attacks`): FGSM and PGD (L-inf, L2) against the segmentation loss, every listed
eps; eps 0 is the clean image. Each perturbation draws from its own generator, derived from
``(seed, hospital, "robustness", name, index of the strength)``: the same run gives the same
numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sims.config import RobustnessSpec
from sims.evaluation import per_patient_dice
from sims.seeding import make_rng, make_torch_generator

ATTACK_UNITS = {"fgsm": "eps (1/255)", "pgd-linf": "eps (1/255)", "pgd-l2": "eps (L2)"}


@dataclass(frozen=True)
class RobustnessRow:
    """Mean foreground Dice of one hospital's test split under one perturbation at one strength."""

    perturbation: str
    family: str  # "corruption" or "attack"
    strength: float
    unit: str
    dice: float
    n: int


def corruption_levels(spec: RobustnessSpec) -> dict[str, tuple[float, ...]]:
    """``{corruption name: strengths}`` of the corruptions ``spec`` asks for (names of
    :data:`scenarios.corruptions.PERTURBATIONS`)."""
    levels = {
        "noise": spec.noise,
        "salt-pepper": spec.salt_pepper,
        "contrast": spec.contrast,
        "blur": spec.blur,
        "rotation": spec.rotation,
    }
    return {name: values for name, values in levels.items() if values}


def attack_levels(spec: RobustnessSpec) -> dict[str, tuple[float, ...]]:
    """``{attack: eps list}`` (L-inf lists in units of 1/255, as configured)."""
    return {k: spec.attack_l2_eps if k == "pgd-l2" else spec.attack_eps for k in spec.attack_kinds}


def robustness_curves(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    spec: RobustnessSpec,
    *,
    class_names: tuple[str, ...],
    seed: int,
    site: int,
    clip: tuple[float | None, float | None] = (0.0, None),
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
    batch_size: int = 16,
) -> list[RobustnessRow]:
    """Dice of ``model`` on ``(images, labels)`` under every perturbation and strength of ``spec``.

    Parameters
    ----------
    images : ndarray, shape (N, 1, H, W), float32
        The test images as the scanner made them (corruptions act on acquisitions).
    labels : ndarray, shape (N, 1, H, W)
    prepare : callable, optional
        The hospital's intensity standardisation, applied after a corruption (and to the clean
        images before an attack: attacks act on the model's input).
    clip : (float or None, float or None)
        Intensity range of adversarial images (``(None, None)`` for z-scored inputs).
    """
    from scenarios.attacks import fgsm, pgd
    from scenarios.corruptions import PERTURBATIONS, perturb

    prep = prepare if prepare is not None else (lambda x: x)
    rows: list[RobustnessRow] = []

    def dice(x: np.ndarray, y: np.ndarray) -> float:
        return float(per_patient_dice(model, x, y, class_names).mean())

    for name, levels in corruption_levels(spec).items():
        unit = PERTURBATIONS[name].unit
        for i, strength in enumerate(levels):
            rng = make_rng(seed, site, "robustness", name, i)
            x, y = perturb(name, images, labels, strength, rng)
            rows.append(RobustnessRow(name, "corruption", strength, unit, dice(prep(x), y), len(images)))

    clean = prep(images)
    was_training = model.training
    model.eval()
    try:
        for kind, levels in attack_levels(spec).items():
            for i, level in enumerate(levels):
                eps = level / 255.0 if kind != "pgd-l2" else level
                generator = make_torch_generator(seed, site, "attack", kind, i)
                parts = []
                for start in range(0, len(clean), batch_size):
                    xb = torch.from_numpy(np.ascontiguousarray(clean[start : start + batch_size]))
                    yb = torch.from_numpy(np.ascontiguousarray(labels[start : start + batch_size])).long()
                    if kind == "fgsm":
                        adv = fgsm(model, xb, yb, eps=eps, clip=clip)
                    else:
                        adv = pgd(
                            model,
                            xb,
                            yb,
                            eps=eps,
                            steps=spec.attack_steps,
                            step_size=max(spec.attack_step_fraction * eps, 1e-12),
                            norm="l2" if kind == "pgd-l2" else "linf",
                            random_start=spec.attack_random_start,
                            generator=generator,
                            clip=clip,
                        )
                    parts.append(adv.numpy())
                adversarial = np.concatenate(parts) if parts else clean
                rows.append(
                    RobustnessRow(
                        kind, "attack", level, ATTACK_UNITS[kind], dice(adversarial, labels), len(images)
                    )
                )
    finally:
        model.train(was_training)
    return rows
