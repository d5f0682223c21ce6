"""Scanner physics: how each hospital's MRI scanner distorts the same anatomy.

A :class:`ScannerProfile` is data: the strength of seven acquisition effects. Each
effect is a pure function ``(image, strength[, rng]) -> image`` built on MONAI's
intensity transforms, and each is the identity (returns an equal array) at its
neutral strength. :func:`apply_scanner` chains them in acquisition order:

1. :func:`apply_gamma` -- sequence-dependent tissue contrast (MONAI ``AdjustContrast``).
2. :func:`apply_bias_field` -- receive-coil inhomogeneity (MONAI ``RandBiasField``).
3. :func:`apply_blur` -- point-spread function (MONAI ``GaussianSmooth``).
4. :func:`apply_low_resolution` -- thick/low-matrix acquisition (MONAI ``Resize``).
5. :func:`apply_gibbs_ringing` -- k-space truncation (MONAI ``GibbsNoise``).
6. :func:`apply_kspace_spike` -- herringbone spike (MONAI ``KSpaceSpikeNoise``).
7. :func:`add_rician_noise` -- magnitude of complex thermal noise (MONAI ``RandRicianNoise``).

:func:`make_scanner_profile` gives every hospital a distinct character (noisy,
blurry/low-resolution, bias field + contrast, ringing + spikes) whose strength
scales with a severity knob; severity 1 is "moderate": a small U-Net still
segments the anatomy well.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import astuple, dataclass, fields
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    AdjustContrast,
    GaussianSmooth,
    GibbsNoise,
    KSpaceSpikeNoise,
    RandBiasField,
    RandRicianNoise,
    Resize,
)

from sims.seeding import make_rng

__all__ = [
    "IDENTITY_SCANNER",
    "SCANNER_ARCHETYPES",
    "ScannerProfile",
    "add_rician_noise",
    "apply_bias_field",
    "apply_blur",
    "apply_gamma",
    "apply_gibbs_ringing",
    "apply_kspace_spike",
    "apply_low_resolution",
    "apply_scanner",
    "describe_profile",
    "make_scanner_profile",
    "scanner_archetype",
]

_MAX_GIBBS_ALPHA = 0.85  # alpha -> 1 erases all of k-space; cap extreme severities
_MONAI_SEED_BOUND = 2**32  # MONAI's set_random_state needs a seed in [0, 2**32)


def _check_range(
    owner: str, name: str, value: object, low: float, high: float, *, closed_high: bool = True
) -> None:
    ok = (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and low <= value
        and (value <= high if closed_high else value < high)
    )
    if not ok:
        upper = "inf)" if math.isinf(high) else (f"{high:g}]" if closed_high else f"{high:g})")
        raise ValueError(
            f"The '{name}' parameter of {owner} must be a float in [{low:g}, {upper}. "
            f"Got {value!r} instead."
        )


@dataclass(frozen=True)
class ScannerProfile:
    """Strength of each acquisition effect of one scanner; defaults are the identity.

    Attributes
    ----------
    bias_field : float, default 0.0
        Coefficient range ``c`` of the smooth multiplicative bias field: the field is
        ``exp(sum_k a_k L_k(x, y))`` over 2D Legendre polynomials of degree <= 3 with
        ``a_k ~ U(-c, c)``. 0 = none; about 0.3 is moderate. In ``[0, 2]``.
    gamma : float, default 1.0
        Gamma exponent of the contrast curve (1 = identity); ``< 1`` brightens dark
        tissue, ``> 1`` darkens it. In ``(0, 10]`` (``[0.7, 1.4]`` is moderate).
    noise_std : float, default 0.0
        Standard deviation of the Gaussian noise in the real and imaginary channels,
        as a fraction of the image's intensity range; the magnitude is Rician.
        In ``[0, 1]`` (0.02-0.05 is moderate).
    blur_sigma : float, default 0.0
        Gaussian point-spread sigma in pixels. In ``[0, 10]``.
    downsample : float, default 1.0
        Acquisition-matrix reduction factor (1 = identity): the image is area-averaged
        down by this factor and bilinearly up-sampled back. In ``[1, 8]``.
    spike_intensity : float, default 0.0
        Magnitude of one k-space spike relative to the DC coefficient, i.e. the
        amplitude of the herringbone stripes relative to the mean intensity. 0 = none.
        In ``[0, 5]``.
    gibbs_alpha : float, default 0.0
        MONAI ``GibbsNoise`` alpha: the fraction of the k-space radius that is
        truncated (0 = none). In ``[0, 1)``.

    Raises
    ------
    ValueError
        If a field is not a finite number in its range.
    """

    bias_field: float = 0.0
    gamma: float = 1.0
    noise_std: float = 0.0
    blur_sigma: float = 0.0
    downsample: float = 1.0
    spike_intensity: float = 0.0
    gibbs_alpha: float = 0.0

    def __post_init__(self) -> None:
        _check_range("ScannerProfile", "bias_field", self.bias_field, 0.0, 2.0)
        _check_range("ScannerProfile", "noise_std", self.noise_std, 0.0, 1.0)
        _check_range("ScannerProfile", "blur_sigma", self.blur_sigma, 0.0, 10.0)
        _check_range("ScannerProfile", "downsample", self.downsample, 1.0, 8.0)
        _check_range("ScannerProfile", "spike_intensity", self.spike_intensity, 0.0, 5.0)
        _check_range("ScannerProfile", "gibbs_alpha", self.gibbs_alpha, 0.0, 1.0, closed_high=False)
        if not (
            isinstance(self.gamma, (int, float, np.integer, np.floating))
            and not isinstance(self.gamma, bool)
            and math.isfinite(self.gamma)
            and 0.0 < self.gamma <= 10.0
        ):
            raise ValueError(
                "The 'gamma' parameter of ScannerProfile must be a float in (0, 10]. "
                f"Got {self.gamma!r} instead."
            )

    def to_dict(self) -> dict[str, float]:
        """The fields as plain floats, e.g. for logs and cache keys."""
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


IDENTITY_SCANNER = ScannerProfile()
"""A perfect scanner: :func:`apply_scanner` returns the image unchanged."""

SCANNER_ARCHETYPES: tuple[str, ...] = ("noisy", "blurry", "bias_contrast", "ringing_spikes")
"""The characters a hospital's scanner can have, see :func:`scanner_archetype`."""


@contextmanager
def _single_threaded_torch() -> Iterator[None]:
    """Run torch on one intra-op thread, restoring the previous setting afterwards.

    The images are tiny (96 x 96): waking torch's OpenMP pool costs far more than
    it saves, pathologically so on small VMs (an FFT took 30 ms on two vCPUs
    instead of 0.04 ms). The setting is process-wide, so concurrent threads that
    run torch work meanwhile would briefly see one thread too.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_monai(transform: Callable[..., Any], image: np.ndarray) -> np.ndarray:
    """Apply a channel-first MONAI transform to an ``(H, W)`` array; float32 ``(H, W)`` out."""
    with _single_threaded_torch():
        out = transform(torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32))[None])
    array = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    return np.ascontiguousarray(array[0], dtype=np.float32)


def _identity(image: np.ndarray) -> np.ndarray:
    return np.array(image, dtype=np.float32, copy=True)


def _monai_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, _MONAI_SEED_BOUND))


def apply_gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    """Gamma contrast change over the image's own intensity range.

    Parameters
    ----------
    image : numpy.ndarray
        Shape ``(H, W)``, float.
    gamma : float
        Exponent, ``> 0``; 1 returns the input unchanged.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32, ``((x - min) / range) ** gamma * range + min``; min and
        max are preserved.
    """
    if gamma == 1.0:
        return _identity(image)
    return _run_monai(AdjustContrast(gamma=float(gamma)), image)


def apply_bias_field(image: np.ndarray, coefficient: float, rng: np.random.Generator) -> np.ndarray:
    """Multiply by a smooth random bias field (coil inhomogeneity).

    Parameters
    ----------
    image : numpy.ndarray
        Shape ``(H, W)``, float.
    coefficient : float
        Legendre coefficients are drawn from ``U(-coefficient, coefficient)``
        (MONAI ``RandBiasField``, degree 3); 0 returns the input unchanged.
    rng : numpy.random.Generator
        Source of the field's coefficients.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32, ``image * exp(field)``.

    References
    ----------
    Van Leemput et al., "Automated model-based tissue classification of MR images
    of the brain", IEEE TMI 1999.
    """
    if coefficient == 0.0:
        return _identity(image)
    transform = RandBiasField(degree=3, coeff_range=(-float(coefficient), float(coefficient)), prob=1.0)
    transform.set_random_state(seed=_monai_seed(rng))
    return _run_monai(transform, image)


def apply_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian point-spread blur.

    Parameters
    ----------
    image : numpy.ndarray
        Shape ``(H, W)``, float.
    sigma : float
        Standard deviation in pixels; 0 returns the input unchanged.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32 (zero padding at the borders).
    """
    if sigma == 0.0:
        return _identity(image)
    return _run_monai(GaussianSmooth(sigma=float(sigma)), image)


def apply_low_resolution(image: np.ndarray, factor: float) -> np.ndarray:
    """Simulate a coarser acquisition matrix: area down-sampling then bilinear up-sampling.

    Parameters
    ----------
    image : numpy.ndarray
        Shape ``(H, W)``, float.
    factor : float
        Down-sampling factor ``>= 1``; 1 returns the input unchanged. The coarse
        grid is ``(round(H / factor), round(W / factor))``, at least 4 x 4.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32.
    """
    if factor == 1.0:
        return _identity(image)
    height, width = image.shape
    coarse = (max(4, round(height / factor)), max(4, round(width / factor)))
    low = _run_monai(Resize(spatial_size=coarse, mode="area"), image)
    return _run_monai(Resize(spatial_size=(height, width), mode="bilinear", align_corners=False), low)


def apply_gibbs_ringing(image: np.ndarray, alpha: float) -> np.ndarray:
    """Gibbs ringing from truncating k-space outside a centred disc.

    Parameters
    ----------
    image : numpy.ndarray
        Shape ``(H, W)``, float.
    alpha : float
        In ``[0, 1)``: the disc radius is ``(1 - alpha) * max(H, W) / sqrt(2)``
        (MONAI ``GibbsNoise``); 0 returns the input unchanged.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32, real part of the truncated inverse transform.
    """
    if alpha == 0.0:
        return _identity(image)
    return _run_monai(GibbsNoise(alpha=float(alpha)), image)


def apply_kspace_spike(image: np.ndarray, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """Add one k-space spike (herringbone / corduroy artefact).

    Parameters
    ----------
    image : numpy.ndarray
        Shape ``(H, W)``, float.
    intensity : float
        Spike magnitude relative to the DC coefficient, which makes it the stripe
        amplitude relative to the image mean; 0 returns the input unchanged.
    rng : numpy.random.Generator
        Source of the spike's location: a mid-to-high frequency, between 1/8 and
        3/8 of the matrix from the k-space centre along each axis, random signs.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32.
    """
    if intensity == 0.0:
        return _identity(image)
    height, width = image.shape
    offsets = [
        int(rng.integers(max(1, size // 8), max(2, 3 * size // 8))) * int(rng.choice((-1, 1)))
        for size in (height, width)
    ]
    location = (height // 2 + offsets[0], width // 2 + offsets[1])
    dc_magnitude = abs(float(np.sum(image, dtype=np.float64)))
    log_intensity = math.log(float(intensity) * dc_magnitude + 1e-10)
    return _run_monai(KSpaceSpikeNoise(loc=location, k_intensity=log_intensity), image)


def add_rician_noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Add Rician noise: the magnitude of the image plus complex Gaussian noise.

    Parameters
    ----------
    image : numpy.ndarray
        Shape ``(H, W)``, float.
    std : float
        Standard deviation of each Gaussian channel as a fraction of the image's
        intensity range ``max - min``; 0 returns the input unchanged.
    rng : numpy.random.Generator
        Source of the noise.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32, ``sqrt((x + n1) ** 2 + n2 ** 2)``, non-negative.

    References
    ----------
    Gudbjartsson and Patz, "The Rician distribution of noisy MRI data", MRM 1995.
    """
    if std == 0.0:
        return _identity(image)
    intensity_range = float(np.max(image) - np.min(image)) or 1.0
    transform = RandRicianNoise(prob=1.0, mean=0.0, std=float(std) * intensity_range, sample_std=False)
    transform.set_random_state(seed=_monai_seed(rng))
    return _run_monai(transform, image)


def apply_scanner(image: np.ndarray, profile: ScannerProfile, rng: np.random.Generator) -> np.ndarray:
    """Acquire an image with a scanner: chain every effect of ``profile``.

    Parameters
    ----------
    image : numpy.ndarray
        Shape ``(H, W)``, float in ``[0, 1]`` (the ideal image).
    profile : ScannerProfile
        Strength of each effect; :data:`IDENTITY_SCANNER` returns the input unchanged.
    rng : numpy.random.Generator
        Source of every random draw (bias field, spike location, noise); derive it
        from ``(seed, hospital, patient, "scanner")``.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` float32, non-negative, rescaled so that its 99.5th percentile
        equals the input's (roughly ``[0, 1]``; noise and ringing may overshoot 1).

    Raises
    ------
    ValueError
        If ``image`` is not 2D.
    """
    if image.ndim != 2:
        raise ValueError(f"apply_scanner expects an (H, W) image. Got shape {image.shape} instead.")
    if profile == IDENTITY_SCANNER:
        return _identity(image)
    out = apply_gamma(image, profile.gamma)
    out = apply_bias_field(out, profile.bias_field, rng)
    out = apply_blur(out, profile.blur_sigma)
    out = apply_low_resolution(out, profile.downsample)
    out = apply_gibbs_ringing(out, profile.gibbs_alpha)
    out = apply_kspace_spike(out, profile.spike_intensity, rng)
    out = add_rician_noise(out, profile.noise_std, rng)
    # Undo the global gain the effects introduce (bias field, gamma) so that every
    # scanner delivers images on the same nominal scale.
    reference = float(np.percentile(image, 99.5))
    current = float(np.percentile(out, 99.5))
    if current > 0.0 and reference > 0.0:
        out = out * np.float32(reference / current)
    return np.clip(out, 0.0, None).astype(np.float32, copy=False)


# Effect strengths at severity 1 ("moderate") per archetype: (low, high) uniform ranges.
# The archetype's own effects are strong; every scanner also gets mild noise and a
# mild bias field, as real scanners do.
_MILD = {"noise_std": (0.005, 0.015), "bias_field": (0.0, 0.1), "log_gamma": (-0.1, 0.1)}
_ARCHETYPE_RANGES: dict[str, dict[str, tuple[float, float]]] = {
    "noisy": {"noise_std": (0.03, 0.05)},
    "blurry": {"blur_sigma": (0.3, 0.6), "downsample_excess": (0.4, 0.7)},
    "bias_contrast": {"bias_field": (0.25, 0.4), "log_gamma_magnitude": (0.25, 0.34)},
    "ringing_spikes": {"gibbs_alpha": (0.3, 0.4), "spike_intensity": (0.1, 0.2)},
}


def scanner_archetype(seed: int, hospital: int) -> str:
    """The character of a hospital's scanner, one of :data:`SCANNER_ARCHETYPES`.

    Hospital ``h`` gets ``SCANNER_ARCHETYPES[(h + offset) % 4]`` with ``offset`` drawn
    from ``make_rng(seed, "scanner-archetypes")``: any four consecutive hospitals
    have four different characters, and which hospital gets which varies with the seed.
    """
    offset = int(make_rng(seed, "scanner-archetypes").integers(len(SCANNER_ARCHETYPES)))
    return SCANNER_ARCHETYPES[(int(hospital) + offset) % len(SCANNER_ARCHETYPES)]


def make_scanner_profile(seed: int, hospital: int, severity: float) -> ScannerProfile:
    """Draw the scanner of one hospital.

    The hospital's character comes from :func:`scanner_archetype`: its own effects
    are strong, and every scanner also has mild noise, bias field and gamma. The
    strengths are drawn from ``make_rng(seed, hospital, "scanner")`` and scaled by
    ``severity``: additive effects linearly, the gamma exponent in log space, the
    down-sampling factor as ``1 + severity * excess``.

    Parameters
    ----------
    seed : int
        Root seed of the world.
    hospital : int
        Hospital index, ``>= 0``.
    severity : float
        In ``[0, 3]``. 0 gives exactly :data:`IDENTITY_SCANNER`; 1 is moderate, with at
        most: noise std 0.05, blur 0.6 px with down-sampling 1.7, gamma in
        [0.71, 1.41], bias 0.4, Gibbs alpha 0.4 with spikes of 20 % of the mean;
        3 is severe.

    Returns
    -------
    ScannerProfile
        The hospital's scanner; Gibbs alpha is capped at 0.85.

    Raises
    ------
    ValueError
        If ``severity`` is outside ``[0, 3]`` or ``hospital`` is negative.
    """
    _check_range("make_scanner_profile", "severity", severity, 0.0, 3.0)
    if isinstance(hospital, bool) or not isinstance(hospital, (int, np.integer)) or hospital < 0:
        raise ValueError(
            "The 'hospital' parameter of make_scanner_profile must be an int in [0, inf). "
            f"Got {hospital!r} instead."
        )
    if severity == 0.0:
        return IDENTITY_SCANNER
    archetype = scanner_archetype(seed, hospital)
    rng = make_rng(seed, int(hospital), "scanner")
    # Draw every range in a fixed order so that the stream does not depend on the archetype.
    ranges = {**_MILD, **_ARCHETYPE_RANGES[archetype]}
    keys = (
        "noise_std",
        "bias_field",
        "log_gamma",
        "log_gamma_magnitude",
        "blur_sigma",
        "downsample_excess",
        "gibbs_alpha",
        "spike_intensity",
    )
    draws = {key: float(rng.uniform(*ranges.get(key, (0.0, 0.0)))) for key in keys}
    gamma_sign = 1.0 if rng.random() < 0.5 else -1.0
    log_gamma = draws["log_gamma"]
    if archetype == "bias_contrast":
        log_gamma = gamma_sign * draws["log_gamma_magnitude"]
    return ScannerProfile(
        bias_field=min(2.0, severity * draws["bias_field"]),
        gamma=math.exp(severity * log_gamma),
        noise_std=severity * draws["noise_std"],
        blur_sigma=severity * draws["blur_sigma"],
        downsample=1.0 + severity * draws["downsample_excess"],
        spike_intensity=severity * draws["spike_intensity"],
        gibbs_alpha=min(_MAX_GIBBS_ALPHA, severity * draws["gibbs_alpha"]),
    )


def describe_profile(profile: ScannerProfile) -> str:
    """One-line human-readable summary, e.g. for logs: only the non-neutral effects."""
    neutral = astuple(IDENTITY_SCANNER)
    parts = [
        f"{f.name}={value:.3g}"
        for f, value, default in zip(fields(profile), astuple(profile), neutral, strict=True)
        if value != default
    ]
    return ", ".join(parts) or "identity"
