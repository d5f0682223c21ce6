"""DP-SGD for one hospital's round, on Opacus' machinery (Abadi et al., 2016).

Poisson sampling (each patient joins each step independently with probability ``q``),
per-patient gradient clipping and Gaussian noise. Per-sample gradients come from Opacus'
``GradSampleModule`` in ``"hooks"`` mode, clipping and noise from ``DPOptimizer``; the
model object itself is trained in place, so its ``state_dict`` keys stay plain.

No accountant lives here: the caller records one :class:`privacy.events.DPEvent`
``(noise_multiplier, sample_rate, steps)`` per round in the hospital's ledger and epsilon
is recomputed from the whole ledger (a fresh accountant per round would under-report).

Each simulated patient contributes exactly one slice, so a sample is a patient and the
per-sample guarantee is a per-patient guarantee.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer

import privacy._opacus_import  # noqa: F401  (undoes Opacus' logging.basicConfig)

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class DPRoundResult:
    """What one round of DP-SGD did (the inputs of its ledger event)."""

    loss: float  # mean loss over non-empty steps
    steps: int  # noisy optimizer steps taken (empty Poisson batches included)
    sample_rate: float
    noise_multiplier: float


def steps_per_epoch(num_patients: int, batch_size: int) -> int:
    """Steps per epoch with Poisson rate ``q = batch_size / num_patients``: ``round(1 / q)``."""
    return max(1, round(num_patients / batch_size))


def sample_rate(num_patients: int, batch_size: int) -> float:
    """Poisson sampling rate ``q`` for an expected batch of ``batch_size`` patients."""
    return min(1.0, batch_size / num_patients)


def train_dp_round(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    sample_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    lr: float,
    generator: torch.Generator,
    transform: Callable[[torch.Tensor, torch.Tensor, torch.Generator], Batch] | None = None,
    adversary: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> DPRoundResult:
    """Run ``steps`` DP-Adam steps on ``model`` in place.

    Parameters
    ----------
    images : Tensor, shape (N, 1, H, W)
    labels : Tensor, shape (N, 1, H, W), int64
    loss_fn : callable
        Must be a *mean over samples* of per-sample losses (MONAI ``DiceCELoss`` with
        ``batch=False`` is): Opacus' hooks rescale per-sample gradients for
        ``loss_reduction="mean"``.
    sample_rate : float
        Poisson rate ``q`` in (0, 1].
    noise_multiplier : float
        Gaussian noise std relative to ``max_grad_norm``.
    generator : torch.Generator
        The only randomness: Poisson sampling, augmentation and the DP noise.
    transform : callable, optional
        Per-batch augmentation ``(x, y, generator) -> (x, y)``.
    adversary : callable, optional
        Adversarial training ``(model, x, y, generator) -> x'``: some patients' images of the
        sampled batch are *replaced* by adversarial examples made from those images alone, so each
        patient still contributes one example whose gradient is clipped: the per-patient
        sensitivity, and so the accounting, are unchanged. Opacus' hooks are off while the
        attack takes its input gradients (they would record per-sample gradients of the attack).
    """
    n = len(images)
    expected = max(1, round(sample_rate * n))
    # What Opacus adds to modules and parameters, and does not take away on close.
    modules_before = {m: (set(vars(m)), m._is_full_backward_hook) for m in model.modules()}
    params_before = {p: set(vars(p)) for p in model.parameters()}
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    optimizer = DPOptimizer(
        torch.optim.Adam(model.parameters(), lr=lr),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected,
        loss_reduction="mean",
        generator=generator,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    total, losses = 0.0, 0
    gsm.train()
    try:
        for _ in range(steps):
            mask = torch.rand(n, generator=generator) < sample_rate
            idx = mask.nonzero(as_tuple=True)[0]
            optimizer.zero_grad(set_to_none=True)
            if len(idx) == 0:
                # An empty Poisson batch still takes a (pure-noise) step: skipping it
                # would change the mechanism the accountant assumes.
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)  # type: ignore[attr-defined]
            else:
                x, y = images[idx], labels[idx]
                if transform is not None:
                    x, y = transform(x, y, generator)
                if adversary is not None:
                    gsm.disable_hooks()
                    try:
                        x = adversary(model, x, y, generator)
                    finally:
                        gsm.enable_hooks()
                loss = loss_fn(gsm(x), y)
                with warnings.catch_warnings():
                    # Opacus' full backward hooks fire on the first layer, whose input
                    # (the image) needs no gradient; harmless, and said once per step.
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                total += float(loss.detach())
                losses += 1
            optimizer.step()
    finally:
        gsm._close()  # remove the hooks: the caller gets its plain module back
        # ... and the per-sample state Opacus leaves (summed_grad, activations, the full
        # backward hook flag that makes a later register_backward_hook raise).
        for module, (names, full_hook) in modules_before.items():
            for name in set(vars(module)) - names:
                delattr(module, name)
            module._is_full_backward_hook = full_hook
        for param, names in params_before.items():
            for name in set(vars(param)) - names:
                delattr(param, name)
    return DPRoundResult(
        loss=total / max(losses, 1), steps=steps, sample_rate=sample_rate, noise_multiplier=noise_multiplier
    )
