"""Out-of-distribution scores of a fedscan U-Net on a hospital's images: the model side of :mod:`scenarios.ood`.

:mod:`scenarios.ood` scores arrays; this module runs the segmentation model to get them. One
forward pass per batch gives both the logits (for the softmax and energy scores) and, through a
forward hook on the U-Net's deepest block (:func:`bottleneck`), the image features for the
Mahalanobis score, globally average-pooled over ``H, W``. Everything here is a pure function of
a model and arrays, free of Flower: a hospital calls :func:`feature_stats` on its training
images and ships the result with :func:`stats_to_lists`; the server merges the hospitals'
statistics (:meth:`~scenarios.ood.FeatureStats.merge`) and sends them back; each hospital then
calls :func:`score_images` on its test images.

Methods (:data:`METHODS`, ``"family/variant"``; every score is higher for more
out-of-distribution):

- ``msp/*``: one minus the maximum softmax probability (Hendrycks & Gimpel, 2017).
- ``entropy/*``: Shannon entropy of the softmax.
- ``energy/*``: free energy ``-logsumexp`` of the logits (Liu et al., 2020).
- ``*/foreground`` and ``*/topk``: the pixel scores pooled over predicted-foreground pixels or
  over the ``top_percent`` % most uncertain pixels (:data:`scenarios.ood.POOLS`).
- ``mahalanobis/global``: squared Mahalanobis distance of the image feature to the mean of the
  federation's training features; ``mahalanobis/class``: to the nearest of the class means
  (images with and without the lesion) under the shared within-class covariance (Lee et al.,
  2018). Both on the bottleneck's output, which follows instance normalisation and so barely
  sees an image's intensity statistics.
- ``mahalanobis/early``: the same distance (global) on the first convolution's output *before*
  its normalisation, summarised per channel by its mean and standard deviation over the image
  (low-level statistics in the spirit of Lee et al.'s early-layer features and of Gram-matrix
  detectors, Sastry & Oore 2020): noise, blur and scanner artefacts move them. Added after the
  first OOD sweep showed the bottleneck scores near chance on near-OOD sets.
- ``tta-variance/foreground``: the variance of the softmax between the image and its
  left-right flip (flipped back), averaged over classes and over the predicted-foreground
  pixels; a cheap test-time-augmentation uncertainty that costs a second forward pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import torch
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import UNet

from common.validation import InvalidParameterError, check_float, check_int, did_you_mean, is_int, is_real
from scenarios.ood import (
    FeatureStats,
    _pool,
    energy_score,
    entropy_score,
    mahalanobis_score,
    msp_score,
)
from sims.evaluation import dice_per_image

__all__ = [
    "METHODS",
    "SCORE_FAMILIES",
    "ScoredImages",
    "bottleneck",
    "feature_stats",
    "image_features_and_logits",
    "methods_for",
    "score_images",
    "stats_from_lists",
    "stats_to_lists",
]

SCORE_FAMILIES = ("msp", "entropy", "energy", "mahalanobis", "tta-variance")
"""Score families a user lists in the config key ``ood.scores``."""

METHODS = (
    "msp/foreground",
    "msp/topk",
    "entropy/foreground",
    "entropy/topk",
    "energy/foreground",
    "energy/topk",
    "mahalanobis/global",
    "mahalanobis/class",
    "mahalanobis/early",
    "tta-variance/foreground",
)
"""Every method id :func:`score_images` computes, ``"family/variant"`` (see the module docstring)."""

_LOGIT_SCORES = {"msp": msp_score, "entropy": entropy_score, "energy": energy_score}

LESION_CLASSES = 2
"""Image-level classes of :func:`feature_stats`: 0 without the lesion, 1 with it."""


# --------------------------------------------------------------------------- families


def methods_for(families: Iterable[str]) -> tuple[str, ...]:
    """The method ids of the score ``families``, in the order of :data:`METHODS`.

    Parameters
    ----------
    families : iterable of str
        Names from :data:`SCORE_FAMILIES`; repeats are ignored, an empty list gives ``()``.

    Returns
    -------
    tuple of str

    Raises
    ------
    InvalidParameterError
        If ``families`` is a single string or not an iterable, or names an unknown family
        (with the nearest known name suggested).
    """
    if isinstance(families, str) or not isinstance(families, Iterable):
        raise InvalidParameterError(
            f"The 'families' parameter of methods_for must be a list of names from {_quoted(SCORE_FAMILIES)}. "
            f"Got {families!r} instead."
        )
    chosen = list(families)
    for family in chosen:
        if family not in SCORE_FAMILIES:
            hint = did_you_mean(
                family.lower() if isinstance(family, str) else family, SCORE_FAMILIES, cutoff=0.3
            )
            raise InvalidParameterError(
                f"The 'families' parameter of methods_for must list names from {_quoted(SCORE_FAMILIES)}. "
                f"Got {family!r} instead.{hint}"
            )
    return tuple(m for m in METHODS if m.split("/")[0] in chosen)


def _quoted(names: tuple[str, ...]) -> str:
    return ", ".join(map(repr, names))


# --------------------------------------------------------------------------- model plumbing


def bottleneck(model: torch.nn.Module) -> torch.nn.Module:
    """The deepest block of a fedscan U-Net, whose output is the image's most abstract feature map.

    MONAI's ``UNet`` nests each level as ``Sequential(down, SkipConnection(next level), up)``;
    the innermost ``SkipConnection`` wraps the bottom block, ``(B, channels[-1], H', W')``.

    Parameters
    ----------
    model : monai.networks.nets.UNet
        Built by :func:`sims.model.make_model`, any ``len(channels) >= 2``.

    Returns
    -------
    torch.nn.Module
        The bottom block (a module of ``model``, not a copy).

    Raises
    ------
    InvalidParameterError
        If ``model`` is not a MONAI ``UNet`` of that layout.
    """
    level = getattr(model, "model", None) if isinstance(model, UNet) else None
    while _is_level(level):
        inner = level[1].submodule
        if not isinstance(inner, torch.nn.Module):
            break
        if not _is_level(inner):
            return inner
        level = inner
    raise InvalidParameterError(
        "The 'model' parameter of bottleneck must be a fedscan U-Net (a MONAI UNet nesting "
        f"Sequential(down, SkipConnection(...), up), from sims.model.make_model). Got {type(model).__name__} instead."
    )


def _is_level(module: object) -> TypeGuard[torch.nn.Sequential]:
    """One U-Net level: ``Sequential(down, SkipConnection(deeper levels), up)``."""
    return (
        isinstance(module, torch.nn.Sequential) and len(module) == 3 and isinstance(module[1], SkipConnection)
    )


def first_conv(model: torch.nn.Module) -> torch.nn.Conv2d:
    """The U-Net's first convolution (before its normalisation): what the image's low-level statistics
    (noise, blur, contrast) reach before instance normalisation removes them."""
    levels: Any = model
    top = getattr(levels, "model", None)
    conv = getattr(top[0], "conv", None) if isinstance(top, torch.nn.Sequential) and len(top) else None
    if not isinstance(conv, torch.nn.Conv2d):
        bottleneck(model)  # the same one-sentence refusal for a model that is not a fedscan U-Net
        raise InvalidParameterError(
            "The 'model' parameter of first_conv must be a fedscan U-Net whose first layer has a 'conv'. "
            f"Got {type(model).__name__} instead."
        )
    return conv


def feature_blocks(model: torch.nn.Module) -> dict[str, slice]:
    """Where each block sits in an image feature vector of :func:`image_features_and_logits`.

    ``"bottleneck"``: the deepest block's output averaged over the image (``D = channels[-1]``
    columns); ``"early"``: the first convolution's output, before its normalisation, as the mean
    and the standard deviation of each of its ``channels[0]`` maps over the image.
    """
    deep = int(_out_channels(bottleneck(model)))
    early = 2 * int(first_conv(model).out_channels)
    return {"bottleneck": slice(0, deep), "early": slice(deep, deep + early)}


def _out_channels(block: torch.nn.Module) -> int:
    convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    return int(convs[-1].out_channels)


def block_stats(stats: FeatureStats, block: slice) -> FeatureStats:
    """The statistics of one block of the features: exactly what those columns alone would give
    (sums and outer products restrict to the block's rows and columns)."""
    return FeatureStats(
        count=stats.count,
        total=stats.total[block],
        outer=stats.outer[block, block],
        class_counts=stats.class_counts,
        class_totals=None if stats.class_totals is None else stats.class_totals[:, block],
    )


@contextmanager
def _pooled_features(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Eval mode and hooks appending each image's feature vector (see :func:`feature_blocks`) to the
    yielded list, ``(B, D + 2 C0)`` per forward pass.

    The hooks are removed and the training flag restored on exit, also after an error.
    """
    block = bottleneck(model)
    conv = first_conv(model)
    collected: list[torch.Tensor] = []
    early: list[torch.Tensor] = []

    def early_hook(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        out = output.detach()
        early.append(torch.cat([out.mean(dim=(2, 3)), out.std(dim=(2, 3))], dim=1))

    def hook(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        collected.append(torch.cat([output.detach().mean(dim=(2, 3)), early.pop()], dim=1))

    was_training = model.training
    handles = [conv.register_forward_hook(early_hook), block.register_forward_hook(hook)]
    try:
        model.eval()
        yield collected
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def _check_images(images: object, owner: str) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1] != 1 or len(images) == 0:
        got = f"shape {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise InvalidParameterError(
            f"The 'images' parameter of {owner} must be a numpy array of shape (N, 1, H, W) with N >= 1. "
            f"Got {got} instead."
        )
    return images


def _check_labels(labels: object, images: np.ndarray, owner: str) -> np.ndarray:
    if not isinstance(labels, np.ndarray) or labels.shape != images.shape or labels.dtype.kind not in "iu":
        got = (
            f"shape {labels.shape}, dtype {labels.dtype}"
            if isinstance(labels, np.ndarray)
            else type(labels).__name__
        )
        raise InvalidParameterError(
            f"The 'labels' parameter of {owner} must be an integer numpy array of the images' shape "
            f"{images.shape}. Got {got} instead."
        )
    return labels


def _batches(images: np.ndarray, batch_size: int, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size], dtype=np.float32)
        yield start, torch.from_numpy(batch).to(device)


def _device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def image_features_and_logits(
    model: torch.nn.Module, images: np.ndarray, *, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Image features and logits of ``images`` from one forward pass per batch.

    Parameters
    ----------
    model : monai.networks.nets.UNet
        A fedscan U-Net (see :func:`bottleneck`); run in eval mode, its training flag restored
        and the feature hook removed afterwards, also after an error.
    images : ndarray, shape (N, 1, H, W), float32
    batch_size : int, default 32

    Returns
    -------
    features : ndarray, shape (N, D + 2 C0), float64
        The bottleneck's output averaged over ``H, W`` (``D = channels[-1]``), then the first
        convolution's output (before its normalisation), its mean and standard deviation over
        ``H, W`` per channel (``C0 = channels[0]``): see :func:`feature_blocks`.
    logits : ndarray, shape (N, C, H, W), float32
        The model's outputs.

    Raises
    ------
    InvalidParameterError
        If ``model`` is not a fedscan U-Net, ``images`` not ``(N, 1, H, W)`` or ``batch_size``
        not a positive int.
    """
    owner = "image_features_and_logits"
    images = _check_images(images, owner)
    batch_size = check_int("batch_size", batch_size, owner=owner, low=1)
    device = _device(model)
    logits = []
    with _pooled_features(model) as features:
        for _, x in _batches(images, batch_size, device):
            logits.append(model(x).cpu())
        return torch.cat(features).cpu().numpy().astype(np.float64), torch.cat(logits).numpy()


# --------------------------------------------------------------------------- scores


@dataclass(frozen=True)
class ScoredImages:
    """OOD scores, Dice and features of ``N`` images under one model.

    Attributes
    ----------
    scores : dict of str to ndarray
        Method id (:data:`METHODS`) to ``(N,)`` float64 scores, higher is more
        out-of-distribution.
    dice : ndarray or None
        ``(N,)`` float64 per-image Dice averaged over the foreground classes (as
        :func:`sims.evaluation.per_patient_dice`), or None when no labels were given.
    features : ndarray
        ``(N, D)`` float64 image features (see :func:`image_features_and_logits`).
    """

    scores: dict[str, np.ndarray]
    dice: np.ndarray | None
    features: np.ndarray


def _tta_variance(logits: torch.Tensor, flipped_logits: torch.Tensor) -> np.ndarray:
    """``(B,)`` variance of the softmax between an image and its flip, over predicted-foreground pixels."""
    p = torch.softmax(logits.double(), dim=1)
    q = torch.softmax(flipped_logits.double(), dim=1).flip(-1)  # flip the prediction back
    # The (population) variance of two values a, b is ((a - b) / 2) ** 2; mean over classes.
    pixel = (((p - q) / 2.0) ** 2).mean(dim=1)
    return _pool(pixel.cpu().numpy(), logits.double().cpu().numpy(), "foreground", 100.0)


@torch.no_grad()
def score_images(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    families: Iterable[str],
    class_names: tuple[str, ...],
    stats: FeatureStats | None = None,
    top_percent: float = 10.0,
    shrinkage: float = 1e-3,
    batch_size: int = 32,
) -> ScoredImages:
    """Every score of the requested ``families`` for every image, with its Dice when labels are given.

    One forward pass per batch serves the logit scores, the features and the Dice;
    ``"tta-variance"`` adds a pass on the flipped batch.

    Parameters
    ----------
    model : monai.networks.nets.UNet
        A fedscan U-Net (see :func:`bottleneck`) with ``len(class_names)`` outputs; run in
        eval mode, its training flag restored and its hook removed afterwards, also after an
        error.
    images : ndarray, shape (N, 1, H, W), float32
    labels : ndarray, shape (N, 1, H, W), integer, optional
        Ground truth in ``[0, len(class_names))``, for the per-image Dice.
    families : iterable of str
        Names from :data:`SCORE_FAMILIES` (see :func:`methods_for`).
    class_names : tuple of str
        Background first.
    stats : FeatureStats, optional
        In-distribution feature statistics (merged from the hospitals' :func:`feature_stats`);
        required for ``"mahalanobis"``. ``"mahalanobis/global"`` uses its global mean and
        covariance; ``"mahalanobis/class"`` its class means and within-class covariance, and
        is left out when ``stats`` has no classes (a lesion-free world).
    top_percent : float in (0, 100], default 10
        Share of the pixels the ``*/topk`` scores average.
    shrinkage : float in [0, 1], default 1e-3
        Covariance shrinkage of :func:`scenarios.ood.mahalanobis_score`.
    batch_size : int, default 32

    Returns
    -------
    ScoredImages

    Raises
    ------
    InvalidParameterError
        If a family is unknown, ``"mahalanobis"`` is asked for without ``stats``, or an
        argument has the wrong shape or range.
    """
    owner = "score_images"
    methods = methods_for(families)
    images = _check_images(images, owner)
    if labels is not None:
        labels = _check_labels(labels, images, owner)
    batch_size = check_int("batch_size", batch_size, owner=owner, low=1)
    top_percent = check_float("top_percent", top_percent, owner=owner, low=0.0, high=100.0, low_open=True)
    shrinkage = check_float("shrinkage", shrinkage, owner=owner, low=0.0, high=1.0)
    if any(m.startswith("mahalanobis/") for m in methods) and not isinstance(stats, FeatureStats):
        raise InvalidParameterError(
            "The 'stats' parameter of score_images must be a FeatureStats when 'families' lists 'mahalanobis'. "
            f"Got {type(stats).__name__} instead."
        )
    num_classes = len(class_names)
    device = _device(model)
    logit_methods = [m for m in methods if m.split("/")[0] in _LOGIT_SCORES]
    parts: dict[str, list[np.ndarray]] = {m: [] for m in methods if not m.startswith("mahalanobis/")}
    dice_rows: list[torch.Tensor] = []
    with _pooled_features(model) as features:
        for start, x in _batches(images, batch_size, device):
            logits = model(x)
            if logits.shape[1] != num_classes:
                raise InvalidParameterError(
                    f"The 'class_names' parameter of {owner} must name one class per model output. "
                    f"Got {num_classes} names for {logits.shape[1]} outputs instead."
                )
            for method in logit_methods:
                family, pool = method.split("/")
                parts[method].append(_LOGIT_SCORES[family](logits, pool=pool, top_percent=top_percent))
            if "tta-variance/foreground" in parts:
                flipped = model(x.flip(-1))
                features.pop()  # the flipped image's feature is not the image's
                parts["tta-variance/foreground"].append(_tta_variance(logits, flipped))
            if labels is not None:
                y = torch.from_numpy(labels[start : start + len(x)]).to(device)
                dice_rows.append(dice_per_image(logits, y, num_classes).cpu())
        feature_array = torch.cat(features).cpu().numpy().astype(np.float64)
    scores = {m: np.concatenate(v) for m, v in parts.items()}
    if stats is not None and "mahalanobis/global" in methods:
        blocks = feature_blocks(model)
        if stats.dim != blocks["early"].stop:
            raise InvalidParameterError(
                f"The 'stats' parameter of {owner} must hold statistics of {blocks['early'].stop} features (this "
                f"model's, see feature_blocks). Got {stats.dim} instead."
            )
        deep, deep_stats = feature_array[:, blocks["bottleneck"]], block_stats(stats, blocks["bottleneck"])
        global_stats = FeatureStats(count=stats.count, total=deep_stats.total, outer=deep_stats.outer)
        scores["mahalanobis/global"] = mahalanobis_score(deep, global_stats, shrinkage=shrinkage)
        if stats.class_counts is not None:
            scores["mahalanobis/class"] = mahalanobis_score(deep, deep_stats, shrinkage=shrinkage)
        early = block_stats(FeatureStats(count=stats.count, total=stats.total, outer=stats.outer), blocks["early"])
        scores["mahalanobis/early"] = mahalanobis_score(feature_array[:, blocks["early"]], early, shrinkage=shrinkage)
    dice = torch.cat(dice_rows).numpy().astype(np.float64).mean(axis=1) if labels is not None else None
    return ScoredImages(
        scores={m: scores[m] for m in methods if m in scores}, dice=dice, features=feature_array
    )


# --------------------------------------------------------------------------- feature statistics


@torch.no_grad()
def feature_stats(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    lesion_class: int | None,
    batch_size: int = 32,
) -> FeatureStats:
    """A hospital's sufficient statistics of its training images' features, for Mahalanobis scores.

    Parameters
    ----------
    model : monai.networks.nets.UNet
        A fedscan U-Net (see :func:`bottleneck`).
    images : ndarray, shape (N, 1, H, W), float32
    labels : ndarray, shape (N, 1, H, W), integer
    lesion_class : int or None
        Label value of the lesion. Each image gets the image-level class 1 when its label map
        contains it and 0 otherwise, always with ``num_classes=2`` so that hospitals without
        any lesion still merge with the others. None (lesion-free worlds): no classes.
    batch_size : int, default 32

    Returns
    -------
    FeatureStats
        Of the ``(N, D)`` features of :func:`image_features_and_logits`; merging the
        hospitals' statistics gives exactly those of their pooled images.

    Raises
    ------
    InvalidParameterError
        If ``images`` or ``labels`` has the wrong shape, or ``lesion_class`` is not None or an
        int >= 1.
    """
    owner = "feature_stats"
    images = _check_images(images, owner)
    labels = _check_labels(labels, images, owner)
    batch_size = check_int("batch_size", batch_size, owner=owner, low=1)
    if lesion_class is not None:
        lesion_class = check_int("lesion_class", lesion_class, owner=owner, low=1)
    device = _device(model)
    with _pooled_features(model) as features:
        for _, x in _batches(images, batch_size, device):
            model(x)
        feature_array = torch.cat(features).cpu().numpy().astype(np.float64)
    if lesion_class is None:
        return FeatureStats.from_features(feature_array)
    has_lesion = (labels == lesion_class).reshape(len(labels), -1).any(axis=1).astype(np.int64)
    return FeatureStats.from_features(feature_array, has_lesion, num_classes=LESION_CLASSES)


# --------------------------------------------------------------------------- transport


def stats_to_lists(stats: FeatureStats) -> dict[str, list[float] | list[int] | int]:
    """``stats`` as flat lists of Python numbers, for a Flower ``ConfigRecord`` or ``MetricRecord``.

    Returns
    -------
    dict
        ``count`` (int), ``total`` (``D`` floats), ``outer`` (``D * D`` floats, row-major)
        and, when ``stats`` has classes, ``class_counts`` (``K`` ints) and ``class_totals``
        (``K * D`` floats, row-major). float64 to Python float is exact, so
        :func:`stats_from_lists` gives back the same statistics bit for bit.

    Raises
    ------
    InvalidParameterError
        If ``stats`` is not a :class:`FeatureStats`.
    """
    if not isinstance(stats, FeatureStats):
        raise InvalidParameterError(
            f"The 'stats' parameter of stats_to_lists must be a FeatureStats. Got {type(stats).__name__} instead."
        )
    lists: dict[str, list[float] | list[int] | int] = {
        "count": int(stats.count),
        "total": [float(v) for v in np.asarray(stats.total, dtype=np.float64).ravel()],
        "outer": [float(v) for v in np.asarray(stats.outer, dtype=np.float64).ravel()],
    }
    if stats.class_counts is not None and stats.class_totals is not None:
        lists["class_counts"] = [int(v) for v in stats.class_counts]
        lists["class_totals"] = [float(v) for v in np.asarray(stats.class_totals, dtype=np.float64).ravel()]
    return lists


def _number_list(d: Mapping[str, object], key: str, length: int, integer: bool, why: str) -> np.ndarray:
    value = d.get(key)
    if (
        isinstance(value, list | tuple)
        and len(value) == length
        and all(is_int(v) if integer else is_real(v) for v in value)
    ):
        return np.array(value, dtype=np.int64 if integer else np.float64)
    kind = "ints" if integer else "finite floats"
    got = f"{len(value)} items" if isinstance(value, list | tuple) and len(value) != length else repr(value)
    raise InvalidParameterError(
        f"The '{key}' entry of stats_from_lists' input must be a list of {length} {kind}{why}. Got {got} instead."
    )


def stats_from_lists(d: Mapping[str, object]) -> FeatureStats:
    """The :class:`FeatureStats` that :func:`stats_to_lists` wrote (exactly).

    Parameters
    ----------
    d : mapping
        ``count``, ``total``, ``outer`` and optionally both ``class_counts`` and
        ``class_totals``; other keys are ignored, so ``d`` may be a whole Flower record.

    Raises
    ------
    InvalidParameterError
        If an entry is missing or its length does not fit the others (``D`` from ``total``,
        ``K`` from ``class_counts``), or the class counts do not add up to ``count``.
    """
    if not isinstance(d, Mapping):
        raise InvalidParameterError(
            f"The 'd' parameter of stats_from_lists must be a mapping from stats_to_lists. Got {type(d).__name__} instead."
        )
    raw_count = d.get("count")
    if not isinstance(raw_count, int | np.integer) or isinstance(raw_count, bool) or raw_count < 1:
        raise InvalidParameterError(
            f"The 'count' entry of stats_from_lists' input must be an int >= 1. Got {raw_count!r} instead."
        )
    count = int(raw_count)
    raw_total = d.get("total")
    dim = len(raw_total) if isinstance(raw_total, list | tuple) and raw_total else 1
    total = _number_list(d, "total", dim, False, " (D >= 1)")
    outer = _number_list(d, "outer", dim * dim, False, f" (D * D with D={dim} from 'total')").reshape(
        dim, dim
    )
    has_counts, has_totals = "class_counts" in d, "class_totals" in d
    if has_counts != has_totals:
        raise InvalidParameterError(
            "The input of stats_from_lists must hold both 'class_counts' and 'class_totals' or neither. "
            f"Got only {'class_counts' if has_counts else 'class_totals'} instead."
        )
    if not has_counts:
        return FeatureStats(count=count, total=total, outer=outer)
    raw_counts = d["class_counts"]
    k = len(raw_counts) if isinstance(raw_counts, list | tuple) and raw_counts else 1
    class_counts = _number_list(d, "class_counts", k, True, " (K >= 1)")
    if class_counts.min() < 0 or int(class_counts.sum()) != count:
        raise InvalidParameterError(
            f"The 'class_counts' entry of stats_from_lists' input must be K ints >= 0 adding up to count={count}. "
            f"Got {class_counts.tolist()} instead."
        )
    class_totals = _number_list(d, "class_totals", k * dim, False, f" (K * D with K={k}, D={dim})").reshape(
        k, dim
    )
    return FeatureStats(
        count=count, total=total, outer=outer, class_counts=class_counts, class_totals=class_totals
    )
