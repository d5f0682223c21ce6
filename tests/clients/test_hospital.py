"""A hospital's DP plan and budget guard, without Flower."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.hospital import Hospital
from privacy.accounting import epsilon
from privacy.events import DPEvent
from privacy.ledger import PrivacyLedger
from sims.config import config_from_run_config

TINY = {"image-size": 32, "unet-channels": "8,16", "patients-per-hospital": 40, "holdout-per-hospital": 2}


def _hospital(tmp_path: Path, **privacy: object) -> Hospital:
    keys = {f"privacy.{k.replace('_', '-')}": v for k, v in privacy.items()}
    config = config_from_run_config({**TINY, "cache-dir": str(tmp_path), "num-server-rounds": 5, **keys})
    return Hospital.from_partition(config, 0, 2)


def test_calibrated_plan_meets_but_never_exceeds_the_target_over_the_planned_run(tmp_path: Path) -> None:
    hospital = _hospital(tmp_path, mode="sample", target_epsilon=3.0, delta=1e-3)

    plan = hospital.dp_plan()
    whole_run = [DPEvent(r, plan.noise_multiplier, plan.sample_rate, plan.steps) for r in range(1, 6)]

    n_train = len(hospital.data("train")[0])
    assert plan.sample_rate == pytest.approx(8 / n_train)
    assert plan.steps == 2 * round(n_train / 8)  # local-epochs x round(1/q)
    assert 2.9 <= epsilon(whole_run, delta=1e-3) <= 3.0


def test_guard_allows_exactly_the_rounds_that_fit(tmp_path: Path) -> None:
    hospital = _hospital(tmp_path, mode="sample", target_epsilon=2.0, calibrate_noise=False, noise_multiplier=2.5, delta=1e-3)
    ledger = PrivacyLedger()
    plan = hospital.dp_plan()

    taken = 0
    for server_round in range(1, 6):
        if not hospital.budget_allows(ledger, server_round):
            break
        ledger.append(DPEvent(server_round, plan.noise_multiplier, plan.sample_rate, plan.steps))
        taken += 1

    assert taken == 2  # epsilon 1.13, 1.62, then 2.02 would overshoot
    assert ledger.epsilon(delta=1e-3) <= 2.0
    assert hospital.projected_epsilon(ledger, taken + 1) > 2.0
    assert plan.noise_multiplier == 2.5  # not calibrated


def test_dp_layers_head_trains_only_the_head_and_records_the_event(tmp_path: Path) -> None:
    import torch

    from sims.model import head_parameter_names

    hospital = _hospital(tmp_path, mode="sample", target_epsilon=8.0, delta=1e-3, dp_layers="head")
    model = hospital.new_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    result, event = hospital.train_private(model, server_round=1)

    head = set(head_parameter_names(model))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= head
    assert all(p.requires_grad for p in model.parameters())  # unfrozen again for the next use
    assert event.round == 1 and event.steps == result.steps == hospital.dp_plan().steps
