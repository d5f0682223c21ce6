"""The noisy annotator: eroded, dilated and missed structures."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from scenarios.label_noise import LABEL_NOISE_KINDS, corrupt_labels
from sims.anatomy import BACKGROUND, CSF, GREY_MATTER, LESION, WHITE_MATTER
from sims.hospitals import WorldSpec, make_federation, make_patient


@pytest.fixture(scope="module")
def patients() -> np.ndarray:
    """Twelve 64 px label maps, ``(12, 1, 64, 64)`` uint8, lesions in about half of them."""
    world = WorldSpec(image_size=64, patients_per_hospital=12, scanner_severity=0.0)
    spec = make_federation(world, 1)[0]
    spec = dataclasses.replace(spec, lesion_prevalence=0.5)
    return np.stack([make_patient(world, spec, p)[1] for p in range(12)])


def _rings(n: int = 1) -> np.ndarray:
    """``(n, 1, 24, 24)``: nested discs of CSF, grey and white matter with a lesion in the middle."""
    rows, cols = np.indices((24, 24))
    radius = np.hypot(rows - 11.5, cols - 11.5)
    label_map = np.select([radius < 2.5, radius < 6, radius < 8, radius < 10], [LESION, WHITE_MATTER, GREY_MATTER, CSF], BACKGROUND)
    return np.repeat(label_map[None, None].astype(np.uint8), n, axis=0)


def _changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    return np.array([not np.array_equal(a, b) for a, b in zip(before, after, strict=True)])


@pytest.mark.parametrize("kind", LABEL_NOISE_KINDS)
def test_rate_zero_returns_an_equal_copy(patients: np.ndarray, kind: str) -> None:
    out = corrupt_labels(patients, rate=0.0, kind=kind, rng=np.random.default_rng(0), lesion_class=LESION)

    assert out is not patients and out.dtype == np.uint8
    np.testing.assert_array_equal(out, patients)


@pytest.mark.parametrize("kind", LABEL_NOISE_KINDS)
@pytest.mark.parametrize("lesion_class", [LESION, None])
def test_rate_one_changes_every_patient_and_keeps_classes_valid(
    patients: np.ndarray, kind: str, lesion_class: int | None
) -> None:
    out = corrupt_labels(patients, rate=1.0, kind=kind, rng=np.random.default_rng(1), lesion_class=lesion_class)

    assert out.shape == patients.shape and out.dtype == np.uint8
    assert _changed(patients, out).all()
    for before, after in zip(patients, out, strict=True):
        assert set(np.unique(after)) <= set(np.unique(before)) | {WHITE_MATTER}


@pytest.mark.parametrize("kind", LABEL_NOISE_KINDS)
def test_corruption_is_deterministic_in_the_generator(patients: np.ndarray, kind: str) -> None:
    first = corrupt_labels(patients, rate=0.5, kind=kind, rng=np.random.default_rng(3), lesion_class=LESION)
    again = corrupt_labels(patients, rate=0.5, kind=kind, rng=np.random.default_rng(3), lesion_class=LESION)
    other = corrupt_labels(patients, rate=0.5, kind=kind, rng=np.random.default_rng(4), lesion_class=LESION)

    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_rate_is_the_fraction_of_patients_corrupted() -> None:
    labels = _rings(400)

    out = corrupt_labels(labels, rate=0.3, kind="dilate", rng=np.random.default_rng(0), lesion_class=LESION)

    # Binomial(400, 0.3): mean 120, standard deviation 9.2; +-4 sigma.
    assert 83 <= _changed(labels, out).sum() <= 157


def test_erode_shrinks_one_structure_and_gives_its_rim_to_its_neighbours(patients: np.ndarray) -> None:
    out = corrupt_labels(patients, rate=1.0, kind="erode", rng=np.random.default_rng(5), lesion_class=LESION)

    for before, after in zip(patients[:, 0], out[:, 0], strict=True):
        changed = before != after
        (structure,) = np.unique(before[changed])  # one structure lost pixels ...
        assert not np.any(after[changed] == structure)  # ... to other classes
        # At most 2 px deep inside the structure (the image edge counts as outside).
        depth = ndimage.distance_transform_cdt(np.pad(before == structure, 1), metric="taxicab")[1:-1, 1:-1]
        assert depth[changed].max() <= 2


def test_dilate_grows_one_structure_by_at_most_two_pixels(patients: np.ndarray) -> None:
    out = corrupt_labels(patients, rate=1.0, kind="dilate", rng=np.random.default_rng(6), lesion_class=LESION)

    for before, after in zip(patients[:, 0], out[:, 0], strict=True):
        changed = before != after
        (structure,) = np.unique(after[changed])  # one structure gained pixels ...
        assert structure != BACKGROUND
        distance = ndimage.distance_transform_cdt(before != structure, metric="taxicab")
        assert distance[changed].max() <= 2  # ... within 2 px of where it was


def test_miss_relabels_lesions_as_white_matter(patients: np.ndarray) -> None:
    with_lesions = patients[(patients == LESION).any(axis=(1, 2, 3))]
    assert len(with_lesions) >= 3

    out = corrupt_labels(with_lesions, rate=1.0, kind="miss", rng=np.random.default_rng(7), lesion_class=LESION)

    assert not np.any(out == LESION)
    np.testing.assert_array_equal(out[with_lesions == LESION], WHITE_MATTER)
    np.testing.assert_array_equal(out[with_lesions != LESION], with_lesions[with_lesions != LESION])


def test_miss_without_lesion_class_removes_one_connected_piece() -> None:
    labels = _rings(20)

    out = corrupt_labels(labels, rate=1.0, kind="miss", rng=np.random.default_rng(8), lesion_class=None)

    missed = set()
    for before, after in zip(labels[:, 0], out[:, 0], strict=True):
        changed = before != after
        (structure,) = np.unique(before[changed])
        missed.add(int(structure))
        # The whole piece is gone: in these maps every structure is one connected piece.
        assert not np.any(after == structure)
        assert ndimage.label(changed, structure=np.ones((3, 3)))[1] == 1
    assert missed == {CSF, GREY_MATTER, WHITE_MATTER, LESION}  # each class can be missed


def test_maps_with_one_class_are_left_as_they_are() -> None:
    labels = np.zeros((2, 1, 8, 8), dtype=np.uint8)
    labels[1] = WHITE_MATTER

    out = corrupt_labels(labels, rate=1.0, kind="mixed", rng=np.random.default_rng(0), lesion_class=None)

    np.testing.assert_array_equal(out, labels)


@pytest.mark.parametrize(
    ("labels", "kwargs", "message"),
    [
        (_rings(), {"rate": 1.5}, r"The 'rate' parameter of corrupt_labels must be a float in \[0, 1\]. Got 1.5 instead."),
        (_rings(), {"rate": True}, "The 'rate' parameter of corrupt_labels must be a float"),
        (_rings(), {"kind": "erosion"}, "The 'kind' parameter of corrupt_labels must be one of 'erode', 'dilate', "
                                        "'miss', 'mixed'. Got 'erosion' instead. Did you mean 'erode'?"),
        (_rings(), {"rng": 0}, "The 'rng' parameter of corrupt_labels must be a numpy.random.Generator. Got 0"),
        (_rings(), {"lesion_class": 0}, r"The 'lesion_class' parameter of corrupt_labels must be an int in \[1, 255\]"),
        (_rings()[:, 0], {}, r"must have shape \(N, 1, H, W\). Got shape \(1, 24, 24\) instead."),
        (_rings().astype(np.float32), {}, "must be an integer numpy array of shape .* Got an array of dtype float32"),
        (-_rings().astype(np.int64), {}, r"must hold class ids in \[0, 255\]. Got values in \[-4, 0\] instead."),
    ],
)
def test_bad_arguments_raise_one_clear_sentence(labels: np.ndarray, kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"rate": 0.5, "kind": "mixed", "rng": np.random.default_rng(0), "lesion_class": None}
    with pytest.raises(ValueError, match=message):
        corrupt_labels(labels, **{**arguments, **kwargs})  # type: ignore[arg-type]
