"""One family of argument checks and one "did you mean" for all of fedscan.

Messages follow scikit-learn's sentence: "The 'max_grad_norm' parameter of DPConfig must be
a float in (0, inf). Got -1 instead." Every check returns the value (converted) or raises
:class:`InvalidParameterError`, a :class:`ValueError`.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = [
    "InvalidParameterError",
    "check_choice",
    "check_float",
    "check_int",
    "did_you_mean",
    "interval",
    "is_int",
    "is_real",
    "parameter_error",
]


class InvalidParameterError(ValueError, TypeError):
    """An argument has the wrong type or is out of range (one sentence naming it and the value).

    Subclasses both :class:`ValueError` and :class:`TypeError` (as scikit-learn's error of
    the same name does), so callers may catch either.
    """


def did_you_mean(name: object, options: Iterable[str], *, cutoff: float = 0.6) -> str:
    """``" Did you mean 'x'?"`` for the option nearest to ``name``, or ``""``."""
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=cutoff)
    return f" Did you mean '{close[0]}'?" if close else ""


def parameter_error(name: str, expected: str, value: object, *, owner: str | None = None, hint: str = "") -> str:
    """The sentence: ``The 'name' parameter[ of owner] must be expected. Got value instead.hint``."""
    of = f" of {owner}" if owner else ""
    return f"The '{name}' parameter{of} must be {expected}. Got {value!r} instead.{hint}"


def is_int(value: object) -> bool:
    """An integral number that is not a bool (numpy integers included)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A finite real number that is not a bool (numpy numbers included)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def interval(low: float, high: float, low_open: bool = False, high_open: bool = False) -> str:
    """``[low, high)``-style text; infinite ends are always open."""

    def show(x: float) -> str:
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:g}"

    left = "(" if low_open or math.isinf(low) else "["
    right = ")" if high_open or math.isinf(high) else "]"
    return f"{left}{show(low)}, {show(high)}{right}"


def check_float(
    name: str,
    value: Any,
    *,
    owner: str | None = None,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a float if it is a finite real in the interval (never a bool), else raise."""
    ok = is_real(value)
    if ok:
        x = float(value)
        ok = (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
    if not ok:
        expected = f"a float in {interval(low, high, low_open, high_open)}"
        raise InvalidParameterError(parameter_error(name, expected, value, owner=owner))
    return float(value)


def check_int(name: str, value: Any, *, owner: str | None = None, low: int = 0, high: float = math.inf) -> int:
    """``value`` as an int if it is integral (never a bool) in ``[low, high]``, else raise."""
    if is_int(value) and low <= int(value) <= high:
        return int(value)
    upper = "inf)" if math.isinf(high) else f"{int(high)}]"
    raise InvalidParameterError(parameter_error(name, f"an int in [{low}, {upper}", value, owner=owner))


def check_choice(name: str, value: Any, options: tuple[str, ...], *, owner: str | None = None) -> str:
    """``value`` if it is one of ``options``; otherwise raise, suggesting the nearest."""
    if isinstance(value, str) and value in options:
        return value
    hint = did_you_mean(value.lower() if isinstance(value, str) else value, options, cutoff=0.3)
    expected = f"one of {', '.join(map(repr, options))}"
    raise InvalidParameterError(parameter_error(name, expected, value, owner=owner, hint=hint))
