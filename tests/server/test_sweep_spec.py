"""Sweep files: grid x list expansion, resources, trial ids, and one sentence per mistake."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from server.cli import main as cli_main
from server.launcher import UserError, stage_app
from server.sweep_spec import count_trials, load_sweep, trial_resources

ROOT = Path(__file__).resolve().parents[2]

BASE = """
[sweep]
name = "s"
output-dir = "{out}"
[run-config]
num-server-rounds = 1
image-size = 32
unet-channels = "8,16"
patients-per-hospital = 20
holdout-per-hospital = 4
[federation-config]
num-supernodes = 2
"""


def write(tmp_path: Path, extra: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(BASE.format(out=tmp_path / "out") + extra)
    return path


def test_list_entries_cross_the_grid_in_order_with_resolved_values(tmp_path: Path) -> None:
    path = write(tmp_path, """
[grid]
seed = [0, 1]
hospitals = [2, 3]
[[trials]]
strategy = "fedavg"
[[trials]]
strategy = "fedprox"
proximal-mu = 0.1
""")
    spec = load_sweep(path, project=ROOT)

    assert len(spec.trials) == 8
    assert spec.swept_keys == ("strategy", "proximal-mu", "seed", "hospitals")
    assert spec.seed_key == "seed"
    first, last = spec.trials[0], spec.trials[-1]
    # a list entry that does not set a swept key shows its resolved (default) value
    assert first.swept == {"strategy": "fedavg", "proximal-mu": 0.01, "seed": 0, "hospitals": 2}
    assert last.swept == {"strategy": "fedprox", "proximal-mu": 0.1, "seed": 1, "hospitals": 3}
    assert [t.swept["hospitals"] for t in spec.trials[:4]] == [2, 3, 2, 3]  # the last grid key varies fastest
    assert last.plan.num_hospitals == 3 and last.plan.run_config["proximal-mu"] == 0.1
    assert len({t.trial_id for t in spec.trials}) == 8
    for t in spec.trials:  # each trial writes under the sweep folder, in its own folder
        assert t.plan.run_config["output-dir"] == str(tmp_path / "out" / "s" / "trials" / t.trial_id)
    assert spec.folder == tmp_path / "out" / "s"


def test_trial_ids_are_stable_and_change_with_config_and_code_only(tmp_path: Path) -> None:
    path = write(tmp_path, "[grid]\nseed = [0, 1]\n")
    ids = [t.trial_id for t in load_sweep(path, project=ROOT).trials]
    assert ids == [t.trial_id for t in load_sweep(path, project=ROOT).trials]

    # Another cache folder or sweep name: same trials (same results).
    moved = write(tmp_path, '[grid]\nseed = [0, 1]\n[[trials]]\ncache-dir = "/tmp/elsewhere"\n', "m.toml")
    assert [t.trial_id for t in load_sweep(moved, project=ROOT).trials] == ids
    # Another value: another trial.
    other = write(tmp_path, "[grid]\nseed = [0, 2]\n", "o.toml")
    other_ids = [t.trial_id for t in load_sweep(other, project=ROOT).trials]
    assert other_ids[0] == ids[0] and other_ids[1] != ids[1]
    # Other code (a copy of the app with one changed line): every id changes.
    copy = stage_app(ROOT, tmp_path / "copy")
    (copy / "sims" / "anatomy.py").write_text((copy / "sims" / "anatomy.py").read_text() + "\n# changed\n")
    assert not set(t.trial_id for t in load_sweep(path, project=copy).trials) & set(ids)
    shutil.rmtree(copy)


def test_resources_follow_the_hospitals_training_at_once() -> None:
    defaults = {"clients-per-round": 0, "privacy.clients-per-round": 0}
    federation = {"num-supernodes": 4, "client-resources-num-cpus": 1}
    fed, cpus, memory, gpus = trial_resources(defaults, federation)
    assert (fed["init-args-num-cpus"], cpus, gpus) == (4, 5, 0.0)  # 4 hospitals + the ServerApp
    assert memory == int((1.0 + 0.6 * 4) * 1024**3)
    fed, cpus, _, _ = trial_resources({**defaults, "clients-per-round": 2}, federation)
    assert (fed["init-args-num-cpus"], cpus) == (2, 3)  # only 2 sampled per round
    fed, cpus, _, _ = trial_resources(defaults, {**federation, "client-resources-num-cpus": 2})
    assert (fed["init-args-num-cpus"], cpus) == (8, 9)
    fed, cpus, memory, _ = trial_resources(defaults, federation, cpus_per_trial=1, memory_per_trial_gb=2.5)
    assert (fed["init-args-num-cpus"], cpus, memory) == (1, 1, int(2.5 * 1024**3))  # one hospital at a time
    fed, cpus, _, _ = trial_resources(defaults, {**federation, "init-args-num-cpus": 2})
    assert (fed["init-args-num-cpus"], cpus) == (2, 3)  # the user's own cap wins
    fed, cpus, _, gpus = trial_resources(defaults, {**federation, "client-resources-num-gpus": 0.5})
    assert (gpus, fed["init-args-num-gpus"]) == (2.0, 2)


MISTAKES = {
    "[grid]\nseeds = [0, 1]\n": ("Unknown key 'seeds' in [grid]", "Did you mean 'seed'?"),
    "[grid]\nseed = []\n": ("The [grid] key 'seed'", "is an empty list"),
    "[grid]\nseed = 3\n": ("The [grid] key 'seed'", "must be a list of values. Got 3 instead"),
    "[grid]\nlr = [0.01, -1.0]\n": ("Trial 2 (lr=-1.0)", "'lr' parameter"),
    "[grid]\nhospitals = [0]\n": ("Trial 1 (hospitals=0)", "must be an int >= 1. Got 0 instead"),
    '[grid]\noutput-dir = ["a"]\n': ("The key 'output-dir' in [grid]", "cannot be swept"),
    "[[trials]]\nprivacy.mode = \"sampel\"\n": ("Trial 1 (privacy.mode=\"sampel\")", "'privacy.mode' parameter"),
    "[[trials]]\nprivacy.mod = \"sample\"\n": ("Unknown key 'privacy.mod' in [[trials]] entry 1",
                                              "Did you mean 'privacy.mode'?"),
    "[[trials]]\nseed = 1\n[[trials]]\nseed = 1\n": ("Trials 1 and 2", "resolve to the same config"),
    "[grids]\nseed = [1]\n": ("Unknown section [grids]", "Did you mean 'grid'?"),
    "[federation-config]\nnum-supernode = 2\n": ("Unknown key 'num-supernode'", "Did you mean 'num-supernodes'?"),
    "[run-config]\nnum-server-round = 2\n": ("Unknown key 'num-server-round' in [run-config]",
                                             "Did you mean 'num-server-rounds'?"),
}


@pytest.mark.parametrize(("extra", "parts"), list(MISTAKES.items()))
def test_each_mistake_is_one_sentence_with_exit_2_and_nothing_written(
    tmp_path: Path, extra: str, parts: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    text = BASE.format(out=tmp_path / "out")
    header = extra.split("\n", 1)[0]
    if header in ("[run-config]", "[federation-config]"):  # TOML forbids a table twice: add to it
        text, extra = text.replace(header + "\n", extra, 1), ""
    path = tmp_path / "s.toml"
    path.write_text(text + extra)

    code = cli_main(["sweep", str(path), "--dry-run", "--project", str(ROOT)])

    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for part in parts:
        assert part in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ('name = "../x"', "The 'name' parameter of [sweep] must be a folder name"),
        ("timeout = 0", "The 'timeout' parameter of [sweep] must be a float in (0, inf)"),
        ("max-parallel = -1", "The 'max-parallel' parameter of [sweep] must be an int in [0, inf)"),
        ("parallel = 2", "Unknown key 'parallel' in [sweep]"),
    ],
)
def test_bad_sweep_settings(tmp_path: Path, sweep: str, message: str) -> None:
    path = tmp_path / "s.toml"
    path.write_text(BASE.format(out=tmp_path / "out").replace('name = "s"', sweep))
    with pytest.raises(UserError) as err:
        load_sweep(path, project=ROOT)
    assert message in str(err.value)


def test_unreadable_files_and_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        (str(tmp_path / "missing.toml"),): "does not exist",
        (str(tmp_path),): "is a folder",
        (str(write(tmp_path, "[grid\n", "bad.toml")),): "is not valid TOML",
        (str(write(tmp_path, "")), "--address", "nowhere"): "The '--address' option must be",
        (str(write(tmp_path, "")), "--timeout", "-3"): "The '--timeout' option must be",
        (str(write(tmp_path, "")), "--max-parallel", "0"): "The '--max-parallel' option must be",
    }
    for args, message in cases.items():
        code = cli_main(["sweep", *args, "--dry-run", "--project", str(ROOT)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_dry_run_prints_the_trial_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[grid]\nseed = [0, 1]\n[[trials]]\nclients-per-round = 1\n")
    assert cli_main(["sweep", str(path), "--dry-run", "--project", str(ROOT)]) == 0
    out = capsys.readouterr().out
    spec = load_sweep(path, project=ROOT)
    for trial in spec.trials:
        assert trial.trial_id in out
    assert "2 valid trials" in out and "cpus" in out
    assert not (tmp_path / "out").exists()
    assert spec.trials[0].cpus == 2  # one hospital at a time + the ServerApp


def test_shipped_sweeps_are_valid() -> None:
    sizes = {}
    for path in sorted((ROOT / "sweeps").glob("*.toml")):
        sizes[path.stem] = len(load_sweep(path, project=ROOT).trials)
    assert sizes == {
        "adv_train_followup": 6, "dp_batch_size": 8, "fedbn_followup": 8, "privacy_utility": 16, "strategies": 18,
        "tta_followup": 4,
    }


SCENARIO = '# Strong FedProx\nscenario = "strong_prox"\nstrategy = "fedprox"\nproximal-mu = 0.5\nseed = 7\n'


def write_scenario(folder: Path, comparison: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "strong_prox.toml").write_text(SCENARIO)
    if comparison is not None:
        (folder / "strong_prox.sweep.toml").write_text(comparison)
    return folder / "strong_prox.toml"


def comparison(out: Path, extra: str = "") -> str:
    sweep = BASE.format(out=out).replace('name = "s"\n', 'scenario = "strong_prox"\n')
    return sweep.replace("[run-config]\n", "[run-config]\nproximal-mu = 0.2\n") + extra


def test_a_scenario_file_runs_its_comparison_on_top_of_the_scenario(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = write_scenario(tmp_path / "scenarios", comparison(tmp_path / "out", "[grid]\nlr = [0.001, 0.01]\n"))

    spec = load_sweep(scenario, project=ROOT)

    assert (spec.scenario, spec.name, spec.file) == ("strong_prox", "strong_prox", scenario.with_name(
        "strong_prox.sweep.toml"))  # the folder is named after the sweep, less ".sweep"
    assert len(spec.trials) == count_trials(spec.file) == 2
    for trial in spec.trials:
        resolved = trial.resolved
        assert (resolved["scenario"], resolved["strategy"], resolved["seed"]) == ("strong_prox", "fedprox", 7)
        assert resolved["proximal-mu"] == 0.2  # the comparison's [run-config] wins over the scenario
        assert trial.plan.run_config["strategy"] == "fedprox"  # what the trial's run gets
    assert cli_main(["sweep", str(scenario), "--dry-run", "--project", str(ROOT)]) == 0
    assert "2 valid trials" in capsys.readouterr().out
    # The trial ids include the scenario's keys: another scenario value, other trials.
    scenario.write_text(SCENARIO.replace("seed = 7", "seed = 8"))
    assert not {t.trial_id for t in load_sweep(scenario, project=ROOT).trials} & {t.trial_id for t in spec.trials}


def test_another_sweep_file_may_start_from_a_scenario(tmp_path: Path) -> None:
    write_scenario(tmp_path / "scenarios", comparison(tmp_path / "out").replace(
        "[federation-config]\nnum-supernodes = 2\n", "[federation-config]\nnum-supernodes = 3\n"))
    path = write(tmp_path, "[grid]\nseed = [0, 1]\n").read_text().replace('name = "s"', 'scenario = "strong_prox"')
    (tmp_path / "mine.toml").write_text(path.replace("[federation-config]\nnum-supernodes = 2\n", ""))

    spec = load_sweep(tmp_path / "mine.toml", project=ROOT, scenarios=tmp_path / "scenarios")

    assert spec.scenario == "strong_prox" and spec.name == "mine"
    assert [t.resolved["strategy"] for t in spec.trials] == ["fedprox", "fedprox"]
    assert [t.resolved["seed"] for t in spec.trials] == [0, 1]  # the grid wins over the scenario
    assert {t.plan.num_hospitals for t in spec.trials} == {3}  # the scenario's comparison's federation


def test_scenario_sweep_mistakes_are_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lonely = write_scenario(tmp_path / "a", None)
    mismatched = write_scenario(tmp_path / "b", comparison(tmp_path / "out").replace(
        'scenario = "strong_prox"', 'scenario = "other"'))
    unknown = write(tmp_path, "").read_text().replace('name = "s"', 'scenario = "strong-prox"')
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "u.toml").write_text(unknown)
    write_scenario(tmp_path / "c" / "scenarios", None)
    cases = {
        lonely: f"Scenario 'strong_prox' compares nothing (no {tmp_path / 'a' / 'strong_prox.sweep.toml'}); "
                "run it with fedscan run --scenario strong_prox.",
        mismatched: "must be 'strong_prox', the scenario beside it. Got 'other' instead.",
        tmp_path / "c" / "u.toml": "Unknown scenario 'strong-prox'. Did you mean 'strong_prox'? Known scenarios: "
                                   "strong_prox (fedscan scenarios lists them).",
    }
    for path, message in cases.items():
        code = cli_main(["sweep", str(path), "--dry-run", "--project", str(tmp_path / "c")
                         if path.parent.name == "c" else str(ROOT)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
