"""Privacy as data: one frozen event per hospital per round.

A :class:`DPEvent` records what one hospital's DP-SGD did in one federated round: the
noise multiplier, the Poisson sampling rate and the number of optimiser steps. Events
carry no epsilon; epsilon is always recomputed from the whole ledger of events by
:func:`privacy.accounting.epsilon` (after google/dp-accounting's ``DpEvent``).

The small validators at the bottom are shared by :mod:`privacy.accounting` and
:mod:`privacy.ledger` so that every bad value is refused with the same scikit-learn-style
sentence: "The 'delta' parameter of epsilon must be a float in (0, 1). Got 2 instead."
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.validation import InvalidParameterError, check_choice, check_float, check_int

__all__ = ["DPEvent", "InvalidParameterError", "check_choice", "check_events", "check_float", "check_int"]


PRIVACY_COLUMNS = (
    "round",
    "site",
    "participated",
    "steps",
    "sample_rate",
    "noise_multiplier",
    "epsilon_rdp",
    "epsilon_prv",
    "delta",
    "budget_exhausted",
)
"""The exact columns of a run's ``privacy.csv`` (written by the server, read by the report)."""

CLIENT_LEVEL = "client-level"
"""``site`` of the server's client-level (DP-FedAvg) rows in ``privacy.csv``."""

@dataclass(frozen=True)
class DPEvent:
    """One hospital's DP-SGD participation in one federated round.

    Validated on construction; immutable afterwards. Integral and real inputs are
    normalised to plain ``int`` and ``float`` so that events compare, hash and serialise
    the same whatever produced them (NumPy scalars, a Flower ``ConfigRecord``, JSON).

    Parameters
    ----------
    round : int
        Federated round, >= 0 (rounds start at 1; 0 is reserved for events before
        federated training, such as private pre-training).
    noise_multiplier : float
        Ratio sigma of the Gaussian noise standard deviation to the clipping norm, in
        [0, inf). 0 means no privacy: accounting gives ``math.inf`` for any ledger with
        such an event that took steps.
    sample_rate : float
        Poisson sampling rate q of a patient into a mini-batch, in (0, 1]
        (``batch_size / n_patients`` for Opacus' Poisson sampler).
    steps : int
        Optimiser steps taken with these settings, >= 0. 0 records a hospital that sat
        out or declined the round; it spends no privacy.

    Raises
    ------
    InvalidParameterError
        (a ``ValueError``) if a field has the wrong type or is out of range.

    Examples
    --------
    >>> DPEvent(round=3, noise_multiplier=1.1, sample_rate=0.02, steps=250)
    DPEvent(round=3, noise_multiplier=1.1, sample_rate=0.02, steps=250)
    """

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        owner = type(self).__name__
        # object.__setattr__ because the dataclass is frozen; this only normalises types.
        object.__setattr__(self, "round", check_int("round", self.round, owner=owner, low=0))
        object.__setattr__(
            self,
            "noise_multiplier",
            check_float("noise_multiplier", self.noise_multiplier, owner=owner, low=0.0),
        )
        object.__setattr__(
            self,
            "sample_rate",
            check_float("sample_rate", self.sample_rate, owner=owner, low=0.0, high=1.0, low_open=True),
        )
        object.__setattr__(self, "steps", check_int("steps", self.steps, owner=owner, low=0))

    def to_dict(self) -> dict[str, float | int]:
        """Return the event as a plain ``dict`` (``round``, ``noise_multiplier``,
        ``sample_rate``, ``steps``) of Python ``int`` and ``float`` values."""
        return {
            "round": self.round,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DPEvent:
        """Build an event from the output of :meth:`to_dict`.

        Parameters
        ----------
        d : Mapping
            Exactly the keys ``round``, ``noise_multiplier``, ``sample_rate`` and
            ``steps``.

        Raises
        ------
        InvalidParameterError
            If ``d`` is not a mapping, a key is missing or unknown, or a value is invalid.
        """
        if not isinstance(d, Mapping):
            raise InvalidParameterError(
                f"The 'd' parameter of DPEvent.from_dict must be a mapping. Got {type(d).__name__} instead."
            )
        missing = [name for name in _FIELDS if name not in d]
        unknown = sorted(str(key) for key in d if key not in _FIELDS)
        if missing or unknown:
            raise InvalidParameterError(
                f"The 'd' parameter of DPEvent.from_dict must have exactly the keys "
                f"{', '.join(_FIELDS)}. Missing {missing or 'none'}; unknown {unknown or 'none'}."
            )
        return cls(**{name: d[name] for name in _FIELDS})


_FIELDS = ("round", "noise_multiplier", "sample_rate", "steps")


# --- validators shared by the privacy package --------------------------------------------


def check_events(name: str, events: Any, *, owner: str) -> tuple[DPEvent, ...]:
    """Return ``events`` as a tuple if it is an iterable of :class:`DPEvent`, else raise."""
    if isinstance(events, (str, bytes, Mapping)) or not hasattr(events, "__iter__"):
        raise InvalidParameterError(
            f"The '{name}' parameter of {owner} must be an iterable of DPEvent. "
            f"Got {type(events).__name__} instead."
        )
    checked = tuple(events)
    for position, event in enumerate(checked):
        if not isinstance(event, DPEvent):
            raise InvalidParameterError(
                f"The '{name}' parameter of {owner} must be an iterable of DPEvent. "
                f"Got {type(event).__name__} at position {position} instead."
            )
    return checked
