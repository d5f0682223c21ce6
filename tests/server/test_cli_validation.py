"""`fedscan run` refuses bad input before any training: one line, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.cli import EXIT_USER_ERROR, main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-c", "strategy='fedsgd'"], "The 'strategy' parameter must be one of fedavg, fedprox, fedadam, fedbn, local, pooled. Got 'fedsgd'"),
        (["-c", "lr=-0.01"], "The 'lr' parameter must be a float in (0, 1]. Got -0.01 instead."),
        (["-c", "image-size=50"], "'image-size'"),
        (["-c", "num-server-round=3"], "Did you mean 'num-server-rounds'?"),
        (["--hospitals", "0"], "The number of hospitals ('num-supernodes') must be an int >= 1. Got 0 instead."),
        (["--federation-config", "num-supernodes=0"], "Got 0 instead."),
        (["--federation-config", "num-supernode=4"], "Did you mean 'num-supernodes'?"),
        (["-c", "missing.toml"], "does not exist"),
    ],
)
def test_user_errors_exit_2_with_one_clear_line(
    args: list[str], expected: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)

    code = main(["run", *args])

    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert expected in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_not_a_fedscan_project(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(tmp_path)])

    assert code == EXIT_USER_ERROR
    assert "No pyproject.toml" in capsys.readouterr().err


def test_run_config_lines_merge_nested_keys() -> None:
    from server.cli import _parse_pairs

    merged = _parse_pairs(["privacy.mode='sample' lr=0.01", "privacy.delta=1e-6", "lr=0.02"], "run config")

    assert merged == {"privacy.mode": "sample", "privacy.delta": 1e-6, "lr": 0.02}


def test_report_rebuilds_from_run_files_and_refuses_a_missing_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.outputs import MetricRow, RunOutputs

    out = RunOutputs.create(tmp_path, "r")
    out.write_config({"privacy": {"mode": "off", "target_epsilon": None, "delta": 1e-5}}, seed=0, num_hospitals=1)
    out.add([MetricRow(1, "0", "test", "dice_mean", 0.5)])

    assert main(["report", str(out.run_dir)]) == 0
    assert "Privacy was off in this run." in (out.run_dir / "privacy_report.md").read_text()
    assert (out.run_dir / "privacy_report.html").exists()

    assert main(["report", str(tmp_path / "nope")]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "nope" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            "privacy.mode='sample' privacy.target-epsilon=1.0 privacy.calibrate-noise=false privacy.noise-multiplier=0.3",
            "cannot be met with the planned steps: one round of hospital 0",
        ),
        ("privacy.mode='sample' privacy.delta=0.5", "'privacy.delta' parameter must be below 1 / (patients"),
        ("privacy.mode='sample' privacy.target-epsilon=-2", "The 'privacy.target-epsilon' parameter must be a float in (0, inf)"),
        ("privacy.mode='sample' privacy.max-grad-norm=0", "The 'privacy.max-grad-norm' parameter must be a float in (0, 1e+06]"),
        ("privacy.mode='sample' privacy.noise-multiplier=-1", "The 'privacy.noise-multiplier' parameter must be a float"),
    ],
)
def test_privacy_mistakes_stop_before_training(
    config: str, expected: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)

    code = main(["run", "-c", config])

    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_dry_run_prints_resolved_configs_and_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tomllib

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "not-yet" / "out"

    code = main(["run", str(ROOT), "--dry-run", "--hospitals", "3", "-c", f"num-server-rounds=2 output-dir='{out}'",
                 "-c", "privacy.mode='client' privacy.delta=1e-6"])

    captured = capsys.readouterr()
    printed = tomllib.loads(captured.out)  # the printout is valid TOML
    assert code == 0 and captured.err == ""
    assert printed["federation-config"] == {"num-supernodes": 3, "client-resources-num-cpus": 1}
    run = printed["run-config"]
    assert run["num-server-rounds"] == 2 and run["output-dir"] == str(out)
    assert run["privacy"]["mode"] == "client" and run["privacy"]["delta"] == 1e-6  # both -c kept
    assert run["cache-dir"] == str(tmp_path / ".cache" / "fedscan")  # relative paths: absolute
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the output folder


@pytest.mark.parametrize(
    "args",
    [
        ["--hospitals", "two"],
        ["-c", "lr=-1"],
        ["-c", "lr=[1, 2]"],
        ["-c", "not a pair"],
        ["-c", "seed=1979-05-27"],
        ["--federation-config", "num-supernodes=-3"],
        ["-c", "privacy.mode='sample' privacy.noise-multiplier=0 privacy.delta=0.9"],  # warning + error
    ],
)
def test_dry_run_errors_are_one_line_on_stderr(
    args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)

    code = main(["run", "--dry-run", *args])

    captured = capsys.readouterr()
    assert code == EXIT_USER_ERROR and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("fedscan: error: ")


def test_dry_run_imports_no_torch_and_is_fast() -> None:
    import subprocess
    import sys

    code = (
        "import sys, time; from server.cli import main; "
        "t = time.perf_counter(); rc = [main(['run', '--dry-run', '-c', f'seed={i}']) for i in range(20)]; "
        "dt = (time.perf_counter() - t) / 20; "
        "print(rc == [0] * 20, 'torch' in sys.modules, 'monai' in sys.modules, dt, file=sys.stderr)"
    )

    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)

    ok, torch_loaded, monai_loaded, seconds = proc.stderr.split()[-4:]
    assert (ok, torch_loaded, monai_loaded) == ("True", "False", "False"), proc.stderr
    assert float(seconds) < 0.1  # ~3 ms a call here; the fuzzer calls it thousands of times


def _scenario_project(tmp_path: Path) -> Path:
    """A project folder: fedscan's pyproject.toml and a scenarios/ folder with one scenario and its comparison."""
    project = tmp_path / "project"
    (project / "scenarios").mkdir(parents=True)
    (project / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    (project / "scenarios" / "strong_prox.toml").write_text(
        '# FedProx, strong pull\nscenario = "strong_prox"\nstrategy = "fedprox"\nproximal-mu = 0.5\nseed = 7\n'
        '[privacy]\nmode = "client"\n')
    (project / "scenarios" / "strong_prox.sweep.toml").write_text(
        '[sweep]\nscenario = "strong_prox"\n[federation-config]\nhospitals = 3\n[grid]\nseed = [0, 1, 2]\n'
        '[[trials]]\nlr = 0.001\n[[trials]]\nlr = 0.01\n')
    (project / "scenarios" / "alone.toml").write_text('# Nothing to compare\nscenario = "alone"\n')
    return project


def test_run_scenario_dry_run_starts_from_the_scenario_and_options_win(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import tomllib

    project = _scenario_project(tmp_path)
    monkeypatch.chdir(tmp_path)

    code = main(["run", str(project), "--scenario", "strong_prox", "--dry-run", "-c", "seed=11",
                 "-c", "privacy.delta=1e-6"])

    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "scenario 'strong_prox'" in captured.out.splitlines()[1]
    printed = tomllib.loads(captured.out)
    run = printed["run-config"]
    assert (run["scenario"], run["strategy"], run["proximal-mu"]) == ("strong_prox", "fedprox", 0.5)
    assert run["seed"] == 11  # -c wins over the scenario
    assert run["privacy"] == {**run["privacy"], "mode": "client", "delta": 1e-6}  # merged key by key
    assert printed["federation-config"]["num-supernodes"] == 3  # the comparison's federation

    assert main(["run", str(project), "--scenario", "strong_prox", "--dry-run", "--hospitals", "2"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["federation-config"]["num-supernodes"] == 2
    assert main(["run", str(project), "--scenario", "alone", "--dry-run"]) == 0
    assert tomllib.loads(capsys.readouterr().out)["federation-config"]["num-supernodes"] == 4  # the default
    # The scenario file as a plain -c file (what flwr run --run-config takes) gives the same run config.
    assert main(["run", str(project), "--dry-run", "-c", str(project / "scenarios" / "strong_prox.toml")]) == 0
    assert tomllib.loads(capsys.readouterr().out)["run-config"] == {**run, "seed": 7, "privacy": {
        **run["privacy"], "delta": 1e-5}}
    assert list(tmp_path.iterdir()) == [project]  # nothing written


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        ("strong-prox", "Unknown scenario 'strong-prox'. Did you mean 'strong_prox'? Known scenarios: alone, "
                        "badfed, broken, strong_prox (fedscan scenarios lists them)."),
        ("broken", "Unknown run-config key 'shift.unseen-hospital'. Did you mean 'shift.unseen-hospitals'?"),
        ("badfed", "[federation-config]: Unknown federation-config key 'num-supernode'."),
    ],
)
def test_run_scenario_mistakes_exit_2_with_one_line(
    tmp_path: Path, scenario: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    project = _scenario_project(tmp_path)
    (project / "scenarios" / "broken.toml").write_text('# b\nscenario = "broken"\nshift.unseen-hospital = 1\n')
    (project / "scenarios" / "badfed.toml").write_text('# b\nscenario = "badfed"\n')
    (project / "scenarios" / "badfed.sweep.toml").write_text('[federation-config]\nnum-supernode = 3\n')

    code = main(["run", str(project), "--scenario", scenario, "--dry-run"])

    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_scenarios_lists_each_with_what_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    project = _scenario_project(tmp_path)

    assert main(["scenarios", "--project", str(project)]) == 0

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split(None, 1) == ["alone", "Nothing to compare"]
    assert lines[1].split() == ["fedscan", "run", "--scenario", "alone"]
    assert lines[2].split(None, 1) == ["strong_prox", "FedProx, strong pull"]
    assert lines[3].strip() == ("fedscan run --scenario strong_prox  |  fedscan sweep scenarios/strong_prox.toml "
                                "(6 trials)")
    assert len(lines) == 4

    (project / "scenarios" / "typo.toml").write_text('# t\nscenario = "typo"\nseeds = 1\n')
    assert main(["scenarios", "--project", str(project)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Unknown run-config key 'seeds'" in err and "typo.toml" in err and len(err.strip().splitlines()) == 1
    assert main(["scenarios", "--project", str(tmp_path)]) == EXIT_USER_ERROR
    assert "No scenarios folder in" in capsys.readouterr().err
