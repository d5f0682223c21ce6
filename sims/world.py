"""The world a simulation runs in: :class:`WorldSpec`, validated, and light to import.

Kept apart from :mod:`sims.hospitals` (which needs torch, MONAI and the anatomy) so the
``fedscan`` CLI can validate a run config in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.validation import InvalidParameterError, parameter_error
from common.validation import is_int as _is_int
from common.validation import is_real as _is_real

MIN_PATIENTS = 10  # smallest cohort a hospital may have (train, val and test need patients)


def _invalid(owner: str, name: str, expected: str, value: object, hint: str = "") -> InvalidParameterError:
    return InvalidParameterError(parameter_error(name, expected, value, owner=owner, hint=hint))


@dataclass(frozen=True)
class WorldSpec:
    """Everything that shapes the simulated data, validated on construction.

    Attributes
    ----------
    seed : int, default 0
        Root seed; every random draw derives from it. In ``[0, inf)``.
    image_size : int, default 96
        Side of the square images in pixels; divisible by 8 (a U-Net with three
        down-samplings) and in ``[32, 256]``.
    patients_per_hospital : int, default 150
        Mean cohort size (train + val + test), ``>= 10``.
    quantity_skew : float, default 0.0
        In ``[0, 1]``. 0 gives every hospital ``patients_per_hospital`` patients;
        larger values redistribute the same total with log-normal shares
        (sigma ``1.5 * quantity_skew``), every hospital keeping >= 10 patients.
    scanner_severity : float, default 1.0
        In ``[0, 3]``; 0 = perfect scanners, 1 = moderate, 3 = severe.
    label_skew : float, default 0.5
        In ``[0, 1]``; spread of the lesion prevalence across hospitals:
        ``clip(0.5 + label_skew * u, 0.05, 0.95)``, ``u ~ U(-0.45, 0.45)``.
    lesions : bool, default True
        Whether patients can have synthetic lesions (label 4).
    val_fraction, test_fraction : float, default 0.15
        Fractions of a cohort used for validation and testing, each in ``(0, 1)``,
        together at most 0.8; train is the rest. Every split gets >= 1 patient.
    holdout_per_hospital : int, default 16
        Extra patients per hospital, disjoint from the cohort, generated with the
        hospital's data. A run's server never reads them (it evaluates on public
        patients, ``server_eval_patients``); ``load_holdout_pool`` pools them for
        in-process comparisons (the plain-loop benchmark). In ``[0, inf)``.
    server_eval_patients : int, default 64
        Size of the server's evaluation set: public patients (the template through the
        public scanner profiles that pre-training uses, patients disjoint from
        pre-training's), the same whatever the number of hospitals. In ``[1, 100000]``.
    augment : bool, default True
        Training-time augmentation switch; used by training, not by data generation
        (and not part of the cache key).

    Raises
    ------
    ValueError
        If a field has the wrong type or is out of range; the message names the
        field, what is allowed and the value given.
    """

    seed: int = 0
    image_size: int = 96
    patients_per_hospital: int = 150
    quantity_skew: float = 0.0
    scanner_severity: float = 1.0
    label_skew: float = 0.5
    lesions: bool = True
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    holdout_per_hospital: int = 16
    server_eval_patients: int = 64
    augment: bool = True

    def __post_init__(self) -> None:
        owner = "WorldSpec"
        if not _is_int(self.seed) or self.seed < 0:
            raise _invalid(owner, "seed", "an int in [0, inf)", self.seed)
        if not _is_int(self.image_size) or self.image_size % 8 or not 32 <= self.image_size <= 256:
            hint = ""
            if _is_int(self.image_size):
                nearest = sorted({min(256, max(32, 8 * (self.image_size // 8 + k))) for k in (0, 1)})
                hint = f" Try {' or '.join(map(str, nearest))}."
            raise _invalid(owner, "image_size", "an int divisible by 8 in [32, 256]", self.image_size, hint)
        if not _is_int(self.patients_per_hospital) or self.patients_per_hospital < MIN_PATIENTS:
            raise _invalid(
                owner, "patients_per_hospital", f"an int in [{MIN_PATIENTS}, inf)", self.patients_per_hospital
            )
        for name, high in (("quantity_skew", 1.0), ("scanner_severity", 3.0), ("label_skew", 1.0)):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 <= value <= high:
                raise _invalid(owner, name, f"a float in [0, {high:g}]", value)
        for name in ("lesions", "augment"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise _invalid(owner, name, "a bool", getattr(self, name))
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 < value < 1.0:
                raise _invalid(owner, name, "a float in (0, 1)", value)
        if self.val_fraction + self.test_fraction > 0.8:
            raise ValueError(
                "The 'val_fraction' and 'test_fraction' parameters of WorldSpec must sum to at "
                "most 0.8 so that the train split keeps patients. "
                f"Got {self.val_fraction!r} + {self.test_fraction!r} instead."
            )
        if not _is_int(self.holdout_per_hospital) or self.holdout_per_hospital < 0:
            raise _invalid(owner, "holdout_per_hospital", "an int in [0, inf)", self.holdout_per_hospital)
        if not _is_int(self.server_eval_patients) or not 1 <= self.server_eval_patients <= 100_000:
            raise _invalid(owner, "server_eval_patients", "an int in [1, 100000]", self.server_eval_patients)
