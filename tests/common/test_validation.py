"""The one family of argument checks: values, messages, and the one "did you mean"."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.validation import InvalidParameterError, check_choice, check_float, check_int, did_you_mean


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_float("lr", -1, owner="X", low=0, low_open=True),
         "The 'lr' parameter of X must be a float in (0, inf). Got -1 instead."),
        (lambda: check_float("q", math.nan, high=1.0), "The 'q' parameter must be a float in (-inf, 1]. Got nan instead."),
        (lambda: check_float("q", True), "The 'q' parameter must be a float in (-inf, inf). Got True instead."),
        (lambda: check_int("steps", 2.0, owner="Y"), "The 'steps' parameter of Y must be an int in [0, inf). Got 2.0 instead."),
        (lambda: check_int("k", 11, low=1, high=10), "The 'k' parameter must be an int in [1, 10]. Got 11 instead."),
        (lambda: check_choice("accountant", "RDPP", ("rdp", "prv")),
         "The 'accountant' parameter must be one of 'rdp', 'prv'. Got 'RDPP' instead. Did you mean 'rdp'?"),
    ],
)
def test_each_check_raises_one_sentence(call: object, message: str) -> None:
    with pytest.raises(InvalidParameterError) as err:
        call()  # type: ignore[operator]
    assert str(err.value) == message
    assert isinstance(err.value, ValueError) and isinstance(err.value, TypeError)


def test_checks_return_plain_python_values() -> None:
    assert check_int("n", np.int64(3)) == 3 and type(check_int("n", np.int64(3))) is int
    assert check_float("x", np.float32(0.5)) == 0.5 and type(check_float("x", np.float32(0.5))) is float
    assert check_choice("c", "a", ("a", "b")) == "a"


def test_did_you_mean() -> None:
    assert did_you_mean("num-server-round", ["num-server-rounds", "seed"]) == " Did you mean 'num-server-rounds'?"
    assert did_you_mean("zzz", ["num-server-rounds"]) == ""
    assert did_you_mean(3, ["a"]) == ""
