"""PrivacyLedger: append-only bookkeeping; epsilon always recomputed from all events."""

from __future__ import annotations

import math

import pytest

from privacy.accounting import epsilon
from privacy.events import DPEvent
from privacy.ledger import PrivacyLedger

DELTA = 1e-5

# A realistic hospital history: calibrated sigma drifting, a skipped round, a change of q.
HISTORY = (
    DPEvent(round=1, noise_multiplier=1.1, sample_rate=0.02, steps=100),
    DPEvent(round=2, noise_multiplier=1.1, sample_rate=0.02, steps=100),
    DPEvent(round=3, noise_multiplier=1.3, sample_rate=0.02, steps=0),
    DPEvent(round=4, noise_multiplier=0.9, sample_rate=0.05, steps=40),
    DPEvent(round=4, noise_multiplier=2.0, sample_rate=0.05, steps=40),
    DPEvent(round=7, noise_multiplier=1.3, sample_rate=0.01, steps=300),
)


def test_empty_ledger_spends_nothing() -> None:
    ledger = PrivacyLedger()

    assert len(ledger) == 0
    assert ledger.steps() == 0
    assert ledger.events == ()
    assert ledger.epsilon(delta=DELTA) == 0.0
    assert ledger.epsilon(delta=DELTA, accountant="prv") == 0.0


def test_epsilon_is_recomputed_from_all_events() -> None:
    ledger = PrivacyLedger(HISTORY)

    assert ledger.epsilon(delta=DELTA) == epsilon(HISTORY, delta=DELTA)
    assert ledger.steps() == 580
    assert list(ledger) == list(HISTORY)
    assert ledger.events == HISTORY


def test_epsilon_never_decreases_as_events_are_appended() -> None:
    ledger = PrivacyLedger()
    previous = 0.0

    for event in HISTORY:
        ledger.append(event)
        current = ledger.epsilon(delta=DELTA)
        assert current >= previous
        previous = current

    assert previous > 0.0


def test_a_round_that_sat_out_changes_nothing() -> None:
    ledger = PrivacyLedger(HISTORY[:2])
    before = ledger.epsilon(delta=DELTA)

    ledger.append(DPEvent(round=3, noise_multiplier=0.0, sample_rate=0.5, steps=0))

    assert ledger.epsilon(delta=DELTA) == before
    assert len(ledger) == 3


def test_one_unnoised_step_makes_epsilon_infinite() -> None:
    ledger = PrivacyLedger(HISTORY)

    ledger.append(DPEvent(round=8, noise_multiplier=0.0, sample_rate=0.01, steps=1))

    assert ledger.epsilon(delta=DELTA) == math.inf


def test_append_only_rejects_an_earlier_round() -> None:
    ledger = PrivacyLedger(HISTORY)

    with pytest.raises(ValueError, match=r"append-only: cannot append an event for round 6 after round 7"):
        ledger.append(DPEvent(round=6, noise_multiplier=1.0, sample_rate=0.01, steps=1))

    assert ledger.events == HISTORY
    ledger.append(DPEvent(round=7, noise_multiplier=1.0, sample_rate=0.01, steps=1))  # same round: fine
    assert len(ledger) == len(HISTORY) + 1


def test_constructor_applies_the_append_only_rule() -> None:
    with pytest.raises(ValueError, match=r"round 1 after round 4"):
        PrivacyLedger([HISTORY[3], HISTORY[0]])


def test_non_events_are_rejected_with_their_type() -> None:
    with pytest.raises(
        TypeError, match=r"'event' parameter of PrivacyLedger\.append must be a DPEvent\. Got dict"
    ):
        PrivacyLedger().append(HISTORY[0].to_dict())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"must be an iterable of DPEvent\. Got tuple at position 1 instead"):
        PrivacyLedger([HISTORY[0], (2, 1.0, 0.1, 3)])  # type: ignore[list-item]


def test_events_view_cannot_edit_the_ledger() -> None:
    ledger = PrivacyLedger(HISTORY)

    with pytest.raises(AttributeError):
        ledger.events = ()  # type: ignore[misc]

    assert isinstance(ledger.events, tuple)


def test_config_round_trip_is_exact_and_uses_plain_lists() -> None:
    ledger = PrivacyLedger(HISTORY)

    config = ledger.to_config()
    restored = PrivacyLedger.from_config(config)

    assert restored == ledger
    assert restored.epsilon(delta=DELTA) == ledger.epsilon(delta=DELTA)
    assert config["round"] == [1, 2, 3, 4, 4, 7]
    assert config["steps"] == [100, 100, 0, 40, 40, 300]
    assert all(type(v) is int for key in ("round", "steps") for v in config[key])
    assert all(type(v) is float for key in ("noise_multiplier", "sample_rate") for v in config[key])
    assert PrivacyLedger.from_config(PrivacyLedger().to_config()) == PrivacyLedger()


def test_config_survives_a_flower_config_record() -> None:
    record_module = pytest.importorskip("flwr.app")
    ledger = PrivacyLedger(HISTORY)

    record = record_module.ConfigRecord(ledger.to_config())

    assert PrivacyLedger.from_config(record) == ledger
    assert (
        PrivacyLedger.from_config(record_module.ConfigRecord(PrivacyLedger().to_config())) == PrivacyLedger()
    )


def test_from_config_ignores_other_keys() -> None:
    config = PrivacyLedger(HISTORY).to_config() | {"hospital": [3]}

    assert PrivacyLedger.from_config(config) == PrivacyLedger(HISTORY)


def test_from_config_requires_equal_column_lengths() -> None:
    config = PrivacyLedger(HISTORY).to_config()
    config["steps"] = config["steps"][:-1]

    with pytest.raises(
        ValueError,
        match=r"must have equal lengths\. Got round=6, noise_multiplier=6, sample_rate=6, steps=5\.",
    ):
        PrivacyLedger.from_config(config)


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (
            {"round": [1], "noise_multiplier": [1.0], "sample_rate": [0.1]},
            r"must have the columns .* Missing steps\.",
        ),
        (
            {"round": 1, "noise_multiplier": [1.0], "sample_rate": [0.1], "steps": [1]},
            r"'round' column .* list\. Got int",
        ),
        (
            {"round": [1], "noise_multiplier": [-1.0], "sample_rate": [0.1], "steps": [1]},
            r"'noise_multiplier' .* Got -1\.0",
        ),
        ([1, 2], r"'record' parameter of PrivacyLedger\.from_config must be a mapping\. Got list instead\."),
    ],
)
def test_from_config_rejects_malformed_records(record: object, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        PrivacyLedger.from_config(record)  # type: ignore[arg-type]


def test_equality_is_by_events_and_ledgers_are_unhashable() -> None:
    assert PrivacyLedger(HISTORY) == PrivacyLedger(list(HISTORY))
    assert PrivacyLedger(HISTORY) != PrivacyLedger(HISTORY[:-1])
    assert PrivacyLedger(HISTORY) != list(HISTORY)
    with pytest.raises(TypeError):
        hash(PrivacyLedger())
    assert repr(PrivacyLedger(HISTORY[:1])) == f"PrivacyLedger(events=({HISTORY[0]!r},))"
