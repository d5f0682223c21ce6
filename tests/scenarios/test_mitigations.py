"""Z-score, federated histogram standardisation and scanner augmentation."""

from __future__ import annotations

import itertools
from dataclasses import fields

import numpy as np
import pytest
import torch
from monai.data import get_track_meta

from scenarios.mitigations import (
    AUGMENT_LIMITS,
    LANDMARK_PERCENTILES,
    apply_histogram_standardization,
    foreground_percentiles,
    image_landmarks,
    scanner_augment_batch,
    standard_scale,
    zscore_images,
)
from scenarios.shift_measures import FOREGROUND_THRESHOLD, histogram_distance, intensity_histogram
from sims.hospitals import WorldSpec, make_federation, make_patient
from sims.scanners import IDENTITY_SCANNER, make_scanner_profile

P = len(LANDMARK_PERCENTILES)


@pytest.fixture(scope="module")
def hospitals() -> list[tuple[np.ndarray, np.ndarray]]:
    """Four hospitals (the four scanner archetypes at severity 1), five 64 px patients each."""
    world = WorldSpec(image_size=64, patients_per_hospital=10, scanner_severity=1.0)
    out = []
    for spec in make_federation(world, 4):
        images, labels = zip(*(make_patient(world, spec, p) for p in range(5)), strict=True)
        out.append((np.stack(images), np.stack(labels)))
    return out


def _ramp_image(low: float, high: float, size: int = 20) -> np.ndarray:
    """``(1, 1, size, size)``: a zero border around a foreground ramp from ``low`` to ``high``."""
    image = np.zeros((1, 1, size, size), dtype=np.float32)
    inner = size - 4
    image[0, 0, 2:-2, 2:-2] = np.linspace(low, high, inner * inner, dtype=np.float32).reshape(inner, inner)
    return image


# ---------------------------------------------------------------- zscore_images


def test_zscore_standardises_each_foreground_and_zeroes_the_background(
    hospitals: list[tuple[np.ndarray, np.ndarray]],
) -> None:
    images = np.concatenate([images for images, _ in hospitals])

    out = zscore_images(images)

    assert out.shape == images.shape and out.dtype == np.float32
    for image, z in zip(images, out, strict=True):
        mask = image > FOREGROUND_THRESHOLD
        assert z[mask].mean() == pytest.approx(0.0, abs=1e-5)
        assert z[mask].std() == pytest.approx(1.0, abs=1e-5)
        assert np.all(z[~mask] == 0.0)


def test_zscore_of_constant_and_empty_images_is_finite() -> None:
    images = np.zeros((2, 1, 8, 8), dtype=np.float32)
    images[0, 0, 2:6, 2:6] = 0.7  # constant foreground; image 1 has none

    out = zscore_images(images)

    assert np.all(np.isfinite(out))
    assert np.all(out == 0.0)  # centred; std 0 taken as 1


def test_zscore_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"'images' parameter of zscore_images must have shape \(N, 1, H, W\)"):
        zscore_images(np.zeros((1, 8, 8), dtype=np.float32))


# ---------------------------------------------------------------- landmarks and the standard scale


def test_landmarks_of_a_ramp_are_its_percentiles() -> None:
    images = np.concatenate([_ramp_image(0.2, 1.0), _ramp_image(0.4, 1.2), np.zeros((1, 1, 20, 20), np.float32)])

    per_image = foreground_percentiles(images)
    landmarks = image_landmarks(images)

    q = np.asarray(LANDMARK_PERCENTILES) / 100.0
    np.testing.assert_allclose(per_image[0], 0.2 + 0.8 * q, atol=1e-6)
    np.testing.assert_allclose(per_image[1], 0.4 + 0.8 * q, atol=1e-6)
    assert np.all(np.isnan(per_image[2]))  # no foreground
    np.testing.assert_allclose(landmarks, 0.3 + 0.8 * q, atol=1e-6)  # the empty image is skipped
    assert landmarks.shape == (P,) and landmarks.dtype == np.float64


def test_landmarks_need_foreground() -> None:
    with pytest.raises(ValueError, match="none of the 3 images has a pixel above the threshold 0.15"):
        image_landmarks(np.zeros((3, 1, 8, 8), dtype=np.float32))


def test_standard_scale_is_the_weighted_mean_mapped_to_zero_one() -> None:
    a = np.linspace(0.2, 1.0, P)
    b = np.linspace(0.4, 0.8, P) ** 2

    np.testing.assert_allclose(standard_scale([a]), np.linspace(0.0, 1.0, P))
    np.testing.assert_allclose(standard_scale([a, b], weights=[0, 5]), (b - b[0]) / (b[-1] - b[0]))
    mean = 0.25 * a + 0.75 * b
    np.testing.assert_allclose(standard_scale(np.stack([a, b]), weights=[1, 3]), (mean - mean[0]) / (mean[-1] - mean[0]))
    # Only the shape of the landmarks matters, not their scale.
    np.testing.assert_allclose(standard_scale([3 * a + 1, 3 * b + 1]), standard_scale([a, b]))


@pytest.mark.parametrize(
    ("landmarks", "weights", "message"),
    [
        ([], None, "The 'landmarks' parameter of standard_scale must be a non-empty sequence"),
        ([np.arange(P), np.arange(P - 1)], None, r"'landmarks\[1\]' parameter of standard_scale must be a 1-D landmark "
                                                  rf"vector of length {P}. Got shape \({P - 1},\)"),
        ([np.r_[0.0, 0.0, 1.0]], None, r"'landmarks\[0\]' .* must be finite and strictly increasing. Got \[0.0, 0.0, 1.0\]"),
        ([np.r_[0.0, np.nan, 1.0]], None, "must be finite and strictly increasing"),
        ([np.arange(P)], [1.0, 1.0], "The 'weights' parameter of standard_scale must be 1 finite non-negative"),
        ([np.arange(P)], [-1.0], "The 'weights' parameter of standard_scale"),
    ],
)
def test_standard_scale_rejects_bad_landmarks(landmarks: list[np.ndarray], weights: list[float] | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        standard_scale(landmarks, weights)


# ---------------------------------------------------------------- apply_histogram_standardization


def test_standardisation_with_own_landmarks_as_standard_is_the_identity(
    hospitals: list[tuple[np.ndarray, np.ndarray]],
) -> None:
    images = hospitals[0][0]
    landmarks = image_landmarks(images)

    out = apply_histogram_standardization(images, landmarks, landmarks)

    mask = images > FOREGROUND_THRESHOLD
    assert out.dtype == np.float32 and out.shape == images.shape
    np.testing.assert_allclose(out[mask], images[mask], rtol=0, atol=1e-6)
    assert np.all(out[~mask] == 0.0)


def test_standardisation_maps_landmarks_onto_the_standard_and_extrapolates_linearly() -> None:
    own = np.array([0.2, 0.5, 1.0])
    standard = np.array([0.0, 0.6, 1.0])
    image = np.zeros((1, 1, 1, 7), dtype=np.float32)
    image[0, 0, 0] = [0.0, 0.16, 0.2, 0.35, 0.5, 1.0, 1.5]

    out = apply_histogram_standardization(image, own, standard, threshold=0.1)

    # 0.16 extends the first segment (slope 2), 1.5 the last (slope 0.8); 0.0 is background.
    np.testing.assert_allclose(out[0, 0, 0], [0.0, -0.08, 0.0, 0.3, 0.6, 1.0, 1.4], atol=1e-6)


def test_per_image_standardisation_puts_every_image_on_the_standard(
    hospitals: list[tuple[np.ndarray, np.ndarray]],
) -> None:
    images = np.concatenate([images for images, _ in hospitals])
    per_image = foreground_percentiles(images)
    standard = standard_scale(per_image)

    out = apply_histogram_standardization(images, per_image, standard)

    for image, mapped in zip(images, out, strict=True):
        values = mapped[image > FOREGROUND_THRESHOLD]
        np.testing.assert_allclose(np.percentile(values, LANDMARK_PERCENTILES), standard, atol=0.01)


def test_federated_standardisation_reduces_the_shift_between_hospitals(
    hospitals: list[tuple[np.ndarray, np.ndarray]],
) -> None:
    # Prepare: each hospital shares only its landmarks; the server averages them.
    landmarks = [image_landmarks(images) for images, _ in hospitals]
    standard = standard_scale(landmarks, weights=[len(images) for images, _ in hospitals])

    # Execute
    raw = [intensity_histogram(images) for images, _ in hospitals]
    standardised = [
        intensity_histogram(apply_histogram_standardization(images, own, standard))
        for (images, _), own in zip(hospitals, landmarks, strict=True)
    ]

    # Assert: the mean pairwise Wasserstein distance at least halves.
    def mean_distance(histograms: list[np.ndarray]) -> float:
        return float(np.mean([histogram_distance(a, b) for a, b in itertools.combinations(histograms, 2)]))

    assert mean_distance(standardised) < 0.5 * mean_distance(raw)  # measured: 0.2-0.27 on seeds 0-2


@pytest.mark.parametrize(
    ("own", "standard", "message"),
    [
        (np.arange(P), np.arange(P - 1), r"'own_landmarks' parameter of apply_histogram_standardization must be a 1-D "
                                         rf"landmark vector of length {P - 1}"),
        (np.arange(P)[::-1], np.arange(P), "'own_landmarks' .* must be finite and strictly increasing"),
        (np.arange(P), np.zeros(P), "'standard' .* must be finite and strictly increasing"),
        (np.ones((3, P)).cumsum(axis=1), np.arange(P), rf"must have shape \({P},\) or \(2, {P}\) .* Got shape \(3, {P}\)"),
    ],
)
def test_standardisation_rejects_bad_landmarks(own: np.ndarray, standard: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apply_histogram_standardization(np.ones((2, 1, 4, 4), np.float32), own, standard)


# ---------------------------------------------------------------- scanner_augment_batch


@pytest.fixture(scope="module")
def batch(hospitals: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.concatenate([images for images, _ in hospitals])[:8]
    labels = np.concatenate([labels for _, labels in hospitals])[:8]
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def test_scanner_augmentation_at_strength_zero_is_the_identity(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()

    x_out, y_out = scanner_augment_batch(x, y, generator, strength=0.0)

    assert torch.equal(x_out, x) and torch.equal(y_out, y)
    assert torch.equal(generator.get_state(), state)  # nothing drawn


def test_scanner_augmentation_without_effects_is_the_identity(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch

    x_out, _ = scanner_augment_batch(x, y, torch.Generator().manual_seed(0), probability=0.0)

    assert torch.equal(x_out, x)


def test_scanner_augmentation_is_deterministic_in_the_generator(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    threads = torch.get_num_threads()

    first, _ = scanner_augment_batch(x, y, torch.Generator().manual_seed(7))
    again, _ = scanner_augment_batch(x, y, torch.Generator().manual_seed(7))
    other, _ = scanner_augment_batch(x, y, torch.Generator().manual_seed(8))

    assert first.numpy().tobytes() == again.numpy().tobytes()
    assert not torch.equal(first, other)
    # The process-wide settings it changes meanwhile are restored.
    assert get_track_meta() and torch.get_num_threads() == threads


def test_scanner_augmentation_changes_intensities_only_and_keeps_the_scale(
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    x, y = batch
    y_before = y.clone()

    x_out, y_out = scanner_augment_batch(x, y, torch.Generator().manual_seed(1), strength=1.5)

    assert x_out.shape == x.shape and x_out.dtype == torch.float32
    assert torch.equal(y_out, y_before)
    assert bool((x_out >= 0).all())
    changed = [not torch.equal(a, b) for a, b in zip(x_out, x, strict=True)]
    assert sum(changed) >= 6  # each of the 7 effects is off with p = 0.5: all off has p = 1/128
    # The 99.5th percentile of each image is kept, as the hospitals' scanners keep it.
    np.testing.assert_allclose(
        np.percentile(x_out.numpy(), 99.5, axis=(1, 2, 3)), np.percentile(x.numpy(), 99.5, axis=(1, 2, 3)), rtol=1e-4
    )


def test_scanner_augmentation_reaches_every_archetype_up_to_severity_two() -> None:
    # Every hospital's scanner at severity <= 2 lies inside the augmentation's range at strength 1.
    for seed, hospital in itertools.product(range(3), range(4)):
        profile = make_scanner_profile(seed, hospital, 2.0)
        assert profile != IDENTITY_SCANNER
        assert abs(np.log(profile.gamma)) <= AUGMENT_LIMITS["log_gamma"] + 1e-12
        assert profile.downsample - 1.0 <= AUGMENT_LIMITS["downsample_excess"] + 1e-12
        for field in fields(profile):
            if field.name in AUGMENT_LIMITS:
                assert getattr(profile, field.name) <= AUGMENT_LIMITS[field.name] + 1e-12, (seed, hospital, field.name)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strength": -0.5}, r"The 'strength' parameter of scanner_augment_batch must be a float in \[0, 2\]. Got -0.5"),
        ({"strength": 3.0}, r"must be a float in \[0, 2\]. Got 3.0 instead"),
        ({"probability": 1.5}, r"The 'probability' parameter of scanner_augment_batch must be a float in \[0, 1\]"),
    ],
)
def test_scanner_augmentation_rejects_bad_settings(kwargs: dict[str, float], message: str) -> None:
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match=message):
        scanner_augment_batch(x, x.long(), torch.Generator(), **kwargs)


def test_scanner_augmentation_rejects_bad_shape() -> None:
    x = torch.zeros(2, 8, 8)
    with pytest.raises(ValueError, match=r"must have shape \(B, 1, H, W\). Got \(2, 8, 8\) instead"):
        scanner_augment_batch(x, x.long(), torch.Generator())
