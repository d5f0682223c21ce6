"""Robustness curves at a hospital: every perturbation and strength, strength 0 the clean Dice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scenarios.robustness import robustness_curves
from sims.config import RobustnessSpec
from sims.evaluation import per_patient_dice
from sims.model import make_model
from sims.training import train_one_round

CLASSES = ("background", "a", "b")


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    labels = np.zeros((12, 1, 32, 32), dtype=np.int64)
    images = np.zeros((12, 1, 32, 32), dtype=np.float32)
    for i in range(12):
        cy, cx, r = rng.uniform(12, 20), rng.uniform(12, 20), rng.uniform(6, 10)
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        core = (yy - cy) ** 2 + (xx - cx) ** 2 < (r / 2) ** 2
        labels[i, 0][disk], labels[i, 0][core] = 1, 2
        images[i, 0] = 0.4 * disk + 0.5 * core + rng.normal(0, 0.02, (32, 32)).clip(0)
    model = make_model(3, (4, 8), seed=0)
    train_one_round(model, images, labels, epochs=15, lr=1e-2, batch_size=4,
                    generator=torch.Generator().manual_seed(0), augment=False)
    return model, images, labels


SPEC = RobustnessSpec(
    noise=(0.0, 0.1, 0.3), blur=(0.0, 2.0), rotation=(0.0, 30.0), attack_kinds=("fgsm", "pgd-linf", "pgd-l2"),
    attack_eps=(0.0, 16.0), attack_l2_eps=(0.0, 2.0), attack_steps=3,
)


def test_every_perturbation_at_every_strength_and_zero_is_the_clean_dice(trained) -> None:
    model, images, labels = trained
    clean = float(per_patient_dice(model, images, labels, CLASSES).mean())

    rows = robustness_curves(model, images, labels, SPEC, class_names=CLASSES, seed=0, site=3)

    assert [(r.perturbation, r.strength) for r in rows] == [
        ("noise", 0.0), ("noise", 0.1), ("noise", 0.3), ("blur", 0.0), ("blur", 2.0), ("rotation", 0.0),
        ("rotation", 30.0), ("fgsm", 0.0), ("fgsm", 16.0), ("pgd-linf", 0.0), ("pgd-linf", 16.0), ("pgd-l2", 0.0),
        ("pgd-l2", 2.0),
    ]
    assert clean > 0.6  # the model learnt the disks, so the curves mean something
    for row in rows:
        assert row.n == 12 and 0.0 <= row.dice <= 1.0
        if row.strength == 0:
            assert row.dice == pytest.approx(clean, abs=1e-7)
    by = {(r.perturbation, r.strength): r.dice for r in rows}
    assert by["noise", 0.3] < clean and by["pgd-linf", 16.0] < by["fgsm", 16.0] + 0.05
    assert by["pgd-linf", 16.0] < clean - 0.05  # the attack hurts
    assert model.training  # left as it was


def test_the_same_seed_gives_the_same_curves_and_the_hospital_changes_them(trained) -> None:
    model, images, labels = trained
    spec = RobustnessSpec(noise=(0.2,), attack_kinds=("pgd-linf",), attack_eps=(16.0,), attack_steps=2)
    a = robustness_curves(model, images, labels, spec, class_names=CLASSES, seed=0, site=1)
    b = robustness_curves(model, images, labels, spec, class_names=CLASSES, seed=0, site=1)
    c = robustness_curves(model, images, labels, spec, class_names=CLASSES, seed=0, site=2)
    assert a == b and a[0].dice != c[0].dice


def test_prepare_standardises_after_a_corruption_and_before_an_attack(trained) -> None:
    model, images, labels = trained
    seen: list[float] = []

    def prepare(x: np.ndarray) -> np.ndarray:
        seen.append(float(x.max()))
        return x * 2.0

    spec = RobustnessSpec(noise=(0.0,), attack_kinds=("fgsm",), attack_eps=(0.0,))
    rows = robustness_curves(model, images, labels, spec, class_names=CLASSES, seed=0, site=0, prepare=prepare)
    doubled = float(per_patient_dice(model, images * 2.0, labels, CLASSES).mean())
    assert len(seen) == 2 and all(r.dice == pytest.approx(doubled, abs=1e-7) for r in rows)
