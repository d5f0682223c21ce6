"""The shared anatomy: the ICBM152 2009a T1 template and its tissue labels.

Every simulated patient is a slice of one brain, the symmetric ICBM152 2009a
nonlinear template (Fonov et al., NeuroImage 2011) bundled in nilearn's wheel, so
no download is needed. The T1 is skull-stripped (exactly zero outside the brain);
tissue labels come from the template's grey- and white-matter probability maps.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = ["CLASS_NAMES", "Anatomy", "class_names", "load_anatomy"]

CLASS_NAMES: tuple[str, ...] = ("background", "csf", "grey_matter", "white_matter", "lesion")
"""Segmentation classes; label ``k`` is ``CLASS_NAMES[k]``. Lesions (4) are synthetic."""

BACKGROUND, CSF, GREY_MATTER, WHITE_MATTER, LESION = range(5)


@dataclass(frozen=True)
class Anatomy:
    """A T1 volume and its tissue labels on the same 1 mm grid.

    Attributes
    ----------
    t1 : numpy.ndarray
        Shape ``(X, Y, Z)`` = ``(197, 233, 189)``, float32 in ``[0, 1]``; axes run
        left->right, posterior->anterior, inferior->superior (RAS, MNI space).
        Zero outside the brain.
    labels : numpy.ndarray
        Shape ``(X, Y, Z)``, uint8 in ``{0, 1, 2, 3}``: background, CSF, grey
        matter, white matter (see :data:`CLASS_NAMES`).
    """

    t1: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.t1.shape != self.labels.shape:
            raise ValueError(
                "The 't1' and 'labels' parameters of Anatomy must have the same shape. "
                f"Got {self.t1.shape} and {self.labels.shape} instead."
            )


def tissue_labels(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Hard tissue labels from a T1 and grey/white-matter probability maps.

    Inside the brain (``t1 > 0``) each voxel takes the most probable of CSF
    (``clip(1 - gm - wm, 0, 1)``), grey matter and white matter. Taking the argmax
    keeps thin sulcal CSF, which a thresholded CSF mask would drop.

    Parameters
    ----------
    t1 : numpy.ndarray
        Any shape, T1 intensity; zero marks background.
    gm, wm : numpy.ndarray
        Same shape as ``t1``, grey- and white-matter probabilities in ``[0, 1]``.

    Returns
    -------
    numpy.ndarray
        Same shape, uint8 in ``{0, 1, 2, 3}``.
    """
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    labels = (np.argmax(np.stack([csf, gm, wm]), axis=0) + CSF).astype(np.uint8)
    labels[t1 <= 0] = BACKGROUND
    return labels


@functools.lru_cache(maxsize=1)
def load_anatomy() -> Anatomy:
    """Load the bundled ICBM152 2009a template once per process (about 1 s).

    Returns
    -------
    Anatomy
        The T1 in ``[0, 1]`` and its labels; the arrays are read-only because the
        result is shared by every caller.
    """
    import nibabel as nib
    from nilearn import datasets

    def read(path: str) -> np.ndarray:
        # The files store uint8 in [0, 255]; reading as float32 avoids a float64 copy.
        image = nib.load(path)
        return np.asarray(image.dataobj, dtype=np.float32) / np.float32(255.0)  # type: ignore[attr-defined]

    t1 = read(datasets.MNI152_FILE_PATH)
    gm = read(datasets.GM_MNI152_FILE_PATH)
    wm = read(datasets.WM_MNI152_FILE_PATH)
    labels = tissue_labels(t1, gm, wm)
    t1.setflags(write=False)
    labels.setflags(write=False)
    return Anatomy(t1=t1, labels=labels)


def class_names(lesions: bool) -> tuple[str, ...]:
    """Names of the segmentation classes.

    Parameters
    ----------
    lesions : bool
        Whether the synthetic lesion class is part of the task.

    Returns
    -------
    tuple of str
        Five names with lesions, the first four without.
    """
    return CLASS_NAMES if lesions else CLASS_NAMES[:LESION]
