"""The segmentation model factory (MONAI U-Net, 2D), built so Opacus can train it."""

from __future__ import annotations

import torch
from monai.networks.nets import UNet


def make_model(
    num_classes: int, channels: tuple[int, ...] = (16, 32, 64, 128), *, seed: int = 0
) -> torch.nn.Module:
    """Build a 2D MONAI ``UNet`` for ``(B, 1, H, W)`` inputs and ``(B, num_classes, H, W)`` logits.

    Instance normalisation (no running statistics) and non-in-place ReLU keep the model
    trainable with Opacus DP-SGD later: BatchNorm mixes samples, and in-place
    activations break per-sample gradient hooks.

    Parameters
    ----------
    num_classes : int
        Output channels, background included.
    channels : tuple of int
        Feature maps per level; ``len(channels) - 1`` stride-2 down-samplings, so the
        image side must be divisible by ``2 ** (len(channels) - 1)``.
    seed : int
        Seeds a private generator for the initial weights (the global RNG is untouched).
    """
    devices: list[int] = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=num_classes,
            channels=channels,
            strides=(2,) * (len(channels) - 1),
            num_res_units=0,
            norm="instance",
            # ReLU, not MONAI's default PReLU: PReLU has weights, and Opacus has no
            # per-sample-gradient rule for it (it falls back to functorch, which made a
            # DP-SGD step ~2.4x a plain one here instead of ~1.9x). Never in place.
            act=("relu", {"inplace": False}),
        )
    return model


HEAD_PREFIXES = ("model.2.", "model.1.submodule.2.")
"""Parameter-name prefixes of the U-Net's two finest up-sampling blocks (its "head")."""


def head_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the head's parameters (see :data:`HEAD_PREFIXES`)."""
    return [n for n, _ in model.named_parameters() if n.startswith(HEAD_PREFIXES)]
