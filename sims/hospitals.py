"""Hospitals and their patients: the federated data set, generated on demand.

A :class:`WorldSpec` fixes everything about the simulated world; a federation of
``K`` hospitals is ``make_federation(world, K)``, one :class:`HospitalSpec` each
(cohort size, lesion prevalence and size, scanner). A patient is a 2D axial slice of
the ICBM152 template (:mod:`sims.anatomy`), seen through a random pose and a small
elastic deformation, with a patient-specific tissue contrast, synthetic lesions
with the hospital's prevalence, and the hospital's scanner (:mod:`sims.scanners`).

Every random draw comes from ``make_rng(world.seed, hospital, patient, purpose)``,
so a patient is the same whoever generates it, in whatever order. Data are cached
per hospital as one ``.npz``; the cache file name hashes everything that shapes the
data, so a changed world never reads stale data. Labels are ``uint8`` (classes < 5) on
disk and in memory; MONAI's one-hot (Dice metric, DiceCE loss) widens them per batch.

The server's evaluation set (:func:`load_public_eval`) is *public*: template slices
through the public scanner profiles of :func:`make_public_cohort`, no hospital's patient,
spec or scanner in it, and the same size whatever the number of hospitals.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from sims.anatomy import BACKGROUND, GREY_MATTER, LESION, WHITE_MATTER, load_anatomy
from sims.scanners import IDENTITY_SCANNER, ScannerProfile, apply_scanner, make_scanner_profile
from sims.seeding import make_rng
from sims.world import MIN_PATIENTS, WorldSpec, _invalid, _is_int, _is_real  # noqa: F401 (re-exported)

__all__ = [
    "FORMAT_VERSION",
    "HOLDOUT_OFFSET",
    "SPLITS",
    "HospitalSpec",
    "WorldSpec",
    "cache_key",
    "load_holdout_pool",
    "load_hospital",
    "load_public_eval",
    "make_federation",
    "make_patient",
    "make_public_cohort",
    "public_eval_patients",
    "split_indices",
    "split_sizes",
]

SPLITS: tuple[str, ...] = ("train", "val", "test", "holdout")
"""Data splits of a hospital; ``holdout`` patients stay at the hospital (see
:func:`load_holdout_pool`); the server evaluates on :func:`load_public_eval`."""

LABEL_DTYPE = np.uint8
"""Labels are class ids < 5: one byte each, 8x less memory than int64."""

FORMAT_VERSION = 1
"""Bump whenever generation changes, so that caches written before are not reused."""

HOLDOUT_OFFSET = 1_000_000
"""Patient index of a hospital's first holdout patient (or ``num_patients`` if larger).

A fixed offset keeps the holdout pool identical when only cohort sizes change
(e.g. across ``quantity_skew`` settings), and it never overlaps the cohort."""

# Axial slices (MNI voxel z) where the cerebrum is large: from the temporal lobes
# and basal ganglia to the centrum semiovale.
_SLICE_RANGE = (55, 125)
_CROP_MARGIN = 0.10  # fraction of the brain's bounding box added on every side
_MAX_ROTATION_DEG = 10.0
_SCALE_RANGE = (0.92, 1.08)
_MAX_SHIFT = 0.04  # fraction of the image size
_ELASTIC_GRID = 5  # control points per axis of the smooth displacement field
_ELASTIC_STD = 1.5  # displacement std in pixels at 96 px, scaled with image_size
_CONTRAST_KNOTS = (0.40, 0.66, 0.85)  # median T1 of CSF, grey and white matter
_CONTRAST_JITTER = 0.04
_LESION_RADIUS_96 = ((4.0, 5.0), (2.5, 4.0))  # (low range, width range) in px at 96 px
_HYPER_FACTOR = (1.2, 1.35)  # lesion intensity / white-matter median
_HYPO_FACTOR = (0.55, 0.62)
_PREVALENCE_SPREAD = 0.45
_QUANTITY_SIGMA = 1.5  # log-normal sigma of cohort shares at quantity_skew = 1
_OUTPUT_PERCENTILE = 99.5


@dataclass(frozen=True)
class HospitalSpec:
    """One hospital of the federation; made by :func:`make_federation`.

    Attributes
    ----------
    hospital_id : int
        Index of the hospital, ``>= 0``; keys its random streams.
    num_patients : int
        Cohort size (train + val + test), ``>= 1``.
    lesion_prevalence : float
        Probability in ``[0, 1]`` that a patient has lesions (0 when the world has none).
    lesion_radius : tuple of float
        ``(low, high)`` range of lesion semi-axes in pixels, ``0 < low <= high``.
    scanner : ScannerProfile
        The hospital's scanner.
    """

    hospital_id: int
    num_patients: int
    lesion_prevalence: float
    lesion_radius: tuple[float, float]
    scanner: ScannerProfile

    def __post_init__(self) -> None:
        owner = "HospitalSpec"
        if not _is_int(self.hospital_id) or self.hospital_id < 0:
            raise _invalid(owner, "hospital_id", "an int in [0, inf)", self.hospital_id)
        if not _is_int(self.num_patients) or self.num_patients < 1:
            raise _invalid(owner, "num_patients", "an int in [1, inf)", self.num_patients)
        if not _is_real(self.lesion_prevalence) or not 0.0 <= self.lesion_prevalence <= 1.0:
            raise _invalid(owner, "lesion_prevalence", "a float in [0, 1]", self.lesion_prevalence)
        radius = self.lesion_radius
        if not (
            isinstance(radius, tuple)
            and len(radius) == 2
            and all(_is_real(r) for r in radius)
            and 0.0 < radius[0] <= radius[1]
        ):
            raise _invalid(owner, "lesion_radius", "a tuple (low, high) with 0 < low <= high", radius)
        if not isinstance(self.scanner, ScannerProfile):
            raise _invalid(owner, "scanner", "a ScannerProfile", self.scanner)


# --------------------------------------------------------------------------- federation


def _cohort_sizes(world: WorldSpec, num_hospitals: int) -> list[int]:
    """Split ``patients_per_hospital * num_hospitals`` patients by log-normal shares.

    Each hospital's share weight depends only on ``(seed, hospital)``, so the
    ranking of hospitals does not change with ``num_hospitals``. Largest-remainder
    rounding keeps the total exact; at ``quantity_skew = 0`` every cohort is equal.
    """
    sigma = _QUANTITY_SIGMA * world.quantity_skew
    if sigma == 0.0:
        return [world.patients_per_hospital] * num_hospitals
    log_weights = np.array(
        [sigma * make_rng(world.seed, h, "quantity").standard_normal() for h in range(num_hospitals)]
    )
    weights = np.exp(log_weights - log_weights.max())
    spare = (world.patients_per_hospital - MIN_PATIENTS) * num_hospitals
    exact = spare * weights / weights.sum()
    sizes = np.floor(exact).astype(int)
    remainder = spare - int(sizes.sum())
    sizes[np.argsort(-(exact - sizes), kind="stable")[:remainder]] += 1
    return [MIN_PATIENTS + int(s) for s in sizes]


def make_federation(world: WorldSpec, num_hospitals: int) -> tuple[HospitalSpec, ...]:
    """Describe every hospital of a federation; no image is generated. Cached.

    Every message a hospital answers rebuilds its config and looks up its own spec here;
    the result is computed once per process and ``(world, num_hospitals)`` (``WorldSpec`` is
    frozen and hashable), so that lookup costs O(1), not O(K), after the first.

    Parameters
    ----------
    world : WorldSpec
        The simulated world.
    num_hospitals : int
        Number of hospitals, ``>= 1``.

    Returns
    -------
    tuple of HospitalSpec
        One per hospital, ``hospital_id`` 0..num_hospitals-1. Cohort sizes sum to
        ``world.patients_per_hospital * num_hospitals``. Prevalence, lesion size and
        scanner of hospital ``h`` depend only on ``(world, h)``.

    Raises
    ------
    ValueError
        If ``num_hospitals`` is not an int ``>= 1``.
    """
    if not _is_int(num_hospitals) or num_hospitals < 1:
        raise _invalid("make_federation", "num_hospitals", "an int in [1, inf)", num_hospitals)
    return _federation(world, int(num_hospitals))


@functools.lru_cache(maxsize=16)
def _federation(world: WorldSpec, num_hospitals: int) -> tuple[HospitalSpec, ...]:
    sizes = _cohort_sizes(world, num_hospitals)
    scale = world.image_size / 96.0
    specs = []
    for hospital, size in enumerate(sizes):
        rng = make_rng(world.seed, hospital, "label")
        u = rng.uniform(-_PREVALENCE_SPREAD, _PREVALENCE_SPREAD)
        prevalence = float(np.clip(0.5 + world.label_skew * u, 0.05, 0.95)) if world.lesions else 0.0
        (low_lo, low_hi), (width_lo, width_hi) = _LESION_RADIUS_96
        low = max(2.0, rng.uniform(low_lo, low_hi) * scale)
        high = low + rng.uniform(width_lo, width_hi) * scale
        specs.append(
            HospitalSpec(
                hospital_id=hospital,
                num_patients=size,
                lesion_prevalence=prevalence,
                lesion_radius=(float(low), float(high)),
                scanner=make_scanner_profile(world.seed, hospital, world.scanner_severity),
            )
        )
    return tuple(specs)


def split_sizes(world: WorldSpec, spec: HospitalSpec) -> dict[str, int]:
    """Number of patients in each split of a hospital.

    Returns
    -------
    dict of str to int
        Keys :data:`SPLITS`. ``val`` and ``test`` are ``max(1, round(n * fraction))``,
        ``train`` the rest of the ``n = spec.num_patients`` cohort, ``holdout`` is
        ``world.holdout_per_hospital``.
    """
    n = spec.num_patients
    n_val = max(1, round(n * world.val_fraction))
    n_test = max(1, round(n * world.test_fraction))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(
            f"Hospital {spec.hospital_id} has {n} patients, too few for val_fraction="
            f"{world.val_fraction} and test_fraction={world.test_fraction}."
        )
    return {"train": n_train, "val": n_val, "test": n_test, "holdout": world.holdout_per_hospital}


def split_indices(world: WorldSpec, spec: HospitalSpec) -> dict[str, np.ndarray]:
    """Patient indices of each split of a hospital.

    The cohort ``0..n-1`` is shuffled with ``make_rng(seed, hospital, "split")`` and cut
    into train / val / test (each sorted); holdout patients are ``s..s+holdout-1`` with
    ``s = max(n, HOLDOUT_OFFSET)``, so they never overlap the cohort and do not
    depend on its size.

    Returns
    -------
    dict of str to numpy.ndarray
        Keys :data:`SPLITS`, int64 index arrays.
    """
    sizes = split_sizes(world, spec)
    order = make_rng(world.seed, spec.hospital_id, "split").permutation(spec.num_patients)
    bounds = np.cumsum([0, sizes["train"], sizes["val"], sizes["test"]])
    out = {name: np.sort(order[bounds[i] : bounds[i + 1]]) for i, name in enumerate(SPLITS[:3])}
    start = max(spec.num_patients, HOLDOUT_OFFSET)
    out["holdout"] = np.arange(start, start + sizes["holdout"])
    return {name: out[name].astype(np.int64) for name in SPLITS}


# --------------------------------------------------------------------------- one patient


def _brain_box(labels: np.ndarray) -> tuple[float, float, float]:
    """Centre ``(cx, cy)`` and square side of the brain's bounding box, with margin."""
    xs = np.flatnonzero(labels.any(axis=1))
    ys = np.flatnonzero(labels.any(axis=0))
    cx, cy = (xs[0] + xs[-1]) / 2.0, (ys[0] + ys[-1]) / 2.0
    side = max(xs[-1] - xs[0], ys[-1] - ys[0]) + 1.0
    return cx, cy, side * (1.0 + 2.0 * _CROP_MARGIN)


@functools.lru_cache(maxsize=8)
def _spline_basis(size: int) -> np.ndarray:
    """``(size, G)`` matrix ``B`` with ``zoom(C, size / G, order=3) == B @ C @ B.T``.

    Cubic-spline zoom is linear and separable, so zooming each unit vector once
    turns every later zoom of a ``G x G`` grid into two tiny matrix products.
    """
    eye = np.eye(_ELASTIC_GRID)
    basis = np.stack([ndimage.zoom(e, size / _ELASTIC_GRID, order=3, mode="nearest") for e in eye], axis=1)
    basis.setflags(write=False)
    return basis


def _sampling_grid(
    size: int, box: tuple[float, float, float], geometry: np.random.Generator, elastic: np.random.Generator
) -> np.ndarray:
    """Slice coordinates ``(2, size, size)`` for every output pixel.

    Output row ``i`` runs anterior -> posterior and column ``j`` from the patient's
    left to right (neurological convention). The geometry is crop -> random
    similarity transform -> smooth elastic warp.
    """
    cx, cy, side = box
    angle = np.deg2rad(geometry.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
    scale = geometry.uniform(*_SCALE_RANGE)
    shift = geometry.uniform(-_MAX_SHIFT, _MAX_SHIFT, size=2) * size

    centre = (size - 1) / 2.0
    rows, cols = np.meshgrid(np.arange(size) - centre, np.arange(size) - centre, indexing="ij")
    # Smooth displacement: cubic-spline interpolation of a coarse grid of Gaussian offsets.
    std = _ELASTIC_STD * size / 96.0
    coarse = elastic.normal(0.0, std, size=(2, _ELASTIC_GRID, _ELASTIC_GRID))
    basis = _spline_basis(size)
    rows = rows + basis @ coarse[0] @ basis.T
    cols = cols + basis @ coarse[1] @ basis.T
    # Inverse similarity: output pixel -> template pixel in the output frame.
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    src_rows = cos * rows - sin * cols + shift[0]
    src_cols = sin * rows + cos * cols + shift[1]
    pixel = side / size  # template voxels per output pixel
    x = cx + src_cols * pixel
    y = cy - src_rows * pixel
    return np.stack([x, y])


def _jitter_contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Monotone piecewise-linear remap moving each tissue's median intensity a little."""
    knots = np.array([0.0, *_CONTRAST_KNOTS, 1.0])
    offsets = rng.uniform(-_CONTRAST_JITTER, _CONTRAST_JITTER, size=len(_CONTRAST_KNOTS))
    values = knots + np.array([0.0, *offsets, offsets[-1]])
    return np.interp(image, knots, values).astype(np.float32)


def _add_lesions(
    image: np.ndarray, labels: np.ndarray, radius: tuple[float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Paint 1-3 ellipsoidal lesions centred in white matter (label 4)."""
    white = labels == WHITE_MATTER
    centres = np.argwhere(ndimage.binary_erosion(white, iterations=2))
    if len(centres) == 0:
        centres = np.argwhere(white)
    if len(centres) == 0:
        return image, labels
    reference = float(np.median(image[white]))
    tissue = (labels == GREY_MATTER) | white
    image, labels = image.copy(), labels.copy()
    rows, cols = np.indices(labels.shape, dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        r0, c0 = centres[rng.integers(len(centres))]
        a, b = rng.uniform(*radius, size=2)
        theta = rng.uniform(0.0, np.pi)
        factor = rng.uniform(*(_HYPER_FACTOR if rng.random() < 0.5 else _HYPO_FACTOR))
        du, dv = rows - r0, cols - c0
        u = (np.cos(theta) * du + np.sin(theta) * dv) / a
        v = (-np.sin(theta) * du + np.cos(theta) * dv) / b
        distance = np.sqrt(u * u + v * v)  # 1 on the ellipse's boundary
        inside = (distance <= 1.0) & tissue
        # Soft rim (about one pixel) so that lesion edges look like partial volume.
        weight = np.clip((1.0 - distance) * min(a, b) + 0.5, 0.0, 1.0) * tissue
        image = image * (1.0 - weight) + np.float32(reference * factor) * weight
        labels[inside] = LESION
    return image.astype(np.float32), labels


def make_patient(world: WorldSpec, spec: HospitalSpec, patient: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate one patient of one hospital.

    Parameters
    ----------
    world : WorldSpec
        The simulated world.
    spec : HospitalSpec
        The patient's hospital.
    patient : int
        Patient index, ``>= 0``; cohort patients are ``0..spec.num_patients-1``,
        holdout patients start at ``max(spec.num_patients, HOLDOUT_OFFSET)``.

    Returns
    -------
    image : numpy.ndarray
        ``(1, H, W)`` float32 in ``[0, 1]`` (divided by its 99.5th percentile, clipped),
        ``H = W = world.image_size``.
    label : numpy.ndarray
        ``(1, H, W)`` uint8 in ``{0..3}``, or ``{0..4}`` when ``world.lesions``.

    Notes
    -----
    Draws come from ``make_rng(world.seed, spec.hospital_id, patient, purpose)`` with
    purposes ``"slice"``, ``"geometry"``, ``"elastic"``, ``"contrast"``, ``"lesion"``
    and ``"scanner"``.
    """
    if not _is_int(patient) or patient < 0:
        raise _invalid("make_patient", "patient", "an int in [0, inf)", patient)
    anatomy = load_anatomy()

    def rng(purpose: str) -> np.random.Generator:
        return make_rng(world.seed, spec.hospital_id, int(patient), purpose)

    z = int(rng("slice").integers(_SLICE_RANGE[0], _SLICE_RANGE[1] + 1))
    t1 = np.ascontiguousarray(anatomy.t1[:, :, z])
    tissue = np.ascontiguousarray(anatomy.labels[:, :, z])
    box = _brain_box(tissue)
    size = world.image_size
    grid = _sampling_grid(size, box, rng("geometry"), rng("elastic"))
    # Low-pass before sampling the template at a coarser pitch (anti-aliasing).
    pitch = box[2] / size
    smooth = ndimage.gaussian_filter(t1, sigma=(pitch - 1.0) / 2.0) if pitch > 1.0 else t1
    image = ndimage.map_coordinates(smooth, grid, order=1, mode="constant", cval=0.0)
    labels = ndimage.map_coordinates(tissue, grid, order=0, mode="constant", cval=BACKGROUND)
    image = _jitter_contrast(image.astype(np.float32), rng("contrast"))

    lesion_rng = rng("lesion")
    if world.lesions and lesion_rng.random() < spec.lesion_prevalence:
        image, labels = _add_lesions(image, labels, spec.lesion_radius, lesion_rng)

    peak = float(image.max())
    image = image / np.float32(peak) if peak > 0.0 else image
    image = apply_scanner(image, spec.scanner, rng("scanner"))
    top = float(np.percentile(image, _OUTPUT_PERCENTILE))
    image = np.clip(image / np.float32(top), 0.0, 1.0) if top > 0.0 else image
    return image[None].astype(np.float32), labels[None].astype(LABEL_DTYPE)


# --------------------------------------------------------------------------- data sets


def cache_key(world: WorldSpec, spec: HospitalSpec) -> str:
    """Hash of everything that shapes a hospital's data (``augment`` excluded).

    Returns
    -------
    str
        24 hex characters of a SHA-256 over the format version, the world and the spec.
    """
    # augment is used by training; server_eval_patients sizes the public set, no hospital's data.
    unused = ("augment", "server_eval_patients")
    world_fields = {f.name: getattr(world, f.name) for f in dataclasses.fields(world) if f.name not in unused}
    hospital_fields = {
        "hospital_id": spec.hospital_id,
        "num_patients": spec.num_patients,
        "lesion_prevalence": spec.lesion_prevalence,
        "lesion_radius": list(spec.lesion_radius),
        "scanner": spec.scanner.to_dict(),
    }
    payload = {"format": FORMAT_VERSION, "world": world_fields, "hospital": hospital_fields}
    text = json.dumps(payload, sort_keys=True, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def _generate_hospital(
    world: WorldSpec, spec: HospitalSpec, splits: tuple[str, ...] = SPLITS
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    size = world.image_size
    data = {}
    for name, indices in split_indices(world, spec).items():
        if name not in splits:
            continue
        images = np.empty((len(indices), 1, size, size), dtype=np.float32)
        labels = np.empty((len(indices), 1, size, size), dtype=LABEL_DTYPE)
        for row, patient in enumerate(indices):
            images[row], labels[row] = make_patient(world, spec, int(patient))
        data[name] = (images, labels)
    return data


def _read_cache(
    path: Path, splits: tuple[str, ...] = SPLITS
) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {
                name: (archive[f"{name}_images"], archive[f"{name}_labels"].astype(LABEL_DTYPE, copy=False))
                for name in splits
            }
    except FileNotFoundError:
        return None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
        return None  # a truncated or foreign file: regenerate and overwrite it


def _write_cache(path: Path, data: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    arrays: dict[str, Any] = {}  # Any: np.savez's **kwds type clashes with its allow_pickle flag
    for name, (images, labels) in data.items():
        arrays[f"{name}_images"] = images
        arrays[f"{name}_labels"] = labels.astype(LABEL_DTYPE, copy=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target then rename: readers (other clients, other processes)
    # see either no file or a complete one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_hospital(
    world: WorldSpec, spec: HospitalSpec, cache_dir: str | Path | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All splits of one hospital, generated on first use and cached.

    Parameters
    ----------
    world : WorldSpec
        The simulated world.
    spec : HospitalSpec
        The hospital.
    cache_dir : str or Path or None
        Folder of the cache (created if missing); the file is
        ``hospital-<id>-<cache_key>.npz``, written atomically. ``None`` disables
        caching.

    Returns
    -------
    dict of str to (numpy.ndarray, numpy.ndarray)
        For each of :data:`SPLITS`: images ``(N, 1, H, W)`` float32 in ``[0, 1]`` and
        labels ``(N, 1, H, W)`` uint8. Identical with and without the cache.
    """
    if cache_dir is None:
        return _generate_hospital(world, spec)
    path = Path(cache_dir) / f"hospital-{spec.hospital_id:03d}-{cache_key(world, spec)}.npz"
    cached = _read_cache(path)
    if cached is not None:
        return cached
    data = _generate_hospital(world, spec)
    _write_cache(path, data)
    return data


def load_holdout_pool(
    world: WorldSpec, specs: tuple[HospitalSpec, ...] | list[HospitalSpec], cache_dir: str | Path | None
) -> tuple[np.ndarray, np.ndarray]:
    """The holdout patients of every hospital, concatenated in hospital order.

    For in-process comparisons that hold every hospital's data anyway (the plain-loop
    benchmark). A run's server does not use it: it would hold ``K * holdout_per_hospital``
    patients of the hospitals themselves; it evaluates on :func:`load_public_eval`.

    Parameters
    ----------
    world : WorldSpec
        The simulated world.
    specs : sequence of HospitalSpec
        The federation (see :func:`make_federation`).
    cache_dir : str or Path or None
        As in :func:`load_hospital`; a miss generates (and caches) the whole hospital.

    Returns
    -------
    images : numpy.ndarray
        ``(len(specs) * holdout_per_hospital, 1, H, W)`` float32.
    labels : numpy.ndarray
        Same shape, uint8.
    """
    size = world.image_size
    parts = [_holdout(world, spec, cache_dir) for spec in specs]
    if not parts:
        return np.empty((0, 1, size, size), np.float32), np.empty((0, 1, size, size), LABEL_DTYPE)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _holdout(world: WorldSpec, spec: HospitalSpec, cache_dir: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    """One hospital's holdout patients, without generating its whole cohort.

    The server needs only these; generating them alone keeps it from racing the
    hospitals to build their (much larger) cohorts at start-up.
    """
    if cache_dir is None:
        return _generate_hospital(world, spec, ("holdout",))["holdout"]
    key = cache_key(world, spec)
    whole = _read_cache(Path(cache_dir) / f"hospital-{spec.hospital_id:03d}-{key}.npz", ("holdout",))
    if whole is not None:
        return whole["holdout"]
    path = Path(cache_dir) / f"holdout-{spec.hospital_id:03d}-{key}.npz"
    cached = _read_cache(path, ("holdout",))
    if cached is not None:
        return cached["holdout"]
    data = _generate_hospital(world, spec, ("holdout",))
    _write_cache(path, data)
    return data["holdout"]


PUBLIC_HOSPITAL_ID = 900_000
"""Ids of the public cohorts start here: template slices, no hospital's patient in them."""


def make_public_cohort(world: WorldSpec, num_patients: int = 200, index: int = 0) -> HospitalSpec:
    """A *public* data set: template slices through a simulated, non-hospital scanner.

    ``index`` 0 is a perfect scanner (un-shifted slices); ``index`` k > 0 gets the scanner
    profile of a would-be hospital ``PUBLIC_HOSPITAL_ID + k`` (same physics, different
    draws from every real hospital's). The ICBM152 template is public, and the geometry,
    lesion and scanner generators are the simulator's, not any hospital's, so training on
    these cohorts costs no patient privacy. Lesions appear at prevalence 0.5 with the
    middle of the hospitals' sizes.
    """
    scale = world.image_size / 96
    (low_lo, low_hi), (width_lo, width_hi) = _LESION_RADIUS_96
    low = scale * (low_lo + low_hi) / 2
    hospital_id = PUBLIC_HOSPITAL_ID + index
    scanner = (
        IDENTITY_SCANNER if index == 0 else make_scanner_profile(world.seed, hospital_id, world.scanner_severity)
    )
    return HospitalSpec(
        hospital_id=hospital_id,
        num_patients=num_patients,
        lesion_prevalence=0.5 if world.lesions else 0.0,
        lesion_radius=(low, low + scale * (width_lo + width_hi) / 2),
        scanner=scanner,
    )


PUBLIC_SCANNERS = 5
"""Public cohorts (:func:`make_public_cohort` indices ``0..4``): a perfect scanner and one
simulated non-hospital scanner of each of the four archetypes; pre-training trains on their
cohorts (``server/pretraining.py``), the server's evaluation set draws from their scanners."""

PUBLIC_EVAL_OFFSET = 1_000_000_000
"""Patient index of the first public evaluation patient of each public cohort: beyond any
cohort (pre-training uses patients ``0..199``) or holdout index, so no evaluation patient is
ever a pre-training patient."""


def public_eval_patients(world: WorldSpec) -> list[tuple[HospitalSpec, int]]:
    """Who is in the server's evaluation set: ``(public cohort, patient index)`` pairs.

    Patient ``i`` comes from public cohort ``i % PUBLIC_SCANNERS``, patient index
    ``PUBLIC_EVAL_OFFSET + i // PUBLIC_SCANNERS``: the scanners cycle, a larger set extends a
    smaller one, and nothing depends on the hospitals or their number.
    """
    cohorts = [make_public_cohort(world, index=k) for k in range(PUBLIC_SCANNERS)]
    return [
        (cohorts[i % PUBLIC_SCANNERS], PUBLIC_EVAL_OFFSET + i // PUBLIC_SCANNERS)
        for i in range(world.server_eval_patients)
    ]


def load_public_eval(world: WorldSpec) -> tuple[np.ndarray, np.ndarray]:
    """The server's evaluation set: ``world.server_eval_patients`` public patients.

    Public by construction: every patient is generated from a public cohort's spec and
    scanner (:func:`make_public_cohort`; the ICBM152 template is public), never from a
    hospital's, at patient indices disjoint from pre-training's. Its size does not grow with
    the number of hospitals, so neither does the server's memory or its evaluation time.
    Generated in memory (about 5 ms a patient at 96 px), not cached.

    Returns
    -------
    images : numpy.ndarray
        ``(server_eval_patients, 1, H, W)`` float32 in ``[0, 1]``.
    labels : numpy.ndarray
        Same shape, uint8.
    """
    size = world.image_size
    n = world.server_eval_patients
    images = np.empty((n, 1, size, size), dtype=np.float32)
    labels = np.empty((n, 1, size, size), dtype=LABEL_DTYPE)
    for row, (cohort, patient) in enumerate(public_eval_patients(world)):
        images[row], labels[row] = make_patient(world, cohort, patient)
    return images, labels
