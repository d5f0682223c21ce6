"""Image corruptions: graded perturbations for robustness curves, and out-of-distribution sets.

Two families of pure functions a hospital applies to its own test images:

* **Perturbations** (:data:`PERTURBATIONS`, :func:`perturb`): one knob each, whose strength 0
  gives back the input exactly, so a robustness curve (Dice against strength) starts at the clean
  score. In the spirit of ImageNet-C (Hendrycks and Dietterich, "Benchmarking neural network
  robustness to common corruptions and perturbations", ICLR 2019), with MRI-flavoured effects:
  additive noise, salt-and-pepper, a gamma contrast curve, blur and in-plane rotation.
* **OOD sets** (:data:`OOD_SETS`, :func:`make_ood_set`): fixed recipes that turn a hospital's
  test images into a set the model was not trained on. *Near* sets (mild noise, mild blur) keep
  the anatomy and the contrast; *far* sets change the acquisition physics (strong noise and blur,
  motion ghosts), the contrast (T2-like inversion, CT-like remap with a skull), or are not brains
  at all (random shapes, a Shepp-Logan head phantom). Sets with ``has_labels`` keep the anatomy in
  place, so the hospital's labels still apply.

Images are ``(N, 1, H, W)`` magnitude images: float, non-negative, on the nominal ``[0, 1]``
scale of :mod:`sims.hospitals` (each image's 99.5th percentile is its bright tissue, the
background 0). Every function returns float32 arrays of the same shape and draws randomness only
from the ``numpy.random.Generator`` it is given: same generator state, same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, overload

import numpy as np
from scipy import ndimage

from common.validation import InvalidParameterError, check_choice, check_float, check_int

__all__ = [
    "FAR_SETS",
    "NEAR_SETS",
    "OOD_SETS",
    "PERTURBATIONS",
    "OodSetSpec",
    "PerturbationSpec",
    "blur",
    "contrast",
    "gaussian_noise",
    "make_ood_set",
    "perturb",
    "rotate",
    "salt_and_pepper",
    "shepp_logan",
]

_FOREGROUND_FRACTION = 0.15
"""A pixel above this fraction of its image's maximum is tissue (the head masks of the OOD sets);
the same 0.15 as :data:`scenarios.shift_measures.FOREGROUND_THRESHOLD` on the nominal scale."""

_REFERENCE_PERCENTILE = 99.5
"""The percentile that sets an image's scale, as in :func:`sims.scanners.apply_scanner`."""


# --------------------------------------------------------------------------- validation


def _invalid(owner: str, name: str, expected: str, got: str) -> InvalidParameterError:
    """The sentence of :func:`common.validation.parameter_error`, with ``got`` shown as written (not repr)."""
    return InvalidParameterError(f"The '{name}' parameter of {owner} must be {expected}. Got {got} instead.")


def _check_images(images: object, owner: str) -> np.ndarray:
    """``images`` as a float32 array if it is a finite, non-negative ``(N, 1, H, W)`` array, else raise."""
    if not isinstance(images, np.ndarray) or images.dtype.kind not in "fiu":
        got = (
            f"an array of dtype {images.dtype}"
            if isinstance(images, np.ndarray)
            else f"type {type(images).__name__}"
        )
        raise _invalid(owner, "images", "a numeric numpy array of shape (N, 1, H, W)", got)
    if images.ndim != 4 or images.shape[0] < 1 or images.shape[1] != 1 or min(images.shape[2:]) < 2:
        raise _invalid(
            owner, "images", "of shape (N, 1, H, W) with N >= 1 and H, W >= 2", f"shape {images.shape}"
        )
    if not np.all(np.isfinite(images)):
        raise _invalid(owner, "images", "finite", "NaN or inf values")
    if np.any(images < 0):
        raise _invalid(
            owner,
            "images",
            "non-negative (magnitude images: corrupt them before any z-score)",
            f"a minimum of {float(images.min()):g}",
        )
    return np.asarray(images, dtype=np.float32)


def _check_labels(labels: object, images: np.ndarray, owner: str) -> np.ndarray:
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
        got = (
            f"an array of dtype {labels.dtype}"
            if isinstance(labels, np.ndarray)
            else f"type {type(labels).__name__}"
        )
        raise _invalid(owner, "labels", "an integer numpy array or None", got)
    if labels.shape != images.shape:
        raise _invalid(owner, "labels", f"of the images' shape {images.shape}", f"shape {labels.shape}")
    return labels


def _check_rng(rng: object, owner: str) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise _invalid(owner, "rng", "a numpy.random.Generator", f"type {type(rng).__name__}")
    return rng


def _identity(images: np.ndarray) -> np.ndarray:
    return np.array(images, dtype=np.float32, copy=True)


def _per_image(values: np.ndarray, reduce: Callable[..., np.ndarray]) -> np.ndarray:
    """``reduce`` over each image's pixels, shaped ``(N, 1, 1, 1)`` for broadcasting."""
    return np.asarray(reduce(values.reshape(len(values), -1), axis=1), dtype=np.float64).reshape(-1, 1, 1, 1)


# --------------------------------------------------------------------------- perturbations

_MAX_STD = 1.0
_MAX_LOG_GAMMA = 3.0  # gamma up to e^3 = 20: everything but the brightest tissue is black
_MAX_SIGMA = 10.0
_MAX_DEGREES = 360.0


def gaussian_noise(images: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Add white Gaussian noise, clipped at 0 (the images are magnitudes).

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, 1, H, W)``, float, non-negative.
    std : float
        Standard deviation of the noise in image intensity units (the nominal scale is
        ``[0, 1]``), in ``[0, 1]``; 0 returns the input values exactly.
    rng : numpy.random.Generator
        Source of the noise.

    Returns
    -------
    numpy.ndarray
        ``(N, 1, H, W)`` float32, ``max(x + n, 0)`` with ``n ~ N(0, std^2)`` i.i.d. per pixel.

    Raises
    ------
    InvalidParameterError
        If ``std`` is not a float in ``[0, 1]``, ``images`` is not a finite non-negative
        ``(N, 1, H, W)`` array or ``rng`` is not a Generator.
    """
    std = check_float("std", std, owner="gaussian_noise", low=0.0, high=_MAX_STD)
    x = _check_images(images, "gaussian_noise")
    rng = _check_rng(rng, "gaussian_noise")
    if std == 0.0:
        return _identity(x)
    noise = rng.normal(0.0, std, size=x.shape)
    return np.clip(x + noise, 0.0, None).astype(np.float32)


def salt_and_pepper(images: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Set a fraction of each image's pixels to 0 (pepper) or to the image's maximum (salt).

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, 1, H, W)``, float, non-negative.
    amount : float
        Fraction of the pixels of each image that are hit, in ``[0, 1]``: exactly
        ``round(amount * H * W)`` distinct pixels per image, half of them (rounded down)
        pepper, the rest salt. 0 returns the input values exactly.
    rng : numpy.random.Generator
        Source of the pixel positions.

    Returns
    -------
    numpy.ndarray
        ``(N, 1, H, W)`` float32.

    Raises
    ------
    InvalidParameterError
        If ``amount`` is not a float in ``[0, 1]``, or ``images`` or ``rng`` is invalid.
    """
    amount = check_float("amount", amount, owner="salt_and_pepper", low=0.0, high=1.0)
    x = _check_images(images, "salt_and_pepper")
    rng = _check_rng(rng, "salt_and_pepper")
    if amount == 0.0:
        return _identity(x)
    n, _, height, width = x.shape
    pixels = height * width
    hits = round(amount * pixels)
    out = x.reshape(n, pixels).copy()
    maxima = out.max(axis=1)
    # A random permutation per image: its first `hits` entries are distinct positions.
    order = np.argsort(rng.random((n, pixels)), axis=1)[:, :hits]
    pepper, salt = order[:, : hits // 2], order[:, hits // 2 :]
    rows = np.arange(n)[:, None]
    out[rows, pepper] = 0.0
    out[rows, salt] = np.broadcast_to(maxima[:, None], salt.shape)
    return out.reshape(x.shape)


def contrast(images: np.ndarray, strength: float) -> np.ndarray:
    """Gamma contrast curve over each image's own range: ``x -> m * (x / m) ** exp(strength)``.

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, 1, H, W)``, float, non-negative.
    strength : float
        ``|log gamma|`` in ``[0, 3]``; the exponent is ``gamma = exp(strength) >= 1``, which
        darkens the mid-tones (grey matter moves towards CSF). 0 returns the input values exactly.

    Returns
    -------
    numpy.ndarray
        ``(N, 1, H, W)`` float32; each image's maximum ``m`` and zeros are kept, and the curve is
        monotone, so the order of intensities is kept too. An all-zero image stays zero.

    Raises
    ------
    InvalidParameterError
        If ``strength`` is not a float in ``[0, 3]`` or ``images`` is invalid.
    """
    strength = check_float("strength", strength, owner="contrast", low=0.0, high=_MAX_LOG_GAMMA)
    x = _check_images(images, "contrast")
    if strength == 0.0:
        return _identity(x)
    values = x.astype(np.float64)
    maxima = _per_image(values, np.max)
    scale = np.where(maxima > 0.0, maxima, 1.0)
    return (scale * (values / scale) ** math.exp(strength)).astype(np.float32)


def blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the image plane (a wider point-spread function).

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, 1, H, W)``, float, non-negative.
    sigma : float
        Standard deviation of the Gaussian kernel in pixels, in ``[0, 10]``; 0 returns the
        input values exactly.

    Returns
    -------
    numpy.ndarray
        ``(N, 1, H, W)`` float32 (``scipy.ndimage.gaussian_filter`` over ``H, W`` only, zero
        padding beyond the border as MONAI's ``GaussianSmooth``, kernel truncated at 4 sigma).

    Raises
    ------
    InvalidParameterError
        If ``sigma`` is not a float in ``[0, 10]`` or ``images`` is invalid.
    """
    sigma = check_float("sigma", sigma, owner="blur", low=0.0, high=_MAX_SIGMA)
    x = _check_images(images, "blur")
    if sigma == 0.0:
        return _identity(x)
    out = ndimage.gaussian_filter(x.astype(np.float64), sigma=(0.0, 0.0, sigma, sigma), mode="constant")
    # Float round-off leaves -1e-17 where the image is 0 next to nothing; magnitudes stay >= 0.
    return np.clip(out, 0.0, None).astype(np.float32)


@overload
def rotate(images: np.ndarray, labels: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]: ...
@overload
def rotate(images: np.ndarray, labels: None, degrees: float) -> tuple[np.ndarray, None]: ...
def rotate(
    images: np.ndarray, labels: np.ndarray | None, degrees: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """In-plane rotation about the image centre: images bilinear, labels nearest, zero fill.

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, 1, H, W)``, float, non-negative.
    labels : numpy.ndarray or None
        ``(N, 1, H, W)`` integer class map, rotated with the images; None for none.
    degrees : float
        Angle in ``[0, 360]``, counter-clockwise as displayed with row 0 at the top (90 is
        ``np.rot90`` over ``H, W``); 0 returns the input values exactly.

    Returns
    -------
    images : numpy.ndarray
        ``(N, 1, H, W)`` float32; pixels rotated in from outside the frame are 0.
    labels : numpy.ndarray or None
        ``(N, 1, H, W)``, the labels' dtype, values from the input's (0 where filled).

    Raises
    ------
    InvalidParameterError
        If ``degrees`` is not a float in ``[0, 360]``, or ``images`` or ``labels`` is invalid.
    """
    degrees = check_float("degrees", degrees, owner="rotate", low=0.0, high=_MAX_DEGREES)
    x = _check_images(images, "rotate")
    y = None if labels is None else _check_labels(labels, x, "rotate")
    if degrees == 0.0:
        return _identity(x), None if y is None else y.copy()

    def turn(array: np.ndarray, order: int) -> np.ndarray:
        return ndimage.rotate(
            array, degrees, axes=(2, 3), reshape=False, order=order, mode="constant", cval=0
        )

    # Bilinear interpolation of non-negative values stays non-negative; clip the round-off anyway.
    rotated = np.clip(turn(x.astype(np.float64), 1), 0.0, None).astype(np.float32)
    return rotated, None if y is None else turn(y, 0).astype(y.dtype, copy=False)


@dataclass(frozen=True)
class PerturbationSpec:
    """One graded perturbation of :data:`PERTURBATIONS`.

    Attributes
    ----------
    name : str
        Key in :data:`PERTURBATIONS`.
    description : str
        One line for reports.
    unit : str
        What the strength measures (e.g. ``"std"``, ``"degrees"``).
    max_strength : float
        Largest strength :func:`perturb` accepts; the smallest is 0, the identity.
    random : bool
        Whether the perturbation draws from the generator.
    """

    name: str
    description: str
    unit: str
    max_strength: float
    random: bool


PERTURBATIONS: dict[str, PerturbationSpec] = {
    spec.name: spec
    for spec in (
        PerturbationSpec("noise", "additive Gaussian noise, clipped at 0", "std", _MAX_STD, True),
        PerturbationSpec(
            "salt-pepper",
            "pixels set to 0 or to the image's maximum, half each",
            "fraction of pixels",
            1.0,
            True,
        ),
        PerturbationSpec(
            "contrast",
            "gamma curve exp(strength) over each image's range",
            "|log gamma|",
            _MAX_LOG_GAMMA,
            False,
        ),
        PerturbationSpec("blur", "Gaussian point-spread blur", "sigma (px)", _MAX_SIGMA, False),
        PerturbationSpec(
            "rotation", "in-plane rotation about the centre, zero fill", "degrees", _MAX_DEGREES, False
        ),
    )
}
"""The graded perturbations of a robustness curve, by name."""


@overload
def perturb(
    name: str, images: np.ndarray, labels: np.ndarray, strength: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]: ...
@overload
def perturb(
    name: str, images: np.ndarray, labels: None, strength: float, rng: np.random.Generator
) -> tuple[np.ndarray, None]: ...
def perturb(
    name: str, images: np.ndarray, labels: np.ndarray | None, strength: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply the perturbation ``name`` of :data:`PERTURBATIONS` at ``strength``.

    Parameters
    ----------
    name : str
        One of ``"noise"``, ``"salt-pepper"``, ``"contrast"``, ``"blur"``, ``"rotation"``.
    images : numpy.ndarray
        ``(N, 1, H, W)``, float, non-negative.
    labels : numpy.ndarray or None
        ``(N, 1, H, W)`` integer class map; only ``"rotation"`` changes it, the others return
        it as given (the same object).
    strength : float
        In ``[0, PERTURBATIONS[name].max_strength]``, in the unit ``PERTURBATIONS[name].unit``;
        0 returns the input values exactly.
    rng : numpy.random.Generator
        Source of the random draws (used by ``"noise"`` and ``"salt-pepper"`` only).

    Returns
    -------
    images : numpy.ndarray
        ``(N, 1, H, W)`` float32.
    labels : numpy.ndarray or None
        The labels that go with the perturbed images.

    Raises
    ------
    InvalidParameterError
        On an unknown name (suggesting the nearest), a strength out of range, or invalid
        images, labels or generator.
    """
    name = check_choice("name", name, tuple(PERTURBATIONS), owner="perturb")
    spec = PERTURBATIONS[name]
    owner = f"perturb('{name}')"
    strength = check_float("strength", strength, owner=owner, low=0.0, high=spec.max_strength)
    _check_rng(rng, owner)
    if labels is not None:
        _check_labels(labels, _check_images(images, owner), owner)
    if name == "noise":
        return gaussian_noise(images, strength, rng), labels
    if name == "salt-pepper":
        return salt_and_pepper(images, strength, rng), labels
    if name == "contrast":
        return contrast(images, strength), labels
    if name == "blur":
        return blur(images, strength), labels
    return rotate(images, labels, strength)


# --------------------------------------------------------------------------- OOD sets


@dataclass(frozen=True)
class OodSetSpec:
    """One out-of-distribution set of :data:`OOD_SETS`.

    Attributes
    ----------
    name : str
        Key in :data:`OOD_SETS`.
    kind : {"near", "far"}
        ``"near"``: the same anatomy and contrast, mildly degraded; ``"far"``: another
        acquisition, contrast or object.
    has_labels : bool
        Whether the anatomy stays in place, so that the source images' labels apply.
    description : str
        One line for reports.
    """

    name: str
    kind: Literal["near", "far"]
    has_labels: bool
    description: str


OOD_SETS: dict[str, OodSetSpec] = {
    spec.name: spec
    for spec in (
        OodSetSpec("noise", "near", True, "Gaussian noise, std 0.05"),
        OodSetSpec("blur", "near", True, "Gaussian blur, sigma 1 px"),
        OodSetSpec("strong-noise", "far", True, "Gaussian noise, std 0.2"),
        OodSetSpec("strong-blur", "far", True, "Gaussian blur, sigma 3 px"),
        OodSetSpec("motion", "far", True, "motion ghosts: phase errors on periodic phase-encode lines"),
        OodSetSpec("inverted", "far", True, "T2-like contrast: the head's intensities inverted (CSF bright)"),
        OodSetSpec("ct-like", "far", True, "CT-like: grey/white contrast squeezed, a bright skull ring"),
        OodSetSpec("shapes", "far", False, "not a brain: 2-6 random ellipses and rectangles"),
        OodSetSpec("phantom", "far", False, "another anatomy: the modified Shepp-Logan head phantom"),
    )
}
"""The OOD sets a hospital makes from its own test images, by name."""

NEAR_SETS: tuple[str, ...] = tuple(name for name, spec in OOD_SETS.items() if spec.kind == "near")
"""Names of the near-OOD sets."""

FAR_SETS: tuple[str, ...] = tuple(name for name, spec in OOD_SETS.items() if spec.kind == "far")
"""Names of the far-OOD sets."""


def _head_mask(image: np.ndarray) -> np.ndarray:
    """The head of an ``(H, W)`` image: its largest connected region above 15 % of its maximum, holes filled.

    Keeping only the largest region drops isolated noise pixels of the background; filling the
    holes keeps dark tissue inside the head (ventricles) in it.
    """
    peak = float(image.max())
    if peak <= 0.0:
        return np.zeros(image.shape, dtype=bool)
    regions, count = ndimage.label(image > _FOREGROUND_FRACTION * peak)
    if count > 1:
        sizes = np.bincount(regions.ravel())[1:]
        mask = regions == int(np.argmax(sizes)) + 1
    else:
        mask = regions > 0
    return np.asarray(ndimage.binary_fill_holes(mask), dtype=bool)


def _disk(radius: int) -> np.ndarray:
    offsets = np.arange(-radius, radius + 1)
    return np.asarray(offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2)


def _reference_level(image: np.ndarray) -> float:
    return float(np.percentile(image, _REFERENCE_PERCENTILE))


def _inverted(images: np.ndarray) -> np.ndarray:
    """T2-like contrast: ``p - x`` inside the head (``p`` the 99.5th percentile), 0 outside."""
    out = np.zeros_like(images)
    for i, image in enumerate(images[:, 0]):
        mask = _head_mask(image)
        level = _reference_level(image)
        out[i, 0] = np.where(mask, np.clip(level - image, 0.0, None), 0.0)
    return out


# Knots of the CT-like remap, as fractions of the image's 99.5th percentile: the background stays
# dark, CSF (0.3-0.6) stays darker than tissue, grey and white matter (0.6-0.9) collapse to
# 0.45-0.5 (brain tissue spans only ~10 HU on CT), and overshoot above the reference is squeezed.
_CT_INPUT = (0.0, 0.15, 0.3, 0.6, 0.9, 1.0, 2.0)
_CT_OUTPUT = (0.0, 0.08, 0.15, 0.45, 0.5, 0.52, 0.6)
_SKULL_LEVEL = 1.0  # the skull, as a fraction of the image's 99.5th percentile (bone is brightest on CT)


def _ct_like(images: np.ndarray) -> np.ndarray:
    """CT-like: a monotone piecewise-linear remap of the head plus a bright skull ring around it."""
    out = np.zeros_like(images)
    height, width = images.shape[2:]
    radius = max(2, round(min(height, width) / 32))
    for i, image in enumerate(images[:, 0]):
        level = _reference_level(image)
        if level <= 0.0:
            continue
        remapped = level * np.interp(image / level, _CT_INPUT, _CT_OUTPUT)
        mask = _head_mask(image)
        skull = ndimage.binary_dilation(mask, structure=_disk(radius)) & ~mask
        out[i, 0] = np.where(skull, _SKULL_LEVEL * level, remapped)
    return out


_MOTION_PERIODS = (2, 3, 4)  # every 2nd/3rd/4th line: ghosts N/2, N/3, N/4 apart
_MOTION_PHASE = (math.pi / 3, math.pi)  # phase error of the hit lines, radians
_MOTION_SHIFT = (0.02, 0.08)  # translation during the hit lines, fraction of the phase-encode size


def _motion(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Motion ghosts: periodic phase-encode lines acquired with a phase error and a shifted head.

    Each image gets a random phase-encode axis, period ``p``, phase error and shift; the k-space
    lines ``ky = offset (mod p)`` are multiplied by ``exp(i (phi - 2 pi f d))`` (a constant phase
    error and a translation by ``d`` pixels), which puts ghost copies of the head ``N/p`` pixels
    apart along that axis. The magnitude is rescaled so its 99.5th percentile matches the input's.
    """
    out = np.empty_like(images)
    for i, image in enumerate(images[:, 0]):
        axis = int(rng.integers(2))
        period = int(rng.choice(_MOTION_PERIODS))
        offset = int(rng.integers(period))
        phase = float(rng.uniform(*_MOTION_PHASE)) * float(rng.choice((-1.0, 1.0)))
        size = image.shape[axis]
        shift = float(rng.uniform(*_MOTION_SHIFT)) * size * float(rng.choice((-1.0, 1.0)))
        hit = np.arange(size) % period == offset
        error = np.where(hit, np.exp(1j * (phase - 2.0 * math.pi * np.fft.fftfreq(size) * shift)), 1.0)
        kspace = np.fft.fft2(image.astype(np.float64))
        kspace *= error[:, None] if axis == 0 else error[None, :]
        ghosted = np.abs(np.fft.ifft2(kspace))
        reference, current = _reference_level(image), _reference_level(ghosted)
        if reference > 0.0 and current > 0.0:
            ghosted *= reference / current
        out[i, 0] = ghosted
    return out


_SHAPES_PER_IMAGE = (2, 6)
_SHAPE_INTENSITY = (0.2, 1.0)
_SHAPE_HALF_SIZE = (0.08, 0.3)  # half-axes as fractions of the image size
_SHAPES_NOISE_STD = 0.02


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in ``[-1, 1]``: ``x`` to the right, ``y`` up (row 0 at the top)."""
    ys = 1.0 - (np.arange(height) + 0.5) * 2.0 / height
    xs = (np.arange(width) + 0.5) * 2.0 / width - 1.0
    return np.meshgrid(xs, ys)


def _shapes(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Not a brain: 2-6 random ellipses or rectangles painted over each other on 0, plus mild noise."""
    n, _, height, width = shape
    x, y = _grid(height, width)
    out = np.zeros(shape, dtype=np.float64)
    for i in range(n):
        for _ in range(int(rng.integers(_SHAPES_PER_IMAGE[0], _SHAPES_PER_IMAGE[1] + 1))):
            rectangle = bool(rng.integers(2))
            cx, cy = rng.uniform(-0.6, 0.6, size=2)
            a, b = 2.0 * rng.uniform(*_SHAPE_HALF_SIZE, size=2)  # [-1, 1] spans 2
            angle = rng.uniform(0.0, math.pi)
            intensity = rng.uniform(*_SHAPE_INTENSITY)
            u = (x - cx) * math.cos(angle) + (y - cy) * math.sin(angle)
            v = -(x - cx) * math.sin(angle) + (y - cy) * math.cos(angle)
            inside = (np.abs(u) <= a) & (np.abs(v) <= b) if rectangle else (u / a) ** 2 + (v / b) ** 2 <= 1.0
            out[i, 0][inside] = intensity
    out += rng.normal(0.0, _SHAPES_NOISE_STD, size=shape)
    return np.clip(out, 0.0, None).astype(np.float32)


# The modified Shepp-Logan phantom (Toft, "The Radon transform: theory and implementation", 1996;
# Shepp and Logan, IEEE Trans. Nucl. Sci. 1974): per ellipse the additive intensity, the half-axes
# a (along x) and b (along y), the centre (x0, y0) in [-1, 1] with y up, and the angle in degrees.
_SHEPP_LOGAN: tuple[tuple[float, float, float, float, float, float], ...] = (
    (1.0, 0.69, 0.92, 0.0, 0.0, 0.0),
    (-0.8, 0.6624, 0.874, 0.0, -0.0184, 0.0),
    (-0.2, 0.11, 0.31, 0.22, 0.0, -18.0),
    (-0.2, 0.16, 0.41, -0.22, 0.0, 18.0),
    (0.1, 0.21, 0.25, 0.0, 0.35, 0.0),
    (0.1, 0.046, 0.046, 0.0, 0.1, 0.0),
    (0.1, 0.046, 0.046, 0.0, -0.1, 0.0),
    (0.1, 0.046, 0.023, -0.08, -0.605, 0.0),
    (0.1, 0.023, 0.023, 0.0, -0.606, 0.0),
    (0.1, 0.023, 0.046, 0.06, -0.605, 0.0),
)
_PHANTOM_DEGREES = 10.0
_PHANTOM_SCALE = (0.8, 1.0)
_PHANTOM_GAIN = 0.1  # the whole phantom's intensity times U(1 - g, 1 + g)
# Each inner feature's (ellipses 3-10) intensity times U(1 - j, 1 + j). The skull and brain
# ellipses are only scaled by the gain: jittering them apart would move the brain level
# (1 - 0.8 = 0.2) by up to +-0.18.
_PHANTOM_JITTER = 0.2


def shepp_logan(
    height: int,
    width: int,
    *,
    degrees: float = 0.0,
    scale: float = 1.0,
    intensities: np.ndarray | None = None,
) -> np.ndarray:
    """The modified Shepp-Logan head phantom on an ``(H, W)`` grid.

    Parameters
    ----------
    height, width : int
        Grid size in pixels, ``>= 1``; the phantom's ``[-1, 1]^2`` square fills the grid.
    degrees : float, default 0.0
        Counter-clockwise rotation as displayed, in ``[-360, 360]``.
    scale : float, default 1.0
        Size relative to the standard phantom, in ``(0, 10]``.
    intensities : numpy.ndarray, optional
        10 additive intensities replacing the table's ``(1, -0.8, -0.2, -0.2, 0.1, ...)``.

    Returns
    -------
    numpy.ndarray
        ``(height, width)`` float64, clipped at 0: skull 1, brain 0.2, ventricles 0 (standard).

    Raises
    ------
    InvalidParameterError
        If a size, the angle, the scale or the intensities are invalid.
    """
    height = check_int("height", height, owner="shepp_logan", low=1)
    width = check_int("width", width, owner="shepp_logan", low=1)
    degrees = check_float("degrees", degrees, owner="shepp_logan", low=-360.0, high=360.0)
    scale = check_float("scale", scale, owner="shepp_logan", low=0.0, high=10.0, low_open=True)
    if intensities is not None:
        values = np.asarray(intensities, dtype=np.float64)
        if values.shape != (len(_SHEPP_LOGAN),) or not np.all(np.isfinite(values)):
            raise _invalid(
                "shepp_logan", "intensities", f"{len(_SHEPP_LOGAN)} finite floats", f"shape {values.shape}"
            )
    x, y = _grid(height, width)
    theta = math.radians(degrees)
    # Sample the unrotated, unscaled phantom at the inversely transformed coordinates.
    xr = (x * math.cos(theta) + y * math.sin(theta)) / scale
    yr = (-x * math.sin(theta) + y * math.cos(theta)) / scale
    table = np.asarray(_SHEPP_LOGAN)
    values = table[:, 0] if intensities is None else np.asarray(intensities, dtype=np.float64)
    out = np.zeros((height, width))
    for value, (_, a, b, x0, y0, phi) in zip(values, table, strict=True):
        angle = math.radians(phi)
        u = (xr - x0) * math.cos(angle) + (yr - y0) * math.sin(angle)
        v = -(xr - x0) * math.sin(angle) + (yr - y0) * math.cos(angle)
        out[(u / a) ** 2 + (v / b) ** 2 <= 1.0] += value
    return np.clip(out, 0.0, None)


def _phantom(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Another anatomy: a Shepp-Logan phantom per image, rotated, shrunk and with jittered intensities."""
    n, _, height, width = shape
    out = np.empty(shape, dtype=np.float32)
    base = np.asarray(_SHEPP_LOGAN)[:, 0]
    for i in range(n):
        degrees = float(rng.uniform(-_PHANTOM_DEGREES, _PHANTOM_DEGREES))
        scale = float(rng.uniform(*_PHANTOM_SCALE))
        jitter = np.ones_like(base)
        jitter[2:] = rng.uniform(1.0 - _PHANTOM_JITTER, 1.0 + _PHANTOM_JITTER, size=len(base) - 2)
        jitter *= rng.uniform(1.0 - _PHANTOM_GAIN, 1.0 + _PHANTOM_GAIN)
        out[i, 0] = shepp_logan(height, width, degrees=degrees, scale=scale, intensities=base * jitter)
    return out


def make_ood_set(name: str, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Make the OOD set ``name`` of :data:`OOD_SETS` from a hospital's test images.

    Parameters
    ----------
    name : str
        One of :data:`NEAR_SETS` (``"noise"``, ``"blur"``) or :data:`FAR_SETS`
        (``"strong-noise"``, ``"strong-blur"``, ``"motion"``, ``"inverted"``, ``"ct-like"``,
        ``"shapes"``, ``"phantom"``).
    images : numpy.ndarray
        ``(N, 1, H, W)``, float, non-negative: the hospital's test images.
    rng : numpy.random.Generator
        Source of the random draws; derive it from ``(seed, hospital, "ood", name)``.

    Returns
    -------
    numpy.ndarray
        ``(N, 1, H, W)`` float32, non-negative and finite. For ``"shapes"`` and ``"phantom"``
        only the shape of ``images`` is used (no labels apply); the other sets keep each image's
        anatomy in place (``OOD_SETS[name].has_labels``).

    Raises
    ------
    InvalidParameterError
        On an unknown name (suggesting the nearest) or invalid images or generator.
    """
    name = check_choice("name", name, tuple(OOD_SETS), owner="make_ood_set")
    x = _check_images(images, "make_ood_set")
    rng = _check_rng(rng, "make_ood_set")
    out: np.ndarray
    if name == "noise":
        out = gaussian_noise(x, 0.05, rng)
    elif name == "blur":
        out = blur(x, 1.0)
    elif name == "strong-noise":
        out = gaussian_noise(x, 0.2, rng)
    elif name == "strong-blur":
        out = blur(x, 3.0)
    elif name == "motion":
        out = _motion(x, rng)
    elif name == "inverted":
        out = _inverted(x)
    elif name == "ct-like":
        out = _ct_like(x)
    elif name == "shapes":
        out = _shapes(x.shape, rng)
    else:
        out = _phantom(x.shape, rng)
    return np.ascontiguousarray(out, dtype=np.float32)
