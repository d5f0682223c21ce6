from __future__ import annotations

import numpy as np
import pytest

from sims.anatomy import CLASS_NAMES, Anatomy, class_names, load_anatomy, tissue_labels


def test_load_anatomy_shapes_types_and_ranges() -> None:
    # Execute
    anatomy = load_anatomy()

    # Assert
    assert anatomy.t1.shape == anatomy.labels.shape == (197, 233, 189)
    assert anatomy.t1.dtype == np.float32
    assert anatomy.labels.dtype == np.uint8
    assert 0.0 == anatomy.t1.min() and anatomy.t1.max() == 1.0
    assert set(np.unique(anatomy.labels).tolist()) == {0, 1, 2, 3}


def test_load_anatomy_is_cached_and_read_only() -> None:
    # Execute
    first, second = load_anatomy(), load_anatomy()

    # Assert
    assert first is second
    with pytest.raises(ValueError, match="read-only"):
        first.t1[0, 0, 0] = 1.0


def test_background_is_exactly_outside_the_brain() -> None:
    # Prepare
    anatomy = load_anatomy()

    # Execute
    background = anatomy.labels == 0

    # Assert: the T1 is skull-stripped, zero outside the brain
    np.testing.assert_array_equal(background, anatomy.t1 == 0)


def test_central_slice_has_every_tissue_with_sulcal_csf() -> None:
    # Prepare
    labels = load_anatomy().labels[:, :, 90]

    # Execute
    counts = np.bincount(labels.ravel(), minlength=4)

    # Assert: about 1540 CSF voxels (ventricles and sulci), 9150 GM, 8950 WM
    assert counts[1] > 1000
    assert counts[2] > 8000
    assert counts[3] > 8000


def test_tissue_labels_keeps_partial_volume_csf() -> None:
    # Prepare: a voxel with gm = wm = 0.3 is mostly CSF (0.4); a 0.5 threshold drops it
    t1 = np.array([0.0, 0.5, 0.5, 0.5])
    gm = np.array([0.0, 0.3, 0.6, 0.1])
    wm = np.array([0.0, 0.3, 0.3, 0.8])

    # Execute
    labels = tissue_labels(t1, gm, wm)

    # Assert
    np.testing.assert_array_equal(labels, [0, 1, 2, 3])
    assert labels.dtype == np.uint8


def test_anatomy_rejects_mismatched_shapes() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"same shape. Got \(2, 2, 2\) and \(2, 2, 3\) instead"):
        Anatomy(t1=np.zeros((2, 2, 2), np.float32), labels=np.zeros((2, 2, 3), np.uint8))


def test_class_names_with_and_without_lesions() -> None:
    # Execute / Assert
    assert class_names(lesions=True) == CLASS_NAMES
    assert class_names(lesions=False) == ("background", "csf", "grey_matter", "white_matter")
