"""Segmentation metrics: MONAI ``DiceMetric`` per class and over foreground classes."""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot


def dice_per_image(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice of every foreground class for every image of one batch, from the model's logits.

    Parameters
    ----------
    logits : Tensor, shape (B, C, H, W)
        Model outputs; the prediction is their argmax over ``C == num_classes``.
    labels : Tensor, shape (B, 1, H, W), integer in ``[0, num_classes)``
    num_classes : int
        Background included.

    Returns
    -------
    Tensor, shape (B, num_classes - 1), float32
        MONAI ``DiceMetric(include_background=False, ignore_empty=False)``: a class absent from
        both the truth and the prediction of an image scores 1, so every value is finite.
    """
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    pred = logits.argmax(dim=1, keepdim=True)
    # A fresh metric per batch returns exactly the rows the accumulating metric would aggregate.
    values = metric(y_pred=one_hot(pred, num_classes), y=one_hot(labels, num_classes))
    # MONAI types the result as a tensor or a list of them; a tensor batch always gives a tensor.
    return cast(torch.Tensor, values)


@torch.no_grad()
def per_patient_dice(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    *,
    batch_size: int = 64,
) -> np.ndarray:
    """Dice of every foreground class for every patient, the values :func:`evaluate_segmentation` averages.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``(B, 1, H, W)`` images to ``(B, len(class_names), H, W)`` logits; run in eval
        mode, its training flag restored afterwards.
    images : ndarray, shape (N, 1, H, W), float32
    labels : ndarray, shape (N, 1, H, W), integer in ``[0, len(class_names))``
    class_names : tuple of str
        Background first.
    batch_size : int, default 64

    Returns
    -------
    ndarray, shape (N, len(class_names) - 1), float64
        MONAI's float32 Dice values, widened exactly; a class absent from both the truth and
        the prediction of a patient scores 1 (see :func:`dice_per_image`).
    """
    num_classes = len(class_names)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start : start + batch_size])
            y = torch.from_numpy(labels[start : start + batch_size])
            rows.append(dice_per_image(model(x), y, num_classes).cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows).numpy().astype(np.float64)


def evaluate_segmentation(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    *,
    batch_size: int = 64,
) -> dict[str, float]:
    """Per-patient Dice of ``model`` on one split, averaged over patients.

    Parameters
    ----------
    images : ndarray, shape (N, 1, H, W), float32
    labels : ndarray, shape (N, 1, H, W), int64 in ``[0, len(class_names))``
    class_names : tuple of str
        Background first.

    Returns
    -------
    dict
        ``dice_<class>`` for every foreground class and ``dice_mean``, the mean over
        foreground classes. A class absent from both the truth and the prediction of a
        patient scores 1 for that patient (MONAI ``ignore_empty=False``), so correctly
        predicting "no lesion" counts; every value is finite.
    """
    # Averaged in float32, as MONAI's values always were, so the scores stay bit-identical.
    per_patient = per_patient_dice(model, images, labels, class_names, batch_size=batch_size).astype(
        np.float32
    )
    per_class = per_patient.mean(axis=0)
    scores = {f"dice_{name}": float(v) for name, v in zip(class_names[1:], per_class, strict=True)}
    scores["dice_mean"] = float(per_class.mean())
    return scores
