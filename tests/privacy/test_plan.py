"""The DP plan: one pure function per mechanism, shared by hospitals, pre-flight, strategy and log."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from privacy.accounting import epsilon
from privacy.events import DPEvent
from privacy.plan import plan_client_level, plan_sample_level

ROOT = Path(__file__).resolve().parents[2]

# The default DP run's hospital: 106 train patients (150 x 0.7), batch 8, 2 local epochs, 30 rounds.
DEFAULT = {
    "n_train": 106,
    "batch_size": 8,
    "local_epochs": 2,
    "num_rounds": 30,
    "delta": 1e-5,
    "noise_multiplier": 1.0,
}


def quiet_epsilon(events: list[DPEvent], delta: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Opacus, on extreme RDP orders
        return epsilon(events, delta=delta)


def test_sample_level_plan_is_poisson_rate_and_round_of_one_over_q_steps_per_epoch() -> None:
    plan = plan_sample_level(**DEFAULT, target_epsilon=None, calibrate=True)

    assert plan == DPEvent(round=0, noise_multiplier=1.0, sample_rate=8 / 106, steps=2 * 13)


def test_a_cohort_smaller_than_the_batch_takes_one_full_batch_step_per_epoch() -> None:
    plan = plan_sample_level(**{**DEFAULT, "n_train": 5}, target_epsilon=None, calibrate=True)

    assert (plan.sample_rate, plan.steps) == (1.0, 2)


def test_calibrated_plan_meets_the_target_over_all_planned_rounds() -> None:
    plan = plan_sample_level(**DEFAULT, target_epsilon=8.0, calibrate=True)
    ledger = [DPEvent(r, plan.noise_multiplier, plan.sample_rate, plan.steps) for r in range(1, 31)]

    assert 7.99 <= quiet_epsilon(ledger, 1e-5) <= 8.0
    # one round more would overshoot: the plan is tight, not merely safe
    assert (
        quiet_epsilon([*ledger, DPEvent(31, plan.noise_multiplier, plan.sample_rate, plan.steps)], 1e-5) > 8.0
    )


def test_without_calibration_the_target_is_only_a_cap() -> None:
    plan = plan_sample_level(**DEFAULT, target_epsilon=8.0, calibrate=False)

    assert plan.noise_multiplier == 1.0


def test_client_level_plan_is_one_release_per_round_at_client_rate() -> None:
    plan = plan_client_level(
        num_clients=10,
        clients_per_round=4,
        num_rounds=20,
        target_epsilon=None,
        delta=1e-5,
        noise_multiplier=0.7,
        calibrate=True,
    )

    assert plan == DPEvent(round=0, noise_multiplier=0.7, sample_rate=0.4, steps=1)


@pytest.mark.parametrize(("per_round", "rounds", "target"), [(3, 4, 5.0), (2, 30, 3.0), (5, 100, 8.0)])
def test_calibrated_client_plan_meets_the_client_target_over_the_planned_rounds(
    per_round: int, rounds: int, target: float
) -> None:
    plan = plan_client_level(
        num_clients=5,
        clients_per_round=per_round,
        num_rounds=rounds,
        target_epsilon=target,
        delta=1e-5,
        noise_multiplier=1.2,
        calibrate=True,
    )
    ledger = [DPEvent(r, plan.noise_multiplier, plan.sample_rate, 1) for r in range(1, rounds + 1)]

    assert target - 0.01 <= quiet_epsilon(ledger, 1e-5) <= target


def test_the_issue_example_client_noise_1_2_spends_8_6_in_4_rounds_and_calibration_fixes_it() -> None:
    # 3 hospitals, all per round (q = 1), noise 1.2, delta 1e-5: 8.60 after 4 rounds, uncapped.
    fixed = plan_client_level(
        num_clients=3,
        clients_per_round=3,
        num_rounds=4,
        target_epsilon=5.0,
        delta=1e-5,
        noise_multiplier=1.2,
        calibrate=False,
    )
    calibrated = plan_client_level(
        num_clients=3,
        clients_per_round=3,
        num_rounds=4,
        target_epsilon=5.0,
        delta=1e-5,
        noise_multiplier=1.2,
        calibrate=True,
    )

    assert epsilon([DPEvent(1, fixed.noise_multiplier, 1.0, 4)], delta=1e-5) == pytest.approx(
        8.6033, abs=1e-4
    )
    assert calibrated.noise_multiplier > 1.2
    assert 4.99 <= epsilon([DPEvent(1, calibrated.noise_multiplier, 1.0, 4)], delta=1e-5) <= 5.0


def test_an_unreachable_target_is_refused() -> None:
    with pytest.raises(ValueError, match=r"cannot be met: even noise_multiplier="):
        plan_client_level(
            num_clients=1,
            clients_per_round=1,
            num_rounds=10_000,
            target_epsilon=1e-4,
            delta=1e-5,
            noise_multiplier=1.0,
            calibrate=True,
        )


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (
            lambda: plan_sample_level(**{**DEFAULT, "n_train": 0}, target_epsilon=None, calibrate=True),
            r"The 'n_train' parameter of plan_sample_level must be an int in \[1, inf\)\. Got 0 instead\.",
        ),
        (
            lambda: plan_sample_level(**DEFAULT, target_epsilon=-1.0, calibrate=False),
            r"The 'target_epsilon' parameter of plan_sample_level must be a float in \(0, inf\)\. Got -1\.0",
        ),
        (
            lambda: plan_sample_level(**DEFAULT, target_epsilon=8.0, calibrate="yes"),
            r"The 'calibrate' parameter of plan_sample_level must be a bool\. Got 'yes' instead\.",
        ),
        (
            lambda: plan_client_level(
                num_clients=3,
                clients_per_round=4,
                num_rounds=1,
                target_epsilon=None,
                delta=1e-5,
                noise_multiplier=1.0,
                calibrate=True,
            ),
            r"The 'clients_per_round' parameter of plan_client_level must be an int in "
            r"\[1, num_clients=3\]\. "
            r"Got 4 instead\.",
        ),
        (
            lambda: plan_client_level(
                num_clients=3,
                clients_per_round=3,
                num_rounds=1,
                target_epsilon=None,
                delta=1.0,
                noise_multiplier=1.0,
                calibrate=True,
            ),
            r"The 'delta' parameter of plan_client_level must be a float in \(0, 1\)\. Got 1\.0 instead\.",
        ),
    ],
)
def test_bad_input_names_parameter_value_and_rule(call: object, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        call()  # type: ignore[operator]


def test_numbers_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        plan_sample_level(106, 8, 2, 30, None, 1e-5, 1.0, True)  # type: ignore[misc]


def test_the_privacy_package_imports_no_other_project_package() -> None:
    code = (
        "import sys, privacy.plan, privacy.accounting, privacy.report;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sims', 'server', 'clients', 'scenarios'}))"
    )

    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)

    assert out.stdout.strip() == "[]"
