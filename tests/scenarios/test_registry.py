"""Named scenarios: found, described, validated as Flower itself would, one sentence per mistake."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from scenarios.registry import (
    SCENARIO_FOLDER,
    ScenarioError,
    list_scenarios,
    load_scenario,
    read_scenario,
    scenario_names,
)
from sims.config import config_from_run_config

ROOT = Path(__file__).resolve().parents[2]

FEDPROX = """# FedProx at a higher proximal weight
scenario = "fedprox_strong"
strategy = "fedprox"
proximal-mu = 0.5

[privacy]
mode = "client"
"""
COMPARISON = """# FedProx against FedAvg
[sweep]
scenario = "fedprox_strong"
[federation-config]
hospitals = 3
client-resources-num-cpus = 1
[[trials]]
strategy = "fedavg"
[[trials]]
strategy = "fedprox"
"""
PATH_KEYS = ("output-dir", "cache-dir", "checkpoint.keyring", "checkpoint.resume-from")  # resolved to absolute
QUIET = '# Nothing but a name\nscenario = "quiet"\n'


def make_folder(tmp_path: Path) -> Path:
    (tmp_path / "fedprox_strong.toml").write_text(FEDPROX)
    (tmp_path / "fedprox_strong.sweep.toml").write_text(COMPARISON)
    (tmp_path / "quiet.toml").write_text(QUIET)
    (tmp_path / "notes.md").write_text("not a scenario")
    return tmp_path


def test_scenarios_are_listed_sorted_with_description_keys_and_comparison(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)

    scenarios = list_scenarios(folder)

    assert [s.name for s in scenarios] == scenario_names(folder) == ["fedprox_strong", "quiet"]
    fedprox, quiet = scenarios
    assert fedprox.description == "FedProx at a higher proximal weight"
    assert dict(fedprox.run_config) == {"scenario": "fedprox_strong", "strategy": "fedprox", "proximal-mu": 0.5,
                                        "privacy.mode": "client"}
    # flattened exactly as `flwr run --run-config FILE.toml` flattens it
    assert dict(fedprox.run_config) == parse_config_args([str(folder / "fedprox_strong.toml")])
    assert fedprox.path == folder / "fedprox_strong.toml"
    assert fedprox.comparison == folder / "fedprox_strong.sweep.toml"
    assert dict(fedprox.federation_config) == {"hospitals": 3, "client-resources-num-cpus": 1}
    assert (quiet.comparison, dict(quiet.federation_config), dict(quiet.run_config)) == (None, {}, {"scenario": "quiet"})
    with pytest.raises(TypeError):  # read-only
        fedprox.run_config["seed"] = 1  # type: ignore[index]


def test_unknown_name_suggests_the_nearest_and_lists_them(tmp_path: Path) -> None:
    folder = make_folder(tmp_path)

    with pytest.raises(ScenarioError) as err:
        load_scenario("fedprox-strong", folder=folder)

    assert str(err.value) == ("Unknown scenario 'fedprox-strong'. Did you mean 'fedprox_strong'? Known scenarios: "
                              "fedprox_strong, quiet (fedscan scenarios lists them).")
    with pytest.raises(ScenarioError, match="Known scenarios: none"):
        load_scenario("x", folder=tmp_path / "empty")
    assert load_scenario("quiet", folder=folder).name == "quiet"


MISTAKES = {
    # file text -> parts of the one sentence
    "# d\nscenario = 'bad'\n[shift]\nunseen-hospital = 2\n": (
        "Unknown run-config key 'shift.unseen-hospital'.", "Did you mean 'shift.unseen-hospitals'?", "bad.toml"),
    "# d\nscenario = 'bad'\nlr = -1.0\n": ("Scenario file '", "bad.toml': The 'lr' parameter must be a float in (0, 1]"),
    "# d\nscenario = 'other'\n": ("The 'scenario' key of scenario file '", "must be the file's name, 'bad'. "
                                  "Got 'other' instead."),
    "# d\nstrategy = 'fedprox'\n": ("must be the file's name, 'bad'. Got None instead.",),
    "# d\nscenario = 'bad'\nseed = \n": ("is not valid TOML", "(at line 3, column 8)", "bad.toml"),
    "# d\nscenario = 'bad'\n[shift]\nunseen-severities = [1.0, 2.0]\n": (
        "The key 'shift.unseen-severities' in scenario file", "Got a list [1.0, 2.0] instead",
        "go in bad.sweep.toml"),
    "# d\nscenario = 'bad'\n[[trials]]\nseed = 1\n": ("has [[trials]] entries", "bad.sweep.toml"),
    "# d\nscenario = 'bad'\n[sweep]\nname = 'x'\n": ("Unknown run-config key 'sweep.name'", "bad.sweep.toml"),
    "scenario = 'bad'\n": ("must start with a '# <one-line description>' comment", "Got \"scenario = 'bad'\""),
    "# d\nscenario = 'bad'\nstrategy = 'fedbn'\n": ("'strategy' parameter is \"fedbn\"",),  # a cross-check
}


@pytest.mark.parametrize(("text", "parts"), list(MISTAKES.items()))
def test_each_bad_file_is_one_sentence_naming_the_file(tmp_path: Path, text: str, parts: tuple[str, ...]) -> None:
    (tmp_path / "bad.toml").write_text(text)

    with pytest.raises(ScenarioError) as err:
        load_scenario("bad", folder=tmp_path)

    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "bad.toml") in message
    for part in parts:
        assert part in message, message


def test_a_bad_comparison_federation_names_the_comparison(tmp_path: Path) -> None:
    (tmp_path / "q.toml").write_text('# d\nscenario = "q"\n')
    (tmp_path / "q.sweep.toml").write_text("[federation-config]\nnum-supernodes = [2, 3]\n")

    with pytest.raises(ScenarioError, match=r"The key 'num-supernodes' in comparison file '.*q\.sweep\.toml' must be"):
        load_scenario("q", folder=tmp_path)


def test_a_file_name_that_is_no_scenario_name_says_so(tmp_path: Path) -> None:
    (tmp_path / "Big Shift.toml").write_text('# d\nscenario = "big-shift"\n')

    with pytest.raises(ScenarioError, match="lower-case letters, digits, '_' or '-': rename the file"):
        list_scenarios(tmp_path)


def _pyproject_defaults() -> dict[str, object]:
    return flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])


def test_every_shipped_scenario_is_accepted_by_flower_and_by_fedscan() -> None:
    # What `flwr run . --run-config scenarios/NAME.toml` does: the CLI flattens the file
    # (parse_config_args), the SuperLink refuses undeclared keys (fuse_dicts, check_keys=True),
    # the apps validate the fused config.
    defaults = _pyproject_defaults()
    shipped = list_scenarios()
    assert "domain_shift" in [s.name for s in shipped]
    for scenario in shipped:
        assert scenario.path.parent == SCENARIO_FOLDER and scenario.description
        overrides = parse_config_args([str(scenario.path)])
        fused = fuse_dicts(defaults, overrides, check_keys=True)
        config = config_from_run_config(fused)
        assert config.scenario == scenario.name
        assert overrides == dict(scenario.run_config)


def test_flower_would_refuse_an_undeclared_key_and_so_does_the_registry(tmp_path: Path) -> None:
    # The guard the test above relies on: the day a scenario file gains an undeclared key,
    # Flower's own check fails, and the registry says so first.
    (tmp_path / "extra.toml").write_text('# d\nscenario = "extra"\n[shift]\nseverity-jitter = 0.1\n')

    with pytest.raises(ValueError, match="Key 'shift.severity-jitter' is not present"):
        fuse_dicts(_pyproject_defaults(), parse_config_args([str(tmp_path / "extra.toml")]), check_keys=True)
    with pytest.raises(ScenarioError, match="Unknown run-config key 'shift.severity-jitter'"):
        read_scenario(tmp_path / "extra.toml")


def test_every_shipped_comparison_expands_and_carries_its_scenario() -> None:
    from server.sweep_spec import count_trials, load_sweep

    for scenario in list_scenarios():
        if scenario.comparison is None:
            continue
        spec = load_sweep(scenario.path, project=ROOT)
        assert spec.scenario == scenario.name and spec.file == scenario.comparison
        assert len(spec.trials) == count_trials(scenario.comparison) > 0
        # the scenario's keys, then the comparison's own [run-config], then what each trial sets
        own = flatten_dict(tomllib.loads(scenario.comparison.read_text()).get("run-config", {}))
        base = {k: v for k, v in {**scenario.run_config, **own}.items() if k not in PATH_KEYS}
        for trial in spec.trials:
            for key, value in base.items():
                assert key in spec.swept_keys or trial.resolved[key] == value, (key, trial.label())
