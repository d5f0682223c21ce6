"""How far apart two hospitals' images are: foreground intensity histograms and their distance.

A hospital summarises its images as one normalised histogram of foreground intensities
(:func:`intensity_histogram`): :data:`HISTOGRAM_BINS` floats, the only thing that leaves it.
The server compares hospitals with :func:`histogram_distance`, the 1-Wasserstein (earth
mover's) distance between histograms on the bin centres, in intensity units: moving 10 % of
the foreground mass by 0.2 costs 0.02. Unlike a bin-wise distance (L1, chi-squared) it grows
smoothly with how far the mass moved, so it ranks a brighter scanner against a much brighter
one.

The foreground is every pixel above :data:`FOREGROUND_THRESHOLD`, shared with
:mod:`scenarios.mitigations`: the scanners' Rician noise makes the background non-zero, so
MONAI's ``nonzero`` mask would count noise as tissue.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import wasserstein_distance

from common.validation import parameter_error

__all__ = [
    "FOREGROUND_THRESHOLD",
    "HISTOGRAM_BINS",
    "HISTOGRAM_RANGE",
    "bin_centres",
    "check_images",
    "check_weights",
    "foreground_mask",
    "histogram_distance",
    "intensity_histogram",
    "mean_histogram",
]

FOREGROUND_THRESHOLD = 0.15
"""Pixels above this intensity are foreground (tissue).

Images are on the nominal ``[0, 1]`` scale (each divided by its 99.5th percentile), where
tissue starts near 0.25 (1st percentile of CSF) and the background is 0 plus scanner noise
and blur. Measured on 64 px patients of 4 hospitals at scanner severity 1: at 0.15 at most
0.1 % of tissue falls below and 2-7 % of the pixels above are background (the noisy scanner
leaks 40 % at 0.05); at severity 2 the noisy scanner still leaks 23 %."""

HISTOGRAM_BINS = 48
"""Number of equal-width bins of :func:`intensity_histogram`."""

HISTOGRAM_RANGE: tuple[float, float] = (0.0, 1.5)
"""Intensity range of the bins; values above the top are counted in the last bin (scanner
ringing and noise overshoot 1)."""


def check_images(images: object, owner: str, name: str = "images") -> np.ndarray:
    """``images`` as a float ndarray if it is ``(N, 1, H, W)`` with N >= 1 and finite, else raise.

    Raises
    ------
    ValueError
        Naming the parameter, the expected shape and the shape or type given.
    """
    if not isinstance(images, np.ndarray) or images.dtype.kind not in "fiu":
        kind = f"an array of dtype {images.dtype}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(
            f"The '{name}' parameter of {owner} must be a numeric numpy array of shape (N, 1, H, W). "
            f"Got {kind} instead."
        )
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[1] != 1:
        raise ValueError(
            f"The '{name}' parameter of {owner} must have shape (N, 1, H, W) with N >= 1. "
            f"Got shape {images.shape} instead."
        )
    if not np.all(np.isfinite(images)):
        raise ValueError(f"The '{name}' parameter of {owner} must be finite. Got NaN or inf values instead.")
    return images


def foreground_mask(images: np.ndarray, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """Boolean mask of the tissue: ``images > threshold``, same shape."""
    return np.asarray(images) > threshold


def bin_centres() -> np.ndarray:
    """Centres of the :data:`HISTOGRAM_BINS` bins over :data:`HISTOGRAM_RANGE`, float64."""
    edges = np.linspace(*HISTOGRAM_RANGE, HISTOGRAM_BINS + 1)
    return (edges[:-1] + edges[1:]) / 2.0


def intensity_histogram(images: np.ndarray, *, threshold: float = FOREGROUND_THRESHOLD) -> np.ndarray:
    """Normalised histogram of the foreground intensities of a set of images.

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, 1, H, W)``, float, nominally in ``[0, 1]``: one hospital's images.
    threshold : float, default FOREGROUND_THRESHOLD
        Pixels above it are counted.

    Returns
    -------
    numpy.ndarray
        ``(HISTOGRAM_BINS,)`` float64, non-negative, sums to 1: the fraction of all the
        images' foreground pixels in each bin of :data:`HISTOGRAM_RANGE` (values above the
        range are counted in the last bin).

    Raises
    ------
    ValueError
        If ``images`` is not a finite ``(N, 1, H, W)`` array, or no pixel is above ``threshold``.
    """
    check_images(images, "intensity_histogram")
    values = np.asarray(images, dtype=np.float64)[foreground_mask(images, threshold)]
    if values.size == 0:
        raise ValueError(
            f"intensity_histogram needs foreground: no pixel of the {len(images)} images is above "
            f"the threshold {threshold:g}."
        )
    low, high = HISTOGRAM_RANGE
    # Clip into the range so that overshooting intensities stay in the last bin, not dropped.
    counts, _ = np.histogram(np.clip(values, low, high), bins=HISTOGRAM_BINS, range=HISTOGRAM_RANGE)
    return counts / counts.sum()


def float_array(value: object) -> np.ndarray | None:
    """``value`` as a float64 array, or None if it is not array-like numbers (a str, an object)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (np.ndarray, Sequence)):
        return None
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return None


def _check_histogram(histogram: object, name: str, owner: str) -> np.ndarray:
    array = float_array(histogram)
    if array is None or array.shape != (HISTOGRAM_BINS,):
        shape = array.shape if array is not None else type(histogram).__name__
        raise ValueError(
            f"The '{name}' parameter of {owner} must be a histogram of shape ({HISTOGRAM_BINS},). "
            f"Got {shape} instead."
        )
    if not np.all(np.isfinite(array)) or np.any(array < 0) or array.sum() <= 0:
        raise ValueError(
            f"The '{name}' parameter of {owner} must be finite, non-negative and not all zero. "
            f"Got values in [{np.nanmin(array):g}, {np.nanmax(array):g}] summing to {np.nansum(array):g} instead."
        )
    return array / array.sum()


def histogram_distance(a: np.ndarray, b: np.ndarray) -> float:
    """1-Wasserstein distance between two intensity histograms, in intensity units.

    Parameters
    ----------
    a, b : numpy.ndarray
        ``(HISTOGRAM_BINS,)`` histograms from :func:`intensity_histogram` (normalised here,
        so counts work too).

    Returns
    -------
    float
        ``>= 0``; 0 for equal histograms; symmetric; obeys the triangle inequality. At most
        the width of the bin centres' span (about 1.47).

    Raises
    ------
    ValueError
        If a histogram has the wrong shape, a negative or non-finite value, or sums to 0.

    References
    ----------
    Rubner, Tomasi and Guibas, "The earth mover's distance as a metric for image
    retrieval", IJCV 2000.
    """
    p = _check_histogram(a, "a", "histogram_distance")
    q = _check_histogram(b, "b", "histogram_distance")
    centres = bin_centres()
    return float(wasserstein_distance(centres, centres, p, q))


def mean_histogram(
    histograms: Sequence[np.ndarray] | np.ndarray, weights: Sequence[float] | None = None
) -> np.ndarray:
    """Weighted mean of histograms, normalised: the federation's pooled intensity distribution.

    Parameters
    ----------
    histograms : sequence of numpy.ndarray, or numpy.ndarray
        One ``(HISTOGRAM_BINS,)`` histogram per hospital (each normalised first), or a
        ``(K, HISTOGRAM_BINS)`` array.
    weights : sequence of float, optional
        One non-negative weight per histogram (e.g. the hospitals' image counts), not all
        zero; equal weights if omitted.

    Returns
    -------
    numpy.ndarray
        ``(HISTOGRAM_BINS,)`` float64, sums to 1.

    Raises
    ------
    ValueError
        If ``histograms`` is empty, a histogram is invalid, or ``weights`` has the wrong
        length or invalid values.
    """
    owner = "mean_histogram"
    if isinstance(histograms, np.ndarray) and histograms.ndim == 2:
        histograms = list(histograms)
    if not isinstance(histograms, Sequence) or len(histograms) == 0:
        raise ValueError(parameter_error("histograms", "a non-empty sequence of histograms", histograms, owner=owner))
    stacked = np.stack([_check_histogram(h, f"histograms[{i}]", owner) for i, h in enumerate(histograms)])
    w = check_weights(weights, len(histograms), owner)
    mean = w @ stacked
    return mean / mean.sum()


def check_weights(weights: Sequence[float] | np.ndarray | None, count: int, owner: str) -> np.ndarray:
    """``count`` non-negative finite weights, not all zero, normalised to sum 1 (equal if ``None``)."""
    if weights is None:
        return np.full(count, 1.0 / count)
    w = float_array(weights)
    if w is None or w.shape != (count,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(
            parameter_error(
                "weights",
                f"{count} finite non-negative numbers, not all zero",
                weights if w is None else w.tolist(),
                owner=owner,
            )
        )
    return w / w.sum()
