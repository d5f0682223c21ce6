"""Mitigations of scanner shift: intensity normalisation, histogram standardisation, scanner augmentation.

Three pure tools a hospital applies to its own images; none reads another hospital's images.

* :func:`zscore_images` -- per-image z-score over the foreground (no summary leaves the hospital).
* Histogram standardisation (Nyúl and Udupa): each hospital sends :func:`image_landmarks`, a
  few foreground percentiles averaged over its images; the server averages them into a
  :func:`standard_scale`; each hospital maps its images onto it with
  :func:`apply_histogram_standardization`.
* :func:`scanner_augment_batch` -- training-time random scanner effects (the physics of
  :mod:`sims.scanners`), so the model sees scanners it will meet only at test time.

The foreground is every pixel above :data:`scenarios.shift_measures.FOREGROUND_THRESHOLD`; the
background is set to exactly 0 by the two normalisations, since scanner noise makes it
non-zero and it carries no anatomy.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta

from common.validation import check_float
from scenarios.shift_measures import (
    FOREGROUND_THRESHOLD,
    check_images,
    check_weights,
    float_array,
    foreground_mask,
)
from sims.scanners import (
    _ARCHETYPE_RANGES,
    _MAX_GIBBS_ALPHA,
    _MILD,
    ScannerProfile,
    _single_threaded_torch,
    apply_scanner,
)

__all__ = [
    "AUGMENT_LIMITS",
    "LANDMARK_PERCENTILES",
    "apply_histogram_standardization",
    "foreground_percentiles",
    "image_landmarks",
    "scanner_augment_batch",
    "standard_scale",
    "zscore_images",
]

# --------------------------------------------------------------------------- z-score


def zscore_images(images: np.ndarray, *, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """Per-image z-score over the foreground; the background becomes 0.

    MONAI's ``NormalizeIntensity(nonzero=True)`` does this with the mask ``x != 0``, but the
    scanners' noise and blur make the background non-zero, so the mask here is
    ``x > threshold``.

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, 1, H, W)``, float.
    threshold : float, default FOREGROUND_THRESHOLD
        Pixels above it are foreground.

    Returns
    -------
    numpy.ndarray
        ``(N, 1, H, W)`` float32: ``(x - mean) / std`` over each image's foreground pixels,
        0 elsewhere. An image whose foreground is constant is only centred (std taken as 1,
        as MONAI does); one without foreground is all 0. Never NaN.

    Raises
    ------
    ValueError
        If ``images`` is not a finite ``(N, 1, H, W)`` array.
    """
    check_images(images, "zscore_images")
    x = np.asarray(images, dtype=np.float64)
    mask = foreground_mask(x, threshold)
    axes = (1, 2, 3)
    count = np.maximum(mask.sum(axis=axes, keepdims=True), 1)
    mean = np.where(mask, x, 0.0).sum(axis=axes, keepdims=True) / count
    var = np.where(mask, (x - mean) ** 2, 0.0).sum(axis=axes, keepdims=True) / count
    std = np.sqrt(var)
    std = np.where(std > 0.0, std, 1.0)
    return np.where(mask, (x - mean) / std, 0.0).astype(np.float32)


# --------------------------------------------------------------------------- histogram standardisation

LANDMARK_PERCENTILES: tuple[float, ...] = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)
"""Foreground percentiles used as landmarks: the 1st and 99th (Nyúl's robust minimum and
maximum) and the deciles, as in TorchIO's ``HistogramStandardization``."""


def foreground_percentiles(images: np.ndarray, *, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """Each image's foreground percentiles at :data:`LANDMARK_PERCENTILES`.

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, 1, H, W)``, float.
    threshold : float, default FOREGROUND_THRESHOLD
        Pixels above it are foreground.

    Returns
    -------
    numpy.ndarray
        ``(N, P)`` float64, non-decreasing along each row; a row is NaN for an image
        without foreground.

    Raises
    ------
    ValueError
        If ``images`` is not a finite ``(N, 1, H, W)`` array.
    """
    check_images(images, "foreground_percentiles")
    out = np.full((len(images), len(LANDMARK_PERCENTILES)), np.nan)
    for i, image in enumerate(np.asarray(images, dtype=np.float64)):
        values = image[foreground_mask(image, threshold)]
        if values.size:
            out[i] = np.percentile(values, LANDMARK_PERCENTILES)
    return out


def image_landmarks(images: np.ndarray, *, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """A hospital's landmarks: the mean over its images of their foreground percentiles.

    This summary (``P`` floats) is all that leaves the hospital.

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, 1, H, W)``, float: the hospital's (training) images.
    threshold : float, default FOREGROUND_THRESHOLD
        Pixels above it are foreground; images without foreground are skipped.

    Returns
    -------
    numpy.ndarray
        ``(P,)`` float64, ``P = len(LANDMARK_PERCENTILES)``, non-decreasing.

    Raises
    ------
    ValueError
        If ``images`` is not a finite ``(N, 1, H, W)`` array or no image has foreground.
    """
    per_image = foreground_percentiles(images, threshold=threshold)
    kept = per_image[~np.isnan(per_image).any(axis=1)]
    if len(kept) == 0:
        raise ValueError(
            f"image_landmarks needs foreground: none of the {len(per_image)} images has a pixel "
            f"above the threshold {threshold:g}."
        )
    return np.asarray(kept.mean(axis=0))


def _check_landmarks(value: object, name: str, owner: str, length: int | None = None) -> np.ndarray:
    """``value`` as a finite, strictly increasing float64 vector (of ``length``, if given)."""
    array = float_array(value)
    expected = f"of length {length}" if length is not None else "with at least 2 values"
    if array is None or array.ndim != 1 or array.size < 2 or (length is not None and array.size != length):
        shape = array.shape if array is not None else type(value).__name__
        raise ValueError(
            f"The '{name}' parameter of {owner} must be a 1-D landmark vector {expected}. Got shape {shape} instead."
        )
    if not np.all(np.isfinite(array)) or not np.all(np.diff(array) > 0):
        raise ValueError(
            f"The '{name}' parameter of {owner} must be finite and strictly increasing. "
            f"Got {np.round(array, 4).tolist()} instead."
        )
    return array


def standard_scale(
    landmarks: Sequence[np.ndarray] | np.ndarray, weights: Sequence[float] | None = None
) -> np.ndarray:
    """The federation's standard histogram scale from the hospitals' landmarks.

    Parameters
    ----------
    landmarks : sequence of numpy.ndarray, or numpy.ndarray
        One ``(P,)`` vector per hospital from :func:`image_landmarks` (or a ``(K, P)`` array).
    weights : sequence of float, optional
        One non-negative weight per hospital (e.g. its number of images), not all zero;
        equal weights if omitted.

    Returns
    -------
    numpy.ndarray
        ``(P,)`` float64, strictly increasing from 0 to 1: the weighted mean of the
        landmark vectors, mapped linearly so that its first landmark is 0 and its last 1,
        so that standardised foregrounds span about ``[0, 1]`` like the raw images.

    Raises
    ------
    ValueError
        If ``landmarks`` is empty, the vectors differ in length, one is not finite and
        strictly increasing, or ``weights`` is invalid.

    References
    ----------
    Nyúl and Udupa, "On standardizing the MR image intensity scale", MRM 1999;
    Nyúl, Udupa and Zhang, "New variants of a method of MRI scale standardization", IEEE TMI 2000.
    """
    owner = "standard_scale"
    if isinstance(landmarks, np.ndarray) and landmarks.ndim == 2:
        landmarks = list(landmarks)
    if not isinstance(landmarks, Sequence) or isinstance(landmarks, str) or len(landmarks) == 0:
        raise ValueError(
            f"The 'landmarks' parameter of {owner} must be a non-empty sequence of landmark vectors. "
            f"Got {type(landmarks).__name__} instead."
        )
    first = _check_landmarks(landmarks[0], "landmarks[0]", owner)
    stacked = np.stack(
        [first] + [_check_landmarks(v, f"landmarks[{i}]", owner, first.size) for i, v in enumerate(landmarks) if i]
    )
    mean = check_weights(weights, len(stacked), owner) @ stacked
    return (mean - mean[0]) / (mean[-1] - mean[0])


def _piecewise_linear(values: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """``np.interp`` inside ``[xp[0], xp[-1]]``, extended linearly by the end segments outside."""
    out = np.interp(values, xp, fp)
    below, above = values < xp[0], values > xp[-1]
    out[below] = fp[0] + (values[below] - xp[0]) * (fp[1] - fp[0]) / (xp[1] - xp[0])
    out[above] = fp[-1] + (values[above] - xp[-1]) * (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
    return out


def apply_histogram_standardization(
    images: np.ndarray,
    own_landmarks: np.ndarray,
    standard: np.ndarray,
    *,
    threshold: float = FOREGROUND_THRESHOLD,
) -> np.ndarray:
    """Map images onto the standard scale, piecewise linearly between landmarks.

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, 1, H, W)``, float.
    own_landmarks : numpy.ndarray
        ``(P,)``: the hospital's landmarks (:func:`image_landmarks`), applied to every image;
        or ``(N, P)``: one row per image (:func:`foreground_percentiles`, Nyúl's original
        per-image mapping). Strictly increasing.
    standard : numpy.ndarray
        ``(P,)`` strictly increasing, from :func:`standard_scale`.
    threshold : float, default FOREGROUND_THRESHOLD
        Pixels above it are foreground.

    Returns
    -------
    numpy.ndarray
        ``(N, 1, H, W)`` float32. Foreground pixel ``x`` between landmarks ``l_k`` and
        ``l_{k+1}`` goes to ``s_k + (x - l_k) (s_{k+1} - s_k) / (l_{k+1} - l_k)``; beyond the
        end landmarks the end segments extend linearly; the background becomes 0. With
        ``own_landmarks == standard`` the foreground is unchanged.

    Raises
    ------
    ValueError
        If ``images`` is not a finite ``(N, 1, H, W)`` array, a landmark vector is not finite
        and strictly increasing, or the shapes disagree.
    """
    owner = "apply_histogram_standardization"
    check_images(images, owner)
    std = _check_landmarks(standard, "standard", owner)
    own = float_array(own_landmarks)
    if own is not None and own.ndim == 2:
        if own.shape != (len(images), std.size):
            raise ValueError(
                f"The 'own_landmarks' parameter of {owner} must have shape ({std.size},) or "
                f"({len(images)}, {std.size}) to match 'images' {images.shape} and 'standard' {std.shape}. "
                f"Got shape {own.shape} instead."
            )
        rows = [_check_landmarks(row, f"own_landmarks[{i}]", owner, std.size) for i, row in enumerate(own)]
    else:
        rows = [_check_landmarks(own_landmarks, "own_landmarks", owner, std.size)] * len(images)
    out = np.zeros(images.shape, dtype=np.float32)
    for i, (image, landmarks) in enumerate(zip(np.asarray(images, dtype=np.float64), rows, strict=True)):
        mask = foreground_mask(image, threshold)
        out[i][mask] = _piecewise_linear(image[mask], landmarks, std)
    return out


# --------------------------------------------------------------------------- scanner augmentation

_AUGMENT_SEVERITY = 2.0  # strength 1 reaches the strongest scanner of every archetype at severity 2


def _upper(*keys: str) -> float:
    """Largest upper bound of ``keys`` over the mild and archetype ranges of sims.scanners."""
    tables = [_MILD, *_ARCHETYPE_RANGES.values()]
    return max(abs(bound) for table in tables for key in keys if key in table for bound in table[key])


AUGMENT_LIMITS: dict[str, float] = {
    "log_gamma": _AUGMENT_SEVERITY * _upper("log_gamma", "log_gamma_magnitude"),
    "bias_field": _AUGMENT_SEVERITY * _upper("bias_field"),
    "blur_sigma": _AUGMENT_SEVERITY * _upper("blur_sigma"),
    "downsample_excess": _AUGMENT_SEVERITY * _upper("downsample_excess"),
    "gibbs_alpha": _AUGMENT_SEVERITY * _upper("gibbs_alpha"),
    "spike_intensity": _AUGMENT_SEVERITY * _upper("spike_intensity"),
    "noise_std": _AUGMENT_SEVERITY * _upper("noise_std"),
}
"""Largest strength of each effect of :func:`scanner_augment_batch` at ``strength=1``: twice the
severity-1 ranges of :func:`sims.scanners.make_scanner_profile`, so every archetype's scanner
up to severity 2 lies within reach (gamma in ``[exp(-0.68), exp(0.68)]``, bias 0.8, blur
1.2 px with down-sampling 2.4, Gibbs alpha 0.8, spikes 0.4, noise 0.1)."""

_MAX_STRENGTH = 2.0  # keeps every drawn profile inside ScannerProfile's ranges
_SEED_BOUND = 2**63 - 1


@contextmanager
def _plain_monai_tensors() -> Iterator[None]:
    """Let MONAI transforms return plain tensors, restoring the previous setting afterwards.

    At 64-96 px MONAI's MetaTensor bookkeeping costs more than the maths: turning it off
    makes the augmentation about 40 % faster with identical bytes (we never read the
    metadata). The setting is process-wide, like torch's thread count.
    """
    previous = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(previous)


def _random_profile(rng: np.random.Generator, strength: float, probability: float) -> ScannerProfile:
    """A random scanner: each effect on with ``probability``, its strength ``U(0, limit * strength)``.

    Both draws are made for every effect, so the stream does not depend on which are on.
    """
    draws = {key: (rng.random() < probability, rng.random()) for key in AUGMENT_LIMITS}

    def amount(key: str) -> float:
        on, u = draws[key]
        return float(on) * u * strength * AUGMENT_LIMITS[key]

    on_gamma, u_gamma = draws["log_gamma"]
    log_gamma = float(on_gamma) * (2.0 * u_gamma - 1.0) * strength * AUGMENT_LIMITS["log_gamma"]
    return ScannerProfile(
        bias_field=amount("bias_field"),
        gamma=math.exp(log_gamma),
        noise_std=amount("noise_std"),
        blur_sigma=amount("blur_sigma"),
        downsample=1.0 + amount("downsample_excess"),
        spike_intensity=amount("spike_intensity"),
        gibbs_alpha=min(_MAX_GIBBS_ALPHA, amount("gibbs_alpha")),
    )


def scanner_augment_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
    *,
    strength: float = 1.0,
    probability: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training-time scanner augmentation: every image through its own random scanner.

    Each image gets a random :class:`~sims.scanners.ScannerProfile` (each of the seven
    effects on with ``probability``, its strength uniform up to ``strength`` times
    :data:`AUGMENT_LIMITS`) and is acquired with :func:`sims.scanners.apply_scanner`: the
    same MONAI physics as the hospitals' scanners, the same rescaling (the image's 99.5th
    percentile is kept, so the nominal intensity scale stays) and clipping at 0. Its
    signature mirrors :func:`sims.training.augment_batch`.

    Parameters
    ----------
    x : torch.Tensor
        ``(B, 1, H, W)`` float32, roughly in ``[0, 1]``, on the CPU.
    y : torch.Tensor
        ``(B, 1, H, W)`` int64 labels; returned unchanged (the effects are intensity-only).
    generator : torch.Generator
        The only source of randomness: one ``torch.randint`` draw of ``B`` seeds, each
        seeding a numpy generator that draws the image's profile and MONAI's random
        transforms (``set_random_state``). Same generator state, same output bytes.
    strength : float, default 1.0
        In ``[0, 2]``; scales every effect's upper limit. 0 returns ``x`` and ``y``
        themselves and draws nothing.
    probability : float, default 0.5
        In ``[0, 1]``; chance that each effect is applied to an image.

    Returns
    -------
    tuple of torch.Tensor
        ``(x_aug, y)``: ``x_aug`` ``(B, 1, H, W)`` float32, non-negative; ``y`` as given.

    Raises
    ------
    ValueError
        If ``strength`` or ``probability`` is out of range, or ``x`` is not ``(B, 1, H, W)``.

    Notes
    -----
    The input must be on the nominal non-negative scale (raw or histogram-standardised
    images): like the scanners, the output is clipped at 0, so augment *before* a z-score,
    never after (a z-scored foreground is half negative).

    Costs about 1.8 ms per image at 64 px and 2.4 ms at 96 px of one CPU core (measured as
    thread CPU time, batches of 8); torch runs single-threaded and MONAI without
    MetaTensor bookkeeping meanwhile, both restored afterwards.
    """
    strength = check_float("strength", strength, owner="scanner_augment_batch", low=0.0, high=_MAX_STRENGTH)
    probability = check_float("probability", probability, owner="scanner_augment_batch", low=0.0, high=1.0)
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(
            f"The 'x' parameter of scanner_augment_batch must have shape (B, 1, H, W). Got {tuple(x.shape)} instead."
        )
    if strength == 0.0:
        return x, y
    seeds = torch.randint(0, _SEED_BOUND, (x.shape[0],), generator=generator).tolist()
    images = x.detach().cpu().numpy()
    out = np.empty(images.shape, dtype=np.float32)
    with _single_threaded_torch(), _plain_monai_tensors():
        for i, seed in enumerate(seeds):
            rng = np.random.default_rng(seed)
            out[i, 0] = apply_scanner(images[i, 0], _random_profile(rng, strength, probability), rng)
    return torch.from_numpy(out).to(device=x.device), y
