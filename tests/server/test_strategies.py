"""Hospitals per round: one key, agreeing with privacy.clients-per-round, and Flower's sampling."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvg, FedProx
from hypothesis import given
from hypothesis import strategies as st

from server.privacy_log import PrivacyLog
from server.site_metrics import SiteMetrics
from server.strategies import make_strategy, round_sampling
from sims.config import ConfigError, TrainSpec, clients_per_round, config_from_run_config


class NodesOnly:
    """The part of Flower's Grid the strategies' configure_* hooks call: the connected node ids."""

    def __init__(self, node_ids: list[int]) -> None:
        self._ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._ids)


def _metrics() -> SiteMetrics:
    return SiteMetrics(lambda rows: None)


@pytest.fixture
def server_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps Messages with the running task's identity, which its ServerApp runtime sets."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


# ----------------------------------------------------------------------------- the key


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, 0),
        ({"clients-per-round": 4}, 4),
        ({"privacy.clients-per-round": 4}, 4),
        ({"clients-per-round": 4, "privacy.clients-per-round": 4}, 4),
        ({"clients-per-round": 4, "privacy.clients-per-round": 0}, 4),
    ],
)
def test_either_key_sets_the_one_number_seen_everywhere(overrides: dict, expected: int) -> None:
    config = config_from_run_config({"privacy.mode": "client", **overrides})

    assert config.train.clients_per_round == config.privacy.clients_per_round == expected


def test_disagreeing_keys_are_one_sentence_naming_both_values() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_run_config({"clients-per-round": 4, "privacy.clients-per-round": 6})

    assert str(err.value) == (
        "The 'clients-per-round' and 'privacy.clients-per-round' parameters must agree (they are the same "
        "number of hospitals per round; set one, or both to one value). Got 4 and 6 instead."
    )


@pytest.mark.parametrize("value", [-1, 2.5, True, "4"])
def test_clients_per_round_must_be_a_non_negative_int(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^The 'clients-per-round' parameter must be an int in \[0, 1000000\]"):
        config_from_run_config({"clients-per-round": value})


def test_effective_count_is_all_for_zero_and_at_most_the_federation() -> None:
    assert [clients_per_round(0, 7), clients_per_round(3, 7), clients_per_round(9, 7)] == [7, 3, 7]


# ----------------------------------------------------------------------------- Flower's parameters


def test_default_every_hospital_trains_and_evaluates_every_round() -> None:
    sampling = round_sampling(TrainSpec(), 6)

    assert sampling.flower_kwargs() == {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": 6,
        "min_evaluate_nodes": 6,
        "min_available_nodes": 6,
    }
    assert not sampling.evaluate_trained
    assert type(make_strategy(TrainSpec(), 6, _metrics())) is FedAvg  # Flower's own, unchanged


@given(hospitals=st.integers(1, 2000), per_round=st.integers(0, 2500))
def test_flower_samples_exactly_m_hospitals(hospitals: int, per_round: int) -> None:
    sampling = round_sampling(TrainSpec(clients_per_round=per_round), hospitals)
    m = sampling.per_round

    # Flower 1.42's FedAvg.configure_train / configure_evaluate sample this many nodes.
    train_size = max(int(hospitals * sampling.fraction_train), sampling.min_train_nodes)
    evaluate_size = max(int(hospitals * sampling.fraction_evaluate), sampling.min_evaluate_nodes)

    assert m == (hospitals if per_round == 0 else min(per_round, hospitals))
    assert train_size == evaluate_size == m
    assert m <= sampling.min_available_nodes <= hospitals


def test_min_available_is_plugged_in_one_place_and_clipped_to_m_and_k() -> None:
    train = TrainSpec(clients_per_round=4)

    assert round_sampling(train, 200, min_available=50).min_available_nodes == 50
    assert round_sampling(train, 200, min_available=1).min_available_nodes == 4
    assert round_sampling(train, 200, min_available=500).min_available_nodes == 200
    assert make_strategy(train, 200, _metrics(), min_available=50).min_available_nodes == 50  # type: ignore[attr-defined]


@pytest.mark.parametrize(("name", "flower_class"), [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam)])
@pytest.mark.usefixtures("server_task")
def test_sampled_rounds_evaluate_exactly_the_hospitals_that_trained(name: str, flower_class: type) -> None:
    # Prepare: 200 hospitals, 4 a round.
    random.seed(5)  # Flower samples nodes with Python's `random`
    strategy = make_strategy(TrainSpec(strategy=name, clients_per_round=4), 200, _metrics())
    grid = NodesOnly(list(range(1000, 1200)))
    arrays = ArrayRecord()
    sampled = []

    for server_round in (1, 2, 3):
        # Execute
        trained = [m.metadata.dst_node_id for m in strategy.configure_train(server_round, arrays, ConfigRecord(), grid)]
        evaluated = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid))

        # Assert
        assert len(trained) == 4 and len(set(trained)) == 4
        assert [m.metadata.dst_node_id for m in evaluated] == trained
        assert all(m.metadata.message_type == "evaluate" for m in evaluated)
        assert all(m.content["config"]["server-round"] == server_round for m in evaluated)
        sampled.append(set(trained))
    assert isinstance(strategy, flower_class)
    assert len(set.union(*sampled)) > 4  # a new sample each round


@pytest.mark.usefixtures("server_task")
def test_client_level_dp_samples_the_same_m_the_ledger_accounts_for(tmp_path: Path) -> None:
    # Prepare
    config = config_from_run_config({"privacy.mode": "client", "clients-per-round": 3})
    random.seed(0)

    # Execute
    strategy = make_strategy(config.train, 40, _metrics(), config.privacy)
    log = PrivacyLog(tmp_path, config.privacy, 40)
    grid = NodesOnly(list(range(40)))
    trained = [m.metadata.dst_node_id for m in strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid)]
    evaluated = [m.metadata.dst_node_id for m in strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid)]

    # Assert
    assert isinstance(strategy, DifferentialPrivacyServerSideFixedClipping)
    assert strategy.num_sampled_clients == log.clients_per_round == 3
    assert len(trained) == 3 and evaluated == trained
