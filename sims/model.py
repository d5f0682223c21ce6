"""The segmentation model factory (MONAI U-Net, 2D), built so Opacus can train it."""

from __future__ import annotations

import torch
from monai.networks.nets import UNet

NORMS = ("instance", "instance-affine", "group", "batch")
"""Normalisation layers :func:`make_model` can build (see its docstring)."""

MAX_GROUPS = 8
"""Upper bound on GroupNorm's group count (Wu & He, 2018, found 8-32 groups about equal)."""


def group_count(channels: tuple[int, ...]) -> int:
    """GroupNorm's group count for a U-Net with these feature maps per level.

    MONAI's ``UNet`` applies one norm spec to every layer, so the count must divide every
    entry of ``channels``: the largest ``g <= 8`` that does (8 for the default
    16-32-64-128, 4 for 4-8, 1 if the channels are coprime, which is LayerNorm-like).
    """
    return max(g for g in range(1, MAX_GROUPS + 1) if all(c % g == 0 for c in channels))


def make_model(
    num_classes: int,
    channels: tuple[int, ...] = (16, 32, 64, 128),
    *,
    seed: int = 0,
    norm: str = "instance",
) -> torch.nn.Module:
    """Build a 2D MONAI ``UNet`` for ``(B, 1, H, W)`` inputs and ``(B, num_classes, H, W)`` logits.

    Non-in-place ReLU and, by default, instance normalisation keep the model trainable with
    Opacus DP-SGD: in-place activations break per-sample gradient hooks, and BatchNorm mixes
    the samples of a batch, so one patient's gradient would depend on the others'.

    Parameters
    ----------
    num_classes : int
        Output channels, background included.
    channels : tuple of int
        Feature maps per level; ``len(channels) - 1`` stride-2 down-samplings, so the
        image side must be divisible by ``2 ** (len(channels) - 1)``.
    seed : int
        Seeds a private generator for the initial weights (the global RNG is untouched).
        Norm layers initialise without randomness, so every ``norm`` gets the same
        convolution weights for the same seed.
    norm : {"instance", "instance-affine", "group", "batch"}
        After every convolution but the last:

        - ``"instance"`` (default): ``InstanceNorm2d`` without affine weights; nothing to
          learn and no running statistics (the model of every run before ``norm`` existed,
          bit-identical for the same seed).
        - ``"instance-affine"``: ``InstanceNorm2d(affine=True)``, a learnt per-channel scale
          and shift, still no running statistics.
        - ``"group"``: ``GroupNorm`` with :func:`group_count` groups, affine.
        - ``"batch"``: ``BatchNorm2d`` with running statistics (FedBN, AdaBN). Opacus
          refuses it, so it cannot train with DP-SGD.

    Raises
    ------
    ValueError
        If ``norm`` is not one of :data:`NORMS`.
    """
    if norm not in NORMS:
        raise ValueError(
            f"The 'norm' parameter of make_model must be one of {', '.join(map(repr, NORMS))}. "
            f"Got {norm!r} instead."
        )
    # MONAI's norm spec: a name, or (name, keyword arguments of the torch layer).
    specs: dict[str, str | tuple[str, dict[str, object]]] = {
        "instance": "instance",
        "instance-affine": ("instance", {"affine": True}),
        "group": ("group", {"num_groups": group_count(channels)}),
        "batch": "batch",
    }
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
            norm=specs[norm],
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
