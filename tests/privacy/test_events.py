"""DPEvent: a frozen, validated, serialisable record of one DP-SGD participation."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from privacy.events import DPEvent, InvalidParameterError


def test_fields_are_normalised_to_plain_python_numbers() -> None:
    event = DPEvent(
        round=np.int64(3),  # type: ignore[arg-type]
        noise_multiplier=np.float32(1.5),  # type: ignore[arg-type]
        sample_rate=1,
        steps=np.uint8(7),  # type: ignore[arg-type]
    )

    assert (event.round, event.noise_multiplier, event.sample_rate, event.steps) == (3, 1.5, 1.0, 7)
    assert [type(v) for v in event.to_dict().values()] == [int, float, float, int]
    assert event == DPEvent(3, 1.5, 1.0, 7)
    assert hash(event) == hash(DPEvent(3, 1.5, 1.0, 7))


def test_event_is_frozen() -> None:
    event = DPEvent(1, 1.0, 0.01, 10)

    with pytest.raises(dataclasses.FrozenInstanceError):
        event.steps = 0  # type: ignore[misc]


def test_dict_round_trip_is_exact() -> None:
    event = DPEvent(round=12, noise_multiplier=0.87654321, sample_rate=0.0123, steps=456)

    d = event.to_dict()

    assert d == {"round": 12, "noise_multiplier": 0.87654321, "sample_rate": 0.0123, "steps": 456}
    assert DPEvent.from_dict(d) == event


def test_boundary_values_are_allowed() -> None:
    # noise 0 (no privacy), q = 1 (full batch), steps 0 (sat out), round 0 (pre-training)
    event = DPEvent(round=0, noise_multiplier=0.0, sample_rate=1.0, steps=0)

    assert event.to_dict() == {"round": 0, "noise_multiplier": 0.0, "sample_rate": 1.0, "steps": 0}


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("round", -1, r"The 'round' parameter of DPEvent must be an int in \[0, inf\)\. Got -1 instead\."),
        ("round", 1.0, r"'round' parameter of DPEvent must be an int in \[0, inf\)\. Got 1\.0 instead\."),
        (
            "noise_multiplier",
            -0.5,
            r"'noise_multiplier' parameter of DPEvent must be a float in \[0, inf\)\. Got -0\.5",
        ),
        ("noise_multiplier", math.inf, r"'noise_multiplier' .* \[0, inf\)\. Got inf instead\."),
        ("noise_multiplier", math.nan, r"'noise_multiplier' .* Got nan instead\."),
        ("noise_multiplier", "1.0", r"'noise_multiplier' .* Got '1\.0' instead\."),
        (
            "sample_rate",
            0.0,
            r"'sample_rate' parameter of DPEvent must be a float in \(0, 1\]\. Got 0\.0 instead\.",
        ),
        ("sample_rate", 1.5, r"'sample_rate' .* \(0, 1\]\. Got 1\.5 instead\."),
        ("sample_rate", True, r"'sample_rate' .* Got True instead\."),
        ("steps", -3, r"'steps' parameter of DPEvent must be an int in \[0, inf\)\. Got -3 instead\."),
        ("steps", 2.5, r"'steps' .* Got 2\.5 instead\."),
    ],
)
def test_invalid_fields_name_parameter_value_and_rule(field: str, value: object, expected: str) -> None:
    fields = {"round": 1, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10} | {field: value}

    with pytest.raises(ValueError, match=expected):
        DPEvent(**fields)  # type: ignore[arg-type]


def test_invalid_parameter_error_is_also_a_type_error() -> None:
    with pytest.raises(TypeError):
        DPEvent(1, "loud", 0.1, 10)  # type: ignore[arg-type]
    assert issubclass(InvalidParameterError, ValueError)


@pytest.mark.parametrize(
    ("d", "expected"),
    [
        ({"round": 1, "noise_multiplier": 1.0, "sample_rate": 0.1}, r"Missing \['steps'\]; unknown none"),
        (
            {"round": 1, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 1, "epsilon": 2.0},
            r"Missing none; unknown \['epsilon'\]",
        ),
        ([1, 1.0, 0.1, 1], r"'d' parameter of DPEvent\.from_dict must be a mapping\. Got list instead\."),
    ],
)
def test_from_dict_rejects_wrong_keys(d: object, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        DPEvent.from_dict(d)  # type: ignore[arg-type]
