"""Federated adversarial training: the batch transform that makes part of a batch adversarial.

Madry et al. ("Towards deep learning models resistant to adversarial attacks", ICLR 2018)
train on PGD examples; here a share ``ratio`` of every local batch is *replaced* by its PGD-L-inf
example against the model as it is at that step (the rest stays clean, which keeps clean Dice
up). Replacing, not appending, keeps one example per patient in every batch: under DP-SGD each
patient's (adversarial) loss is clipped like a clean one, so the per-patient sensitivity, the
noise and the accounting do not change. Each adversarial image is made from that patient's
image alone (the loss is a per-image Dice plus a pixel-wise cross-entropy and the model has no
BatchNorm under DP), with a random start drawn from the round's generator.
"""

from __future__ import annotations

import torch

from common.validation import check_float, check_int
from scenarios.attacks import pgd
from sims.training import Adversary

STEP_FACTOR = 2.5
"""PGD step size is ``STEP_FACTOR * eps / steps`` (Madry et al.'s choice): a walk of 2.5 radii."""


def make_adversary(
    *, ratio: float, eps: float, steps: int, clip: tuple[float | None, float | None] = (0.0, None)
) -> Adversary | None:
    """The adversarial-training transform ``(model, x, y, generator) -> x'``, or ``None`` when ``ratio == 0``.

    Parameters
    ----------
    ratio : float
        Share of each batch made adversarial, in ``[0, 1]``: ``round(ratio * B)`` images, chosen
        uniformly at random (from ``generator``).
    eps : float
        L-inf radius in image intensity units (e.g. ``4 / 255``), ``> 0`` when ``ratio > 0``.
    steps : int
        PGD iterations, ``>= 1``.
    clip : (float or None, float or None)
        Intensity range of the adversarial images (``(0, None)``: magnitudes stay non-negative;
        ``(None, None)`` for z-scored images).
    """
    owner = "make_adversary"
    ratio = check_float("ratio", ratio, owner=owner, low=0.0, high=1.0)
    eps = check_float("eps", eps, owner=owner, low=0.0)
    steps = check_int("steps", steps, owner=owner, low=1)
    if ratio == 0.0:
        return None
    step_size = STEP_FACTOR * eps / steps if eps > 0 else 1.0

    def adversary(
        model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        n = len(x)
        k = int(round(ratio * n))
        if k == 0 or eps == 0.0:
            return x
        idx = torch.randperm(n, generator=generator)[:k]
        adv = pgd(
            model,
            x[idx],
            y[idx],
            eps=eps,
            steps=steps,
            step_size=step_size,
            norm="linf",
            random_start=True,
            generator=generator,
            clip=clip,
        )
        out = x.clone()
        out[idx] = adv
        return out

    return adversary
