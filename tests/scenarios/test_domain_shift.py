"""Who trains and who only evaluates: scenarios.domain_shift, and the grid the strategy sees."""

from __future__ import annotations

import pytest

from scenarios.domain_shift import federation_specs, site_roles, training_sites, unseen_sites
from server.driver import SiteOrderedGrid
from server.shift import ShiftCoordinator
from sims.config import ConfigError, config_from_run_config
from sims.scanners import SCANNER_ARCHETYPES, make_scanner_profile, scanner_archetype


def _config(**keys: object) -> object:
    return config_from_run_config({"image-size": 32, "unet-channels": "8,16", **keys})


def test_the_last_nodes_are_unseen_and_every_four_cover_the_archetypes_at_one_severity() -> None:
    config = _config(**{"shift.unseen-hospitals": 8, "shift.unseen-severities": "2,3"})

    roles = site_roles(config, 12)  # type: ignore[arg-type]

    assert training_sites(roles) == [0, 1, 2, 3] and unseen_sites(roles) == list(range(4, 12))
    assert [r.severity for r in roles] == [1.0] * 4 + [2.0] * 4 + [3.0] * 4
    assert {r.archetype for r in roles[4:8]} == set(SCANNER_ARCHETYPES) == {r.archetype for r in roles[8:]}
    assert all(r.join_round == 0 and not r.trains_in(5) for r in roles[4:])
    specs = federation_specs(config, 12)  # type: ignore[arg-type]
    assert specs[9].scanner == make_scanner_profile(0, 9, 3.0)  # its own scanner at its own severity
    assert specs[1].scanner == make_scanner_profile(0, 1, 1.0)  # training hospitals unchanged


def test_leave_one_scanner_out_holds_out_that_archetype_at_the_training_severity() -> None:
    held = scanner_archetype(0, 2)
    config = _config(**{"shift.holdout-archetype": held})

    roles = site_roles(config, 4)  # type: ignore[arg-type]

    assert unseen_sites(roles) == [2] and roles[2].severity == 1.0
    assert all(r.archetype != held for r in roles if r.role == "train")


def test_late_joiner_is_the_last_training_hospital_and_the_strategy_waits_for_one_fewer() -> None:
    config = _config(**{"shift.late-join-round": 3, "shift.unseen-hospitals": 1, "num-server-rounds": 4})

    coordinator = ShiftCoordinator(config, 4)  # type: ignore[arg-type]

    assert [r.join_round for r in coordinator.roles] == [1, 1, 3, 0]
    assert coordinator.train_sites(2) == [0, 1] and coordinator.train_sites(3) == [0, 1, 2]
    assert coordinator.evaluate_sites == [0, 1, 2]
    assert (coordinator.num_trainers, coordinator.strategy_hospitals) == (3, 2)


class _Grid:
    """The two Grid calls SiteOrderedGrid makes (node ids as Flower hands them out, unordered)."""

    def get_node_ids(self) -> list[int]:
        return [905, 17, 333, 42]


def test_the_strategy_grid_lists_only_the_hospitals_it_may_address() -> None:
    site_of = {17: 2, 333: 0, 42: 3, 905: 1}

    assert SiteOrderedGrid(_Grid(), site_of).get_node_ids() == [333, 905, 17, 42]  # type: ignore[arg-type]
    assert SiteOrderedGrid(_Grid(), site_of, [0, 2]).get_node_ids() == [333, 17]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("keys", "nodes", "message"),
    [
        ({"shift.unseen-hospitals": 4}, 4, "The 'shift.unseen-hospitals' parameter must leave at least one training"),
        ({"shift.label-noise-hospital": 3, "shift.unseen-hospitals": 1}, 4,
         "The 'shift.label-noise-hospital' parameter must be -1 or a training hospital's id (0, 1, 2). Got 3"),
        ({"shift.late-join-round": 2, "shift.unseen-hospitals": 1}, 2,
         "The 'shift.late-join-round' parameter needs at least two training hospitals"),
    ],
)
def test_impossible_shift_settings_are_one_sentence(keys: dict[str, object], nodes: int, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^" + message.replace("(", r"\(").replace(")", r"\)")):
        site_roles(_config(**keys), nodes)  # type: ignore[arg-type]


def test_holding_out_the_only_archetype_leaves_no_one_to_train() -> None:
    config = _config(**{"shift.holdout-archetype": scanner_archetype(0, 0)})

    with pytest.raises(ConfigError, match="the scanner of every one of the 1 training-position hospitals"):
        site_roles(config, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"norm": "batch", "privacy.mode": "sample"}, "The 'norm' parameter cannot be \"batch\" with sample-level DP"),
        ({"strategy": "fedbn"}, "has no parameters to keep"),
        ({"mitigation.tta": "adabn"}, "needs 'norm' = \"batch\""),
        ({"mitigation.tta": "tent"}, "'norm' = \"instance\" has none"),
        ({"strategy": "pooled", "privacy.mode": "sample"}, "needs 'privacy.mode' = \"off\""),
        ({"shift.late-join-round": 31}, "must be 0 or at most 'num-server-rounds' = 30. Got 31"),
        ({"finetune-epochs": 1, "privacy.mode": "sample"}, "fine-tuning would spend privacy budget"),
        ({"shift.unseen-severities": "2,4"}, "comma-separated floats in [0, 3]"),
        ({"shift.holdout-archetype": "noisey"}, "Did you mean 'noisy'?"),
    ],
)
def test_combinations_that_cannot_work_are_refused_with_one_sentence(keys: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(**keys)

    assert message in str(err.value) and "\n" not in str(err.value)
