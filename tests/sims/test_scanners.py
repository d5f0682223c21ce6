from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from sims.anatomy import load_anatomy
from sims.scanners import (
    IDENTITY_SCANNER,
    SCANNER_ARCHETYPES,
    ScannerProfile,
    add_rician_noise,
    apply_bias_field,
    apply_blur,
    apply_gamma,
    apply_gibbs_ringing,
    apply_kspace_spike,
    apply_low_resolution,
    apply_scanner,
    describe_profile,
    make_scanner_profile,
    scanner_archetype,
)
from sims.seeding import make_rng


@pytest.fixture(scope="module")
def brain() -> np.ndarray:
    """A 96 x 96 axial slice of the template, float32 in [0, 0.93], zero outside the brain."""
    t1 = load_anatomy().t1[3:195, 10:202, 90]
    return ndimage.zoom(t1, 0.5, order=1).astype(np.float32)


def high_frequency(image: np.ndarray) -> float:
    """Mean absolute difference between neighbouring pixels."""
    return float(np.abs(np.diff(image, axis=0)).mean() + np.abs(np.diff(image, axis=1)).mean())


Effect = Callable[[np.ndarray, float], np.ndarray]
EFFECTS: dict[str, tuple[Effect, float, float]] = {
    # name: (effect(image, strength), neutral strength, a moderate strength)
    "gamma": (apply_gamma, 1.0, 0.7),
    "bias_field": (lambda x, c: apply_bias_field(x, c, make_rng(0, "test")), 0.0, 0.3),
    "noise": (lambda x, s: add_rician_noise(x, s, make_rng(0, "test")), 0.0, 0.04),
    "blur": (apply_blur, 0.0, 1.0),
    "low_resolution": (apply_low_resolution, 1.0, 2.0),
    "spike": (lambda x, s: apply_kspace_spike(x, s, make_rng(0, "test")), 0.0, 0.1),
    "gibbs": (apply_gibbs_ringing, 0.0, 0.4),
}


@pytest.mark.parametrize("name", EFFECTS)
def test_each_effect_is_the_identity_at_its_neutral_value(brain: np.ndarray, name: str) -> None:
    # Prepare
    effect, neutral, _ = EFFECTS[name]

    # Execute
    out = effect(brain, neutral)

    # Assert
    np.testing.assert_array_equal(out, brain)
    assert out is not brain


@pytest.mark.parametrize("name", EFFECTS)
def test_each_effect_keeps_shape_and_float32(brain: np.ndarray, name: str) -> None:
    # Prepare
    effect, _, strength = EFFECTS[name]

    # Execute
    out = effect(brain, strength)

    # Assert
    assert out.shape == brain.shape
    assert out.dtype == np.float32
    assert not np.array_equal(out, brain)


def test_gamma_follows_the_closed_form_over_the_image_range(brain: np.ndarray) -> None:
    # Prepare
    low, span = float(brain.min()), float(brain.max() - brain.min())

    # Execute
    bright, dark = apply_gamma(brain, 0.7), apply_gamma(brain, 1.4)

    # Assert
    np.testing.assert_allclose(bright, ((brain - low) / span) ** 0.7 * span + low, atol=1e-5)
    assert bright.mean() > brain.mean() + 0.02
    assert dark.mean() < brain.mean() - 0.02


def test_bias_field_is_smooth_and_multiplicative(brain: np.ndarray) -> None:
    # Prepare
    inside = brain > 0.2

    # Execute
    out = apply_bias_field(brain, 0.3, make_rng(0, "bias"))
    log_ratio = np.log(out[inside] / brain[inside])

    # Assert: the log field varies across the brain but is smooth pixel to pixel
    assert log_ratio.std() > 0.05
    field = np.zeros_like(brain)
    field[inside] = log_ratio
    neighbours = inside[1:, :] & inside[:-1, :]
    assert np.abs(np.diff(field, axis=0)[neighbours]).max() < 0.05
    np.testing.assert_array_equal(out[brain == 0], 0.0)


def test_rician_noise_background_has_the_rayleigh_mean(brain: np.ndarray) -> None:
    # Prepare
    std = 0.04
    background = brain == 0
    sigma = std * float(brain.max() - brain.min())

    # Execute
    out = add_rician_noise(brain, std, make_rng(0, "noise"))

    # Assert: |n1 + i n2| with n ~ N(0, sigma^2) has mean sigma * sqrt(pi / 2)
    assert out[background].mean() == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.05)
    assert out.min() >= 0.0
    assert high_frequency(out) > 1.5 * high_frequency(brain)


@pytest.mark.parametrize(("effect", "strength"), [(apply_blur, 1.0), (apply_low_resolution, 2.0)])
def test_blur_and_low_resolution_remove_high_frequencies(
    brain: np.ndarray, effect: Effect, strength: float
) -> None:
    # Execute
    out = effect(brain, strength)

    # Assert
    assert high_frequency(out) < 0.8 * high_frequency(brain)
    assert out.mean() == pytest.approx(brain.mean(), rel=0.02)


def test_gibbs_ringing_truncates_k_space_outside_the_disc(brain: np.ndarray) -> None:
    # Prepare
    alpha, size = 0.5, brain.shape[0]
    radius = (1 - alpha) * size * math.sqrt(2) / 2
    centre = (size - 1) / 2
    rows, cols = np.indices(brain.shape)
    outside = np.hypot(rows - centre, cols - centre) > radius + 1

    def energy_outside(image: np.ndarray) -> float:
        k = np.fft.fftshift(np.fft.fft2(image))
        return float((np.abs(k[outside]) ** 2).sum())

    # Execute
    out = apply_gibbs_ringing(brain, alpha)

    # Assert
    assert energy_outside(out) < 0.01 * energy_outside(brain)
    assert out.min() < 0.0  # ringing undershoots at the brain's edge


def test_kspace_spike_adds_one_frequency_of_the_expected_magnitude(brain: np.ndarray) -> None:
    # Prepare
    intensity = 0.1

    # Execute
    out = apply_kspace_spike(brain, intensity, make_rng(0, "spike"))
    added = np.abs(np.fft.fft2(out - brain))

    # Assert: the real part splits the spike over +k and -k, half the magnitude each
    largest = np.sort(added.ravel())[::-1]
    expected = 0.5 * intensity * float(brain.sum())
    assert largest[0] == pytest.approx(expected, rel=0.05)
    assert largest[1] == pytest.approx(expected, rel=0.05)
    assert largest[2] < 0.01 * expected


def test_apply_scanner_with_identity_returns_the_input(brain: np.ndarray) -> None:
    # Execute
    out = apply_scanner(brain, IDENTITY_SCANNER, make_rng(0))

    # Assert
    np.testing.assert_array_equal(out, brain)


def test_apply_scanner_is_deterministic_and_keeps_the_scale(brain: np.ndarray) -> None:
    # Prepare
    profile = ScannerProfile(
        bias_field=0.3,
        gamma=0.8,
        noise_std=0.03,
        blur_sigma=0.5,
        downsample=1.5,
        spike_intensity=0.1,
        gibbs_alpha=0.3,
    )

    # Execute
    first = apply_scanner(brain, profile, make_rng(0, 0, "scanner"))
    again = apply_scanner(brain, profile, make_rng(0, 0, "scanner"))
    other = apply_scanner(brain, profile, make_rng(0, 1, "scanner"))

    # Assert
    assert first.tobytes() == again.tobytes()
    assert not np.array_equal(first, other)
    assert first.dtype == np.float32 and first.shape == brain.shape
    assert first.min() >= 0.0
    assert np.percentile(first, 99.5) == pytest.approx(np.percentile(brain, 99.5), rel=0.02)


def test_apply_scanner_rejects_channel_first_images(brain: np.ndarray) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"\(H, W\) image. Got shape \(1, 96, 96\)"):
        apply_scanner(brain[None], IDENTITY_SCANNER, make_rng(0))


def test_severity_zero_gives_the_identity_scanner() -> None:
    # Execute
    profiles = [make_scanner_profile(seed=3, hospital=h, severity=0.0) for h in range(4)]

    # Assert
    assert all(p == IDENTITY_SCANNER for p in profiles)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32), hospital=st.integers(0, 1000))
def test_moderate_scanners_stay_within_learnable_bounds(seed: int, hospital: int) -> None:
    # Execute
    profile = make_scanner_profile(seed, hospital, severity=1.0)

    # Assert
    assert 0.0 < profile.noise_std <= 0.05
    assert profile.blur_sigma <= 1.0
    assert 1.0 <= profile.downsample <= 2.0
    assert 0.7 <= profile.gamma <= 1.42
    assert profile.bias_field <= 0.4
    assert profile.gibbs_alpha <= 0.4
    assert profile.spike_intensity <= 0.2


def test_four_consecutive_hospitals_have_four_characters() -> None:
    # Execute
    archetypes = {scanner_archetype(seed=0, hospital=h) for h in range(5, 9)}
    profiles = {make_scanner_profile(0, h, 1.0) for h in range(5, 9)}

    # Assert
    assert archetypes == set(SCANNER_ARCHETYPES)
    assert len(profiles) == 4


@pytest.mark.parametrize("archetype", SCANNER_ARCHETYPES)
def test_each_character_has_its_own_strong_effect(archetype: str) -> None:
    # Prepare
    hospital = next(h for h in range(8) if scanner_archetype(0, h) == archetype)

    # Execute
    profile = make_scanner_profile(0, hospital, 1.0)

    # Assert
    strong = {
        "noisy": profile.noise_std >= 0.03,
        "blurry": profile.blur_sigma >= 0.3 and profile.downsample >= 1.4,
        "bias_contrast": profile.bias_field >= 0.25 and abs(math.log(profile.gamma)) >= 0.25,
        "ringing_spikes": profile.gibbs_alpha >= 0.3 and profile.spike_intensity >= 0.1,
    }
    assert strong[archetype]
    assert [name for name, is_strong in strong.items() if is_strong] == [archetype]


def test_severity_scales_the_effects() -> None:
    # Execute
    moderate = make_scanner_profile(0, 2, 1.0)
    severe = make_scanner_profile(0, 2, 2.0)

    # Assert
    assert severe.noise_std == pytest.approx(2 * moderate.noise_std)
    assert severe.blur_sigma == pytest.approx(2 * moderate.blur_sigma)
    assert severe.gamma == pytest.approx(moderate.gamma**2)
    assert severe.downsample - 1 == pytest.approx(2 * (moderate.downsample - 1))


# fmt: off
INVALID_PROFILES: list[tuple[dict, str]] = [
    ({"gibbs_alpha": 1.0}, "The 'gibbs_alpha' parameter of ScannerProfile must be a float in [0, 1). Got 1.0 instead."),
    ({"gamma": 0.0}, "The 'gamma' parameter of ScannerProfile must be a float in (0, 10]. Got 0.0 instead."),
    ({"downsample": 0.5}, "The 'downsample' parameter of ScannerProfile must be a float in [1, 8]. Got 0.5 instead."),
    ({"noise_std": -0.1}, "The 'noise_std' parameter of ScannerProfile must be a float in [0, 1]. Got -0.1 instead."),
    ({"blur_sigma": float("nan")}, "The 'blur_sigma' parameter of ScannerProfile must be a float in [0, 10]. Got nan instead."),
]
# fmt: on


@pytest.mark.parametrize(("kwargs", "message"), INVALID_PROFILES)
def test_scanner_profile_validation_names_parameter_range_and_value(kwargs: dict, message: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ScannerProfile(**kwargs)


def test_make_scanner_profile_rejects_out_of_range_severity() -> None:
    # Execute / Assert
    expected = r"'severity' parameter of make_scanner_profile .* \[0, 3\]. Got 4 instead"
    with pytest.raises(ValueError, match=expected):
        make_scanner_profile(0, 0, 4)


def test_describe_profile_lists_only_active_effects() -> None:
    # Execute / Assert
    assert describe_profile(IDENTITY_SCANNER) == "identity"
    assert describe_profile(ScannerProfile(noise_std=0.04, gamma=0.8)) == "gamma=0.8, noise_std=0.04"
