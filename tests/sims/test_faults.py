"""Simulated hospital faults: deterministic per seed, at the configured rates, and truly corrupt."""

from __future__ import annotations

import numpy as np
import pytest

from sims.config import ConfigError, config_from_run_config
from sims.faults import CORRUPTIONS, FaultSpec, corrupt_arrays, corruption_for, fault_for


def _schedule(spec: FaultSpec, seed: int, sites: int = 50, rounds: int = 40) -> list[str | None]:
    return [fault_for(spec, seed=seed, site=s, server_round=r) for s in range(sites) for r in range(1, rounds + 1)]


def test_faults_follow_the_seed_and_the_rates() -> None:
    spec = FaultSpec(crash_rate=0.3, straggle_rate=0.1, corrupt_rate=0.2)

    first, again, other = _schedule(spec, 0), _schedule(spec, 0), _schedule(spec, 1)

    assert first == again and first != other
    n = len(first)
    for kind, rate in (("crash", 0.3), ("straggle", 0.1), ("corrupt", 0.2), (None, 0.4)):
        assert abs(first.count(kind) / n - rate) < 0.03, kind


def test_no_faults_by_default() -> None:
    assert set(_schedule(FaultSpec(), 0)) == {None}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_every_corruption_breaks_what_the_server_checks(corruption: str) -> None:
    arrays = {"w": np.ones((4, 3), np.float32), "b": np.zeros(4, np.float32)}

    bad = corrupt_arrays(arrays, corruption)

    assert np.array_equal(arrays["w"], np.ones((4, 3), np.float32))  # the input is untouched
    if corruption in ("nan", "inf"):
        assert not np.isfinite(bad["w"]).all()
    elif corruption == "shape":
        assert bad["w"].shape == (3, 3)
    else:
        assert {v.dtype for v in bad.values()} == {np.dtype(np.float16)}


def test_mixed_corruption_draws_every_kind() -> None:
    spec = FaultSpec(corrupt_rate=1.0)
    drawn = {corruption_for(spec, seed=0, site=s, server_round=1) for s in range(40)}
    assert drawn == set(CORRUPTIONS)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"faults.crash-rate": 1.5}, "The 'faults.crash-rate' parameter must be a float in [0, 1]. Got 1.5 instead."),
        ({"faults.crash-rate": 0.6, "faults.corrupt-rate": 0.5}, "must sum to at most 1"),
        ({"faults.min-available": 0}, "The 'faults.min-available' parameter must be an int in [1, "),
        ({"faults.round-timeout": 0}, "The 'faults.round-timeout' parameter must be a float in (0, 86400]."),
        ({"faults.corrupt-kind": "nans"}, "Did you mean 'nan'?"),
    ],
)
def test_bad_fault_settings_are_one_sentence(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_run_config(overrides)
    assert message in str(err.value)


def test_binding_names_what_changes_the_numbers_and_leaves_out_what_does_not() -> None:
    base = config_from_run_config({})

    assert base.config_hash(4) != base.config_hash(6)
    assert base.config_hash(4) != config_from_run_config({"faults.crash-rate": 0.1}).config_hash(4)
    for harmless in ({"checkpoint.keep": 9}, {"checkpoint.every": 5}, {"output-dir": "elsewhere"},
                     {"checkpoint.stop-after": 3}, {"checkpoint.keyring": "k"}):
        assert config_from_run_config(harmless).config_hash(4) == base.config_hash(4), harmless
    assert base.binding(4)["num-supernodes"] == 4
