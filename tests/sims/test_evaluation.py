"""Per-patient Dice and its average (sims.evaluation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sims.evaluation import evaluate_segmentation, per_patient_dice
from sims.model import make_model

CLASSES = ("background", "a", "b")


def two_class_labels() -> np.ndarray:
    """Three 16x16 patients: a 8x8 square of class a around a 4x4 square of class b; the last has no b."""
    labels = np.zeros((3, 1, 16, 16), dtype=np.int64)
    labels[:, :, 4:12, 4:12] = 1
    labels[:2, :, 6:10, 6:10] = 2
    return labels


class PredictA(torch.nn.Module):
    """Predicts class a at every pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 3, *x.shape[2:])
        out[:, 1] = 1.0
        return out


def test_per_patient_dice_gives_golden_values_per_patient_and_class() -> None:
    # Prepare
    labels = two_class_labels()
    images = np.zeros(labels.shape, dtype=np.float32)

    # Execute
    dice = per_patient_dice(PredictA(), images, labels, CLASSES, batch_size=2)

    # Assert: a covers 48 of 256 pixels in patients 0-1 and 64 in patient 2; b is missed where
    # present and, absent from both truth and prediction in patient 2, scores 1 there.
    assert dice.shape == (3, 2) and dice.dtype == np.float64
    np.testing.assert_allclose(dice[:, 0], [2 * 48 / 304, 2 * 48 / 304, 2 * 64 / 320], rtol=1e-6)
    np.testing.assert_array_equal(dice[:, 1], [0.0, 0.0, 1.0])


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_evaluate_segmentation_averages_per_patient_dice(batch_size: int) -> None:
    # Prepare: an untrained U-Net on noise, so the per-patient values differ.
    rng = np.random.default_rng(0)
    model = make_model(3, (4, 8), seed=1)
    images = rng.normal(size=(7, 1, 16, 16)).astype(np.float32)
    labels = rng.integers(0, 3, size=(7, 1, 16, 16)).astype(np.uint8)

    # Execute
    per_patient = per_patient_dice(model, images, labels, CLASSES, batch_size=batch_size)
    scores = evaluate_segmentation(model, images, labels, CLASSES, batch_size=batch_size)

    # Assert: the float32 average of the same values, bit for bit.
    per_class = per_patient.astype(np.float32).mean(axis=0)
    assert scores == {
        "dice_a": float(per_class[0]),
        "dice_b": float(per_class[1]),
        "dice_mean": float(per_class.mean()),
    }
    assert len(np.unique(per_patient[:, 0])) > 1


def test_per_patient_dice_restores_the_training_flag_even_after_an_error() -> None:
    model = make_model(3, (4, 8), seed=0)
    model.train()
    bad_images = np.zeros((2, 2, 16, 16), dtype=np.float32)  # two channels: the first convolution fails

    with pytest.raises(RuntimeError):
        per_patient_dice(model, bad_images, np.zeros(bad_images.shape, dtype=np.int64), CLASSES)

    assert all(m.training for m in model.modules())
