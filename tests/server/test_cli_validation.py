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
