"""A noisy annotator: label maps with eroded, dilated or missed structures.

Real segmentation labels are drawn by people, and people draw boundaries too tight or too
loose and overlook small lesions. :func:`corrupt_labels` simulates that per patient, so a
scenario can ask how federated training copes when some hospitals' labels are wrong.

A *structure* is one non-background class of a patient's label map (all its pixels).
Pixels a structure gives up take the class of the nearest pixel of another class
(a Euclidean distance transform): where the annotator's line was too tight, what lies
beside the structure fills the gap, whether background, a neighbouring tissue or the
white matter around a lesion.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from common.validation import check_choice, check_float, check_int, parameter_error
from sims.anatomy import BACKGROUND, WHITE_MATTER

__all__ = ["LABEL_NOISE_KINDS", "corrupt_labels"]

LABEL_NOISE_KINDS: tuple[str, ...] = ("erode", "dilate", "miss", "mixed")
"""What a noisy annotator does to one structure of a corrupted patient:

* ``erode`` -- draws it 1-2 px too tight;
* ``dilate`` -- draws it 1-2 px too loose, over its neighbours (background included);
* ``miss`` -- overlooks it: lesions become white matter when there is a lesion class and
  the patient has lesions, otherwise one connected piece (8-connected, at least a tenth of
  the structure's largest piece) of a random structure is given to its surroundings;
* ``mixed`` -- one of the three, uniformly at random per patient."""

_SINGLE_KINDS = LABEL_NOISE_KINDS[:3]
_CROSS = ndimage.generate_binary_structure(2, 1)  # 4-neighbourhood: a 1-px step in each direction
_MIN_PIECE_SHARE = 0.1  # a missed piece is at least this share of its class's largest piece


def _fill_from_nearest_other(label_map: np.ndarray, cls: int, region: np.ndarray) -> None:
    """Give each pixel of ``region`` (all of class ``cls``) the class of its nearest pixel of another class."""
    _, (rows, cols) = ndimage.distance_transform_edt(label_map == cls, return_indices=True)
    label_map[region] = label_map[rows[region], cols[region]]


def _erode(label_map: np.ndarray, cls: int, rng: np.random.Generator) -> None:
    mask = label_map == cls
    iterations = int(rng.integers(1, 3))
    # border_value=0 treats the image edge as outside, so a structure touching it still shrinks.
    freed = mask & ~ndimage.binary_erosion(mask, structure=_CROSS, iterations=iterations, border_value=0)
    _fill_from_nearest_other(label_map, cls, freed)


def _dilate(label_map: np.ndarray, cls: int, rng: np.random.Generator) -> None:
    mask = label_map == cls
    iterations = int(rng.integers(1, 3))
    label_map[ndimage.binary_dilation(mask, structure=_CROSS, iterations=iterations)] = cls


def _miss(label_map: np.ndarray, cls: int, rng: np.random.Generator, lesion_class: int | None) -> None:
    if lesion_class is not None and np.any(label_map == lesion_class):
        label_map[label_map == lesion_class] = WHITE_MATTER
        return
    pieces, count = ndimage.label(label_map == cls, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(pieces.ravel(), minlength=count + 1)[1:]
    # Pick among the sizeable pieces: a missed one-pixel speck would hardly be a mistake.
    candidates = np.flatnonzero(sizes >= _MIN_PIECE_SHARE * sizes.max()) + 1
    piece = pieces == int(rng.choice(candidates))
    _fill_from_nearest_other(label_map, cls, piece)


def _check_labels(labels: object) -> np.ndarray:
    owner = "corrupt_labels"
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iu":
        kind = f"an array of dtype {labels.dtype}" if isinstance(labels, np.ndarray) else type(labels).__name__
        raise ValueError(
            f"The 'labels' parameter of {owner} must be an integer numpy array of shape (N, 1, H, W). "
            f"Got {kind} instead."
        )
    if labels.ndim != 4 or labels.shape[1] != 1:
        raise ValueError(
            f"The 'labels' parameter of {owner} must have shape (N, 1, H, W). Got shape {labels.shape} instead."
        )
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(
            f"The 'labels' parameter of {owner} must hold class ids in [0, 255]. "
            f"Got values in [{labels.min()}, {labels.max()}] instead."
        )
    return labels


def corrupt_labels(
    labels: np.ndarray,
    *,
    rate: float,
    kind: str,
    rng: np.random.Generator,
    lesion_class: int | None,
) -> np.ndarray:
    """Simulate a noisy annotator: corrupt each patient's label map with probability ``rate``.

    Parameters
    ----------
    labels : numpy.ndarray
        ``(N, 1, H, W)`` integer class ids, background 0 (see :func:`sims.anatomy.class_names`).
    rate : float
        In ``[0, 1]``: probability that a patient's map is corrupted, independently per patient.
    kind : str
        One of :data:`LABEL_NOISE_KINDS`.
    rng : numpy.random.Generator
        The only source of randomness: ``N`` uniform draws pick the corrupted patients, then
        each corrupted patient draws its structure (a class present other than background),
        the kind for ``mixed``, and the width (1 or 2 px) or the missed piece.
    lesion_class : int or None
        The lesion class id (``sims.anatomy.LESION``) when the task has lesions, else None:
        ``miss`` then relabels a patient's lesions as white matter.

    Returns
    -------
    numpy.ndarray
        ``(N, 1, H, W)`` uint8, a new array. Every selected patient with at least one
        foreground structure and at least two classes is changed (a map of one class is left
        as is). Classes
        stay valid: each output class is one of the patient's input classes, or white matter
        for a missed lesion. ``rate=0`` returns an equal copy.

    Raises
    ------
    ValueError
        If ``labels`` is not an ``(N, 1, H, W)`` integer array of ids in ``[0, 255]``, ``rate``
        is not in ``[0, 1]``, ``kind`` is unknown (with the nearest name), ``rng`` is not a
        numpy Generator or ``lesion_class`` is not None or an int in ``[1, 255]``.
    """
    owner = "corrupt_labels"
    _check_labels(labels)
    rate = check_float("rate", rate, owner=owner, low=0.0, high=1.0)
    kind = check_choice("kind", kind, LABEL_NOISE_KINDS, owner=owner)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(parameter_error("rng", "a numpy.random.Generator", rng, owner=owner))
    if lesion_class is not None:
        lesion_class = check_int("lesion_class", lesion_class, owner=owner, low=1, high=255)

    out = labels.astype(np.uint8, copy=True)
    selected = np.flatnonzero(rng.random(len(out)) < rate)
    for n in selected:
        label_map = out[n, 0]
        present = np.unique(label_map)
        structures = present[present != BACKGROUND]
        if structures.size == 0 or present.size == 1:
            continue  # nothing to corrupt, or one class everywhere: no boundary to misdraw
        cls = int(rng.choice(structures))
        action = _SINGLE_KINDS[int(rng.integers(len(_SINGLE_KINDS)))] if kind == "mixed" else kind
        if action == "erode":
            _erode(label_map, cls, rng)
        elif action == "dilate":
            _dilate(label_map, cls, rng)
        else:
            _miss(label_map, cls, rng, lesion_class)
    return out
