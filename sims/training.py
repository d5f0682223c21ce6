"""Local training: a hospital's round and the server's public pre-training. Plain PyTorch, no Flower."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.losses import DiceCELoss

Adversary = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]
"""``(model, x, y, generator) -> x'``: a batch with some images replaced by adversarial ones
(adversarial training; :func:`scenarios.adversarial.make_adversary`)."""


@dataclass(frozen=True)
class LocalTrainResult:
    """What one hospital reports after a round of local training."""

    loss: float  # mean DiceCE loss over the round's optimizer steps
    steps: int  # optimizer steps taken
    num_examples: int  # train patients seen per epoch


def make_loss() -> DiceCELoss:
    """MONAI Dice + cross-entropy on logits ``(B, C, H, W)`` and labels ``(B, 1, H, W)``."""
    return DiceCELoss(to_onehot_y=True, softmax=True)


def augment_batch(x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time augmentation drawn only from ``generator``.

    Left-right flip (the template is near-symmetric), a global gain in [0.9, 1.1] and a
    gamma in [0.8, 1.25] per patient: cheap, label-preserving, and it widens the
    intensity range each hospital sees beyond its own scanner.

    Parameters
    ----------
    x : Tensor, shape (B, 1, H, W), float32, roughly in [0, 1]
    y : Tensor, shape (B, 1, H, W), int64
    """
    b = x.shape[0]
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    y = torch.where(flip[:, None, None, None], y.flip(-1), y)
    gain = 0.9 + 0.2 * torch.rand(b, 1, 1, 1, generator=generator)
    log_gamma = (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1) * float(np.log(1.25))
    x = gain * x.clamp_min(0).pow(torch.exp(log_gamma))
    return x, y


def train_one_round(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    augment: bool = True,
    transform: Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    | None = None,
    proximal_mu: float = 0.0,
    adversary: Adversary | None = None,
) -> LocalTrainResult:
    """Train ``model`` in place with Adam for ``epochs`` passes over one hospital's data.

    Parameters
    ----------
    images : ndarray, shape (N, 1, H, W), float32
    labels : ndarray, shape (N, 1, H, W), int64
    generator : torch.Generator
        The only source of randomness (shuffling and augmentation).
    transform : callable, optional
        ``(x, y, generator) -> (x, y)`` applied to every batch after ``augment``'s flips and
        gains (e.g. the hospital's scanner augmentation), drawing only from ``generator``.
    proximal_mu : float
        FedProx weight: adds ``mu / 2 * ||w - w_start||^2`` to the loss, where
        ``w_start`` are the weights received from the server (Li et al., 2020).
    adversary : callable, optional
        Adversarial training: replaces some images of every (transformed) batch by adversarial
        examples against the model as it is at that step.
    """
    x_all = torch.from_numpy(images)
    y_all = torch.from_numpy(labels)
    loss_fn = make_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    start = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    model.train()
    total, steps = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            x, y = x_all[idx], y_all[idx]
            if augment:
                x, y = augment_batch(x, y, generator)
            if transform is not None:
                x, y = transform(x, y, generator)
            if adversary is not None:
                x = adversary(model, x, y, generator)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            if start:
                prox = sum(((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), start, strict=True))
                loss = loss + 0.5 * proximal_mu * prox
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            steps += 1
    return LocalTrainResult(loss=total / max(steps, 1), steps=steps, num_examples=len(x_all))
