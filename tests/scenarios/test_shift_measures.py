"""Foreground intensity histograms and their Wasserstein distance."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from scenarios.shift_measures import (
    FOREGROUND_THRESHOLD,
    HISTOGRAM_BINS,
    HISTOGRAM_RANGE,
    bin_centres,
    histogram_distance,
    intensity_histogram,
    mean_histogram,
)
from sims.hospitals import WorldSpec, make_federation, make_patient
from sims.scanners import apply_scanner, make_scanner_profile
from sims.seeding import make_rng


@pytest.fixture(scope="module")
def ideal_images() -> np.ndarray:
    """Six 64 px patients through a perfect scanner, ``(6, 1, 64, 64)``."""
    world = WorldSpec(image_size=64, patients_per_hospital=10, scanner_severity=0.0)
    spec = make_federation(world, 1)[0]
    return np.stack([make_patient(world, spec, p)[0] for p in range(6)])


def _one_bin(index: int) -> np.ndarray:
    histogram = np.zeros(HISTOGRAM_BINS)
    histogram[index] = 1.0
    return histogram


histograms = arrays(np.float64, HISTOGRAM_BINS, elements=st.floats(0.0, 1.0)).filter(lambda h: h.sum() > 1e-3)


# ---------------------------------------------------------------- intensity_histogram


def test_histogram_is_normalised_over_the_foreground_only(ideal_images: np.ndarray) -> None:
    histogram = intensity_histogram(ideal_images)

    assert histogram.shape == (HISTOGRAM_BINS,)
    assert histogram.sum() == pytest.approx(1.0)
    assert np.all(histogram >= 0)
    # Bins wholly at or below the threshold are empty: background pixels are not counted.
    below = np.linspace(*HISTOGRAM_RANGE, HISTOGRAM_BINS + 1)[1:] <= FOREGROUND_THRESHOLD
    assert below.any() and np.all(histogram[below] == 0)


def test_histogram_golden_values_and_overshoot_in_last_bin() -> None:
    # Prepare: background 0, 3 pixels at 0.5, 1 pixel at 7.0 (far above the range).
    image = np.zeros((1, 1, 4, 4), dtype=np.float32)
    image[0, 0, 0, :3] = 0.5
    image[0, 0, 1, 0] = 7.0

    histogram = intensity_histogram(image)

    width = (HISTOGRAM_RANGE[1] - HISTOGRAM_RANGE[0]) / HISTOGRAM_BINS
    expected = np.zeros(HISTOGRAM_BINS)
    expected[int(0.5 // width)] = 0.75
    expected[-1] = 0.25
    np.testing.assert_allclose(histogram, expected)


def test_histogram_pools_all_images() -> None:
    a = np.full((1, 1, 2, 2), 0.5, dtype=np.float32)
    b = np.full((3, 1, 2, 2), 1.0, dtype=np.float32)

    pooled = intensity_histogram(np.concatenate([a, b]))

    np.testing.assert_allclose(pooled, 0.25 * intensity_histogram(a) + 0.75 * intensity_histogram(b))


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((2, 1, 8, 8), dtype=np.float32), "no pixel of the 2 images is above the threshold 0.15"),
        (np.zeros((8, 8), dtype=np.float32), r"must have shape \(N, 1, H, W\) with N >= 1. Got shape \(8, 8\)"),
        (np.full((1, 1, 2, 2), np.nan), "must be finite"),
        ([[0.5]], "must be a numeric numpy array of shape"),
    ],
)
def test_histogram_rejects_bad_images(images: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        intensity_histogram(images)  # type: ignore[arg-type]


# ---------------------------------------------------------------- histogram_distance


def test_distance_between_point_masses_is_the_distance_between_bin_centres() -> None:
    centres = bin_centres()

    assert histogram_distance(_one_bin(3), _one_bin(20)) == pytest.approx(centres[20] - centres[3])
    assert histogram_distance(_one_bin(3), _one_bin(20)) == pytest.approx(17 * 1.5 / HISTOGRAM_BINS)


def test_distance_normalises_counts() -> None:
    assert histogram_distance(5 * _one_bin(1), _one_bin(2)) == pytest.approx(1.5 / HISTOGRAM_BINS)


@settings(max_examples=60, deadline=None)
@given(a=histograms, b=histograms, c=histograms)
def test_distance_is_a_metric(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
    ab, ba = histogram_distance(a, b), histogram_distance(b, a)

    assert histogram_distance(a, a) == pytest.approx(0.0, abs=1e-12)
    assert ab >= 0.0
    assert ab == pytest.approx(ba, abs=1e-12)
    assert ab <= histogram_distance(a, c) + histogram_distance(c, b) + 1e-12


def test_distance_grows_with_scanner_severity(ideal_images: np.ndarray) -> None:
    # Prepare: the same patients through each hospital's scanner at rising severity.
    reference = intensity_histogram(ideal_images)
    for hospital in range(4):  # four hospitals = the four scanner archetypes
        distances = []
        for severity in (0.0, 0.5, 1.0, 2.0):
            profile = make_scanner_profile(0, hospital, severity)
            rng = make_rng(0, hospital, "test-shift")
            shifted = np.stack([apply_scanner(image[0], profile, rng)[None] for image in ideal_images])
            # Execute
            distances.append(histogram_distance(reference, intensity_histogram(shifted)))
        # Assert
        assert distances[0] == 0.0
        assert np.all(np.diff(distances) > 0), (hospital, distances)


@pytest.mark.parametrize(
    ("a", "message"),
    [
        (np.ones(HISTOGRAM_BINS - 1), rf"The 'a' parameter of histogram_distance must be a histogram of shape \({HISTOGRAM_BINS},\)"),
        (-_one_bin(0), "must be finite, non-negative and not all zero"),
        (np.zeros(HISTOGRAM_BINS), "must be finite, non-negative and not all zero"),
        ("histogram", "must be a histogram of shape"),
    ],
)
def test_distance_rejects_bad_histograms(a: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        histogram_distance(a, _one_bin(0))  # type: ignore[arg-type]


# ---------------------------------------------------------------- mean_histogram


def test_mean_histogram_weights() -> None:
    a, b = _one_bin(0), 3 * _one_bin(1)  # b is normalised first

    np.testing.assert_allclose(mean_histogram([a, b]), 0.5 * _one_bin(0) + 0.5 * _one_bin(1))
    np.testing.assert_allclose(mean_histogram([a, b], weights=[3, 1]), 0.75 * _one_bin(0) + 0.25 * _one_bin(1))
    np.testing.assert_allclose(mean_histogram(np.stack([a, b]), weights=[0, 2]), _one_bin(1))


@given(hs=st.lists(histograms, min_size=1, max_size=4))
@settings(max_examples=30, deadline=None)
def test_mean_histogram_is_normalised(hs: list[np.ndarray]) -> None:
    mean = mean_histogram(hs)

    assert mean.sum() == pytest.approx(1.0)
    assert np.all(mean >= 0)


@pytest.mark.parametrize(
    ("histograms_", "weights", "message"),
    [
        ([], None, "The 'histograms' parameter of mean_histogram must be a non-empty sequence"),
        ([_one_bin(0)], [1.0, 2.0], r"The 'weights' parameter of mean_histogram must be 1 finite non-negative"),
        ([_one_bin(0), _one_bin(1)], [0.0, 0.0], "must be 2 finite non-negative numbers, not all zero"),
        ([_one_bin(0), _one_bin(1)], [1.0, -1.0], r"Got \[1.0, -1.0\] instead"),
        ([_one_bin(0), np.ones(3)], None, r"The 'histograms\[1\]' parameter of mean_histogram"),
    ],
)
def test_mean_histogram_rejects_bad_input(histograms_: list[np.ndarray], weights: list[float] | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mean_histogram(histograms_, weights)
