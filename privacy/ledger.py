"""The privacy ledger: stateful, append-only bookkeeping of one hospital's DP events.

The ledger stores events and nothing else; epsilon is recomputed from all of them by
:func:`privacy.accounting.epsilon` on every call (as Opacus' accountants store only their
history, and google/dp-accounting composes ``DpEvent`` objects). Keep one ledger per
hospital, report each hospital's epsilon and the worst case, and never average them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from privacy.events import DPEvent, InvalidParameterError, check_events

__all__ = ["PrivacyLedger"]

_COLUMNS = ("round", "noise_multiplier", "sample_rate", "steps")


class PrivacyLedger:
    """Append-only record of one hospital's :class:`~privacy.events.DPEvent` objects.

    Parameters
    ----------
    events : iterable of DPEvent, default ()
        Initial events, appended in order (so the same ordering rule applies).

    Raises
    ------
    InvalidParameterError
        (a ``ValueError``) if an element is not a :class:`DPEvent`.
    ValueError
        If the rounds of ``events`` decrease.

    Examples
    --------
    >>> ledger = PrivacyLedger()
    >>> ledger.append(DPEvent(round=1, noise_multiplier=1.0, sample_rate=0.01, steps=500))
    >>> ledger.append(DPEvent(round=2, noise_multiplier=1.0, sample_rate=0.01, steps=500))
    >>> round(ledger.epsilon(delta=1e-5), 4)
    2.1014
    """

    __hash__ = None  # type: ignore[assignment]  # mutable: equal ledgers may differ later

    def __init__(self, events: Iterable[DPEvent] = ()) -> None:
        self._events: list[DPEvent] = []
        for event in check_events("events", events, owner="PrivacyLedger"):
            self.append(event)

    @property
    def events(self) -> tuple[DPEvent, ...]:
        """All events, oldest first (a tuple: the ledger cannot be edited through it)."""
        return tuple(self._events)

    def append(self, event: DPEvent) -> None:
        """Record one event.

        Events with the same round as the last one are allowed (several events in one
        round); an earlier round is not, since the ledger is a history, not a set.

        Raises
        ------
        InvalidParameterError
            (a ``ValueError``) if ``event`` is not a :class:`DPEvent`.
        ValueError
            If ``event.round`` is before the last recorded round.
        """
        if not isinstance(event, DPEvent):
            raise InvalidParameterError(
                f"The 'event' parameter of PrivacyLedger.append must be a DPEvent. "
                f"Got {type(event).__name__} instead."
            )
        if self._events and event.round < self._events[-1].round:
            raise ValueError(
                f"The privacy ledger is append-only: cannot append an event for round "
                f"{event.round} after round {self._events[-1].round}. Rounds must not decrease."
            )
        self._events.append(event)

    def epsilon(self, *, delta: float, accountant: str = "rdp") -> float:
        """Epsilon of all events, recomputed from scratch; see :func:`privacy.accounting.epsilon`.

        Parameters
        ----------
        delta : float
            Target delta, in (0, 1).
        accountant : {"rdp", "prv"}, default "rdp"
            Composition method.
        """
        from privacy.accounting import epsilon as _epsilon  # Opacus loads lazily: 0.7 s

        return _epsilon(self._events, delta=delta, accountant=accountant)

    def steps(self) -> int:
        """Total DP-SGD steps recorded."""
        return sum(event.steps for event in self._events)

    def to_config(self) -> dict[str, list[int] | list[float]]:
        """The ledger as four equal-length columns, storable in a Flower ``ConfigRecord``.

        Returns
        -------
        dict
            ``{"round": [int], "noise_multiplier": [float], "sample_rate": [float],
            "steps": [int]}``, one entry per event, oldest first.
        """
        return {
            "round": [event.round for event in self._events],
            "noise_multiplier": [event.noise_multiplier for event in self._events],
            "sample_rate": [event.sample_rate for event in self._events],
            "steps": [event.steps for event in self._events],
        }

    @classmethod
    def from_config(cls, record: Mapping[str, Any]) -> PrivacyLedger:
        """Rebuild a ledger from :meth:`to_config` output (or a ``ConfigRecord`` holding it).

        Keys other than the four columns are ignored, so the columns may share a record
        with other state.

        Raises
        ------
        InvalidParameterError
            (a ``ValueError``) if ``record`` is not a mapping, a column is missing or not
            a list, or a value is invalid for a :class:`DPEvent`.
        ValueError
            If the columns differ in length, or rounds decrease.
        """
        owner = "PrivacyLedger.from_config"
        if not isinstance(record, Mapping):
            raise InvalidParameterError(
                f"The 'record' parameter of {owner} must be a mapping. Got {type(record).__name__} instead."
            )
        missing = [name for name in _COLUMNS if name not in record]
        if missing:
            raise InvalidParameterError(
                f"The 'record' parameter of {owner} must have the columns {', '.join(_COLUMNS)}. "
                f"Missing {', '.join(missing)}."
            )
        columns = {}
        for name in _COLUMNS:
            column = record[name]
            if not isinstance(column, (list, tuple)):
                raise InvalidParameterError(
                    f"The '{name}' column of {owner} must be a list. Got {type(column).__name__} instead."
                )
            columns[name] = column
        lengths = {name: len(column) for name, column in columns.items()}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{name}={length}" for name, length in lengths.items())
            raise ValueError(f"The columns of a privacy-ledger record must have equal lengths. Got {shown}.")
        return cls(DPEvent(*row) for row in zip(*(columns[name] for name in _COLUMNS), strict=True))

    def __len__(self) -> int:
        return len(self._events)

    def __iter__(self) -> Iterator[DPEvent]:
        return iter(tuple(self._events))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrivacyLedger):
            return NotImplemented
        return self._events == other._events

    def __repr__(self) -> str:
        return f"{type(self).__name__}(events={self.events!r})"
