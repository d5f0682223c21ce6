"""Segmentation metrics: MONAI ``DiceMetric`` per class and over foreground classes."""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot


@torch.no_grad()
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
    num_classes = len(class_names)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
    was_training = model.training
    model.eval()
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size])
        y = torch.from_numpy(labels[start : start + batch_size])
        pred = model(x).argmax(dim=1, keepdim=True)
        metric(y_pred=one_hot(pred, num_classes), y=one_hot(y, num_classes))
    aggregated = metric.aggregate()
    if not isinstance(aggregated, torch.Tensor):  # MONAI types it as a tensor or a (tensor, not-nans) pair
        aggregated = aggregated[0]
    per_patient = aggregated.cpu().numpy()  # (N, num_classes - 1)
    model.train(was_training)
    per_class = per_patient.mean(axis=0)
    scores = {f"dice_{name}": float(v) for name, v in zip(class_names[1:], per_class, strict=True)}
    scores["dice_mean"] = float(per_class.mean())
    return scores
