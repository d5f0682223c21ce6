"""End to end: `fedscan run` drives a real Flower simulation (SuperLink, Ray, 2 SuperNodes)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import psutil
import pytest

from server.cli import main as cli_main
from sims.anatomy import class_names

ROOT = Path(__file__).resolve().parents[1]
FEDSCAN = str(Path(sys.executable).parent / "fedscan")
TINY = "num-server-rounds=2 image-size=32 unet-channels='8,16' patients-per-hospital=20 holdout-per-hospital=4"


def _flower_processes() -> set[int]:
    names = ("flower-superlink", "flwr-serverapp", "flwr-simulation", "raylet", "gcs_server")
    found = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(n in cmd for n in names):
            found.add(p.info["pid"])
    return found


def _fedscan(*args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return subprocess.run([FEDSCAN, "run", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.e2e
def test_two_hospitals_two_rounds_write_complete_finite_outputs_beside_a_budget_guarded_run(tmp_path: Path) -> None:
    before = _flower_processes()
    out_dir = tmp_path / "outputs"
    # Two launches side by side: the budget-guarded one idles 30 s waiting for a straggler.
    budget = _start_budget_guarded_run(tmp_path / "budget")

    # FedProx and public pre-training, end to end (FedAdam runs in the resume test below).
    proc = _fedscan(
        "--hospitals", "2", "-c", f"{TINY} output-dir='{out_dir}' cache-dir='{tmp_path / 'cache'}'",
        "-c", "strategy='fedprox' proximal-mu=0.1 privacy.pretrain-epochs=1",
    )

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = (out_dir / "latest").resolve()
    assert f"outputs in {run_dir}" in proc.stdout
    assert "| site |" in proc.stdout  # the result table is printed

    config = json.loads((run_dir / "config.json").read_text())
    assert config["num_hospitals"] == 2 and config["seed"] == 0
    assert config["config"]["world"]["image_size"] == 32
    assert {"torch", "flwr", "monai", "opacus"} <= set(config["versions"])

    metrics = pd.read_csv(run_dir / "metrics.csv", dtype={"site": str})
    assert list(metrics.columns) == ["round", "site", "split", "metric", "value"]
    assert metrics["value"].map(math.isfinite).all()
    expected = {"dice_mean", *(f"dice_{c}" for c in class_names(True)[1:])}
    for site in ("0", "1"):
        for rnd in (1, 2):
            rows = metrics[(metrics["site"] == site) & (metrics["round"] == rnd)]
            assert expected <= set(rows[rows["split"] == "test"]["metric"])
            assert "train_loss" in set(rows[rows["split"] == "train"]["metric"])
    public = metrics[(metrics["site"] == "global") & (metrics["split"] == "public")]
    assert sorted(public["round"].unique()) == [0, 1, 2]
    assert "pre-trained 1 epochs on public data" in proc.stdout
    assert config["config"]["train"]["strategy"] == "fedprox"
    assert pd.read_csv(run_dir / "failures.csv").empty  # a reliable federation: nothing rejected
    assert (metrics["value"][metrics["metric"].str.startswith("dice")].between(0, 1)).all()
    assert "Final round (2)" in (run_dir / "summary.md").read_text()

    _check_budget_guarded_run(tmp_path / "budget", _finish(budget))
    # The SuperLink and everything it started are gone.
    assert _flower_processes() <= before


@pytest.mark.e2e
def test_failed_server_app_exits_nonzero_with_its_error(tmp_path: Path) -> None:
    # A copy of the app whose ServerApp raises: `flwr run --stream` alone would exit 0.
    app = tmp_path / "app"
    for name in ("pyproject.toml", "README.md"):
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_bytes((ROOT / name).read_bytes()) if (ROOT / name).exists() else None
    for package in ("server", "clients", "sims", "privacy", "scenarios", "common"):
        for src in (ROOT / package).rglob("*.py"):
            dst = app / src.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    server_app = app / "server" / "server_app.py"
    server_app.write_text(
        server_app.read_text().replace(
            "    config = config_from_run_config(context.run_config)\n",
            "    config = config_from_run_config(context.run_config)\n"
            "    raise RuntimeError('deliberate failure for the test')\n",
            1,
        )
    )

    proc = subprocess.run(
        [FEDSCAN, "run", str(app), "--hospitals", "2", "-c", f"{TINY} output-dir='{tmp_path / 'out'}'"],
        cwd=app,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "the run failed" in proc.stderr
    assert "deliberate failure for the test" in proc.stderr


def test_unusable_cache_folder_is_refused_before_any_run(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the data cache folder should be")

    proc = _fedscan("--hospitals", "2", "-c", f"cache-dir='{blocker / 'sub'}'", timeout=60)

    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"fedscan: error: The 'cache-dir' parameter must be a folder. Got '{blocker / 'sub'}', but '{blocker}' is a file."
    )


def _start_budget_guarded_run(folder: Path) -> subprocess.Popen[str]:
    """The budget guard: a hospital sits out the round that would overshoot its target, and a
    straggler's late round still spends.

    Fixed noise 1.88 at q = 8/28 and 8 steps a round gives epsilon 1.71, 2.42, 2.99 after rounds
    1-3 (delta 1e-3): with a budget of 2.5 each hospital must sit out round 3. Seed 2 draws one
    fault: hospital 1 straggles in round 1 (trains, then replies after the 30 s deadline); the
    round goes on with hospital 0, and hospital 1's budget is spent.
    """
    privacy = (
        "privacy.mode='both' privacy.target-epsilon=2.5 privacy.calibrate-noise=false "
        "privacy.noise-multiplier=1.88 privacy.delta=1e-3 patients-per-hospital=40 "
        "seed=2 faults.straggle-rate=0.3 faults.round-timeout=30"
    )
    folder.mkdir(parents=True)
    return _start(
        "--hospitals", "2", "-c", TINY, "-c", "num-server-rounds=3",
        "-c", f"{privacy} output-dir='{folder / 'outputs'}' cache-dir='{folder / 'c'}'", log=folder / "run.log",
    )


def _check_budget_guarded_run(folder: Path, output: str) -> None:
    out_dir = folder / "outputs"
    assert "declines round 3 to protect its privacy budget" in output
    run_dir = (out_dir / "latest").resolve()
    privacy_csv = pd.read_csv(run_dir / "privacy.csv", dtype={"site": str})
    assert list(privacy_csv.columns) == [
        "round", "site", "participated", "steps", "sample_rate", "noise_multiplier",
        "epsilon_rdp", "epsilon_prv", "delta", "budget_exhausted",
    ]
    hospitals = privacy_csv[privacy_csv["site"] != "client-level"]
    assert len(hospitals) == 2 * 3
    assert (hospitals["epsilon_rdp"] <= 2.5).all()
    for site in ("0", "1"):  # the straggler's late round 1 counts like the punctual one
        rows = hospitals[hospitals["site"] == site].set_index("round")
        assert rows.loc[[1, 2], "participated"].tolist() == [1, 1]
        assert rows.loc[3, "participated"] == 0 and rows.loc[3, "steps"] == 0
        assert rows.loc[3, "budget_exhausted"] == 1 and rows.loc[2, "budget_exhausted"] == 0
        assert rows.loc[3, "epsilon_rdp"] == rows.loc[2, "epsilon_rdp"]  # sitting out spends nothing
        assert rows.loc[1, "epsilon_rdp"] < rows.loc[2, "epsilon_rdp"]
        assert (rows["epsilon_prv"] <= rows["epsilon_rdp"]).all()
    client = privacy_csv[privacy_csv["site"] == "client-level"]
    assert client["round"].tolist() == [1, 2, 3] and client["epsilon_rdp"].is_monotonic_increasing
    failures = pd.read_csv(run_dir / "failures.csv")
    assert failures[["round", "site", "phase", "kind"]].values.tolist() == [
        [1, 1, "train", "late"], [3, 0, "train", "budget"], [3, 1, "train", "budget"],
    ]
    assert failures["reason"].iloc[0] == "no reply within 30 s"
    trained = pd.read_csv(run_dir / "metrics.csv", dtype={"site": str}).query("metric == 'steps' and site != 'global'")
    # Client-level DP releases nothing from a round short of its sampled updates (round 1).
    assert trained.groupby("round")["site"].apply(sorted).to_dict() == {2: ["0", "1"]}
    assert "round 1: 1 of 2 sampled updates usable; client-level DP releases no update" in output
    report = (run_dir / "privacy_report.md").read_text()
    assert "ran out of budget in round 3" in report
    assert "data:image/png;base64," in (run_dir / "privacy_report.html").read_text()


# One federation that exercises everything a resume must restore: FedAdam's moments,
# client-level DP (and its RNG), sample-level DP ledgers, hospitals sampled per round, and
# hospitals that crash or send corrupt updates; checkpoints every 2 rounds, only 1 kept.
FAULTY = (
    "num-server-rounds=5 image-size=32 unet-channels='8,16' patients-per-hospital=40 holdout-per-hospital=4 "
    "server-eval-patients=8 strategy='fedadam' privacy.mode='both' privacy.target-epsilon=3 privacy.delta=1e-3 "
    "privacy.client-noise-multiplier=1.0 clients-per-round=2 faults.crash-rate=0.2 faults.corrupt-rate=0.2 "
    "faults.round-timeout=60 checkpoint.every=2 checkpoint.keep=1"
)


def _start(*args: str, log: Path | None = None) -> subprocess.Popen[str]:
    """``fedscan run`` in the background; its output to ``log`` (runs side by side) or a pipe."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    out = log.open("w") if log is not None else subprocess.PIPE
    proc = subprocess.Popen(
        [FEDSCAN, "run", *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True
    )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _finish(proc: subprocess.Popen[str], timeout: float = 400) -> str:
    out, _ = proc.communicate(timeout=timeout)
    log: Path | None = proc.log  # type: ignore[attr-defined]
    out = log.read_text() if log is not None else out
    assert proc.returncode == 0, out[-4000:]
    return out


def _kill_mid_round(proc: subprocess.Popen[str], marker: str) -> str:
    """SIGKILL the whole run (every process under it, SuperLink group included) once ``marker`` shows."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            break
    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    groups = set()
    for pid in tree:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            pass
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for group in groups - {os.getpgid(0)}:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    return "".join(seen)


def _tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_csv(run_dir / f"{name}.csv", dtype={"site": str}) for name in ("metrics", "privacy", "failures")}


def _assert_same(resumed: Path, whole: Path) -> None:
    a, b = _tables(resumed), _tables(whole)
    m = a["metrics"].merge(b["metrics"], on=["round", "site", "split", "metric"], suffixes=("_r", "_w"))
    assert len(m) == len(a["metrics"]) == len(b["metrics"])
    assert (m["value_r"] - m["value_w"]).abs().max() <= 1e-6
    pd.testing.assert_frame_equal(a["privacy"], b["privacy"], rtol=1e-6)  # every epsilon included
    pd.testing.assert_frame_equal(a["failures"], b["failures"])


@pytest.mark.e2e
def test_faulty_sampled_run_is_reproducible_and_resumes_exactly_after_a_kill_and_a_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # the in-process CLI checks below resolve the project from here
    before = _flower_processes()
    common = ["--hospitals", "3", "-c", FAULTY, "-c", f"cache-dir='{tmp_path / 'cache'}' seed=2"]
    out = {name: tmp_path / name for name in ("a", "a2", "k", "b2", "b3")}

    # Three launches side by side: two with the same seed, and one that is killed mid-round 4
    # (its last checkpoint: round 2), then resumed twice: 2 -> 4 -> end. (That another seed
    # gives other numbers is checked in tests/test_sweep.py.)
    runs = {name: _start(*common, "-c", f"output-dir='{out[name]}'", log=tmp_path / f"{name}.log") for name in ("a", "a2")}
    killed = _kill_mid_round(_start(*common, "-c", f"output-dir='{out['k']}'"), "[ROUND 4/5]")
    k = (out["k"] / "latest").resolve()
    b2 = _finish(_start(*common, "-c", f"output-dir='{out['b2']}' checkpoint.resume-from='{k}' checkpoint.stop-after=4"))
    logs = {name: _finish(proc) for name, proc in runs.items()}
    b2_dir = (out["b2"] / "latest").resolve()
    # A setting that changes no number (checkpoint.keep) does not block a resume.
    _finish(_start(*common, "-c", f"output-dir='{out['b3']}' checkpoint.resume-from='{b2_dir}' checkpoint.keep=3"))

    a, a2 = ((out[n] / "latest").resolve() for n in ("a", "a2"))
    for name in ("metrics.csv", "privacy.csv", "failures.csv"):
        assert (a / name).read_bytes() == (a2 / name).read_bytes(), name  # same seed: same bytes
    failures = pd.read_csv(a / "failures.csv")
    assert {"crash", "corrupt"} <= set(failures["kind"])  # the faults happened and were rejected
    assert "update rejected" in logs["a"] and "crashed after training" in logs["a"]
    trained = pd.read_csv(a / "metrics.csv", dtype={"site": str}).query("metric == 'steps' and site != 'global'")
    assert trained.groupby("round").size().max() <= 2  # 2 of 3 hospitals sampled per round
    privacy = pd.read_csv(a / "privacy.csv", dtype={"site": str})
    crashed = failures[failures["kind"] == "crash"].iloc[0]
    spent = privacy[(privacy["round"] == crashed["round"]) & (privacy["site"] == str(crashed["site"]))]
    assert spent["participated"].tolist() == [1] and spent["steps"].iloc[0] > 0  # its DP-SGD budget is spent

    assert "[ROUND 4/5]" in killed and "Strategy execution finished" not in killed
    assert sorted(p.name for p in (k / "checkpoints").iterdir()) == ["round-0002.ckpt"]
    assert "resuming after round 2" in b2
    _assert_same((out["b3"] / "latest").resolve(), a)

    # Refused before anything starts, one sentence each: another federation size, another
    # config, a tampered file, wrong keys, a configured keyring without hospital keys.
    other_keys = tmp_path / "other"
    subprocess.run([FEDSCAN, "keygen", str(other_keys)], check=True, capture_output=True)
    ckpt = b2_dir / "checkpoints" / "round-0004.ckpt"
    original = ckpt.read_bytes()
    tampered = tmp_path / "t" / "checkpoints" / "round-0004.ckpt"
    tampered.parent.mkdir(parents=True)
    tampered.write_bytes(original[:100] + bytes([original[100] ^ 1]) + original[101:])
    (tmp_path / "t" / "keys").symlink_to(b2_dir / "keys")
    resume = f"checkpoint.resume-from='{b2_dir}'"
    bad = {
        ("--hospitals", "4", "-c", resume): "it was written with num-supernodes = 3, and this run has num-supernodes = 4",
        ("-c", f"{resume} lr=0.01"): "it was written with lr = 0.003, and this run has lr = 0.01",
        ("-c", f"checkpoint.resume-from='{tampered}'"): "Cannot resume from",
        ("-c", f"{resume} checkpoint.keyring='{other_keys}'"): "Cannot resume from",
        ("-c", f"checkpoint.keyring='{other_keys}'"): f"fedscan keygen {other_keys} --hospitals 3",
    }
    for extra, message in bad.items():  # in-process, and --dry-run: the same checks, nothing starts
        code = cli_main(["run", "--dry-run", *common, *extra])
        err = capsys.readouterr().err
        assert code == 2, err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert ckpt.read_bytes() == original  # nothing overwritten
    assert not any(other_keys.glob("hospital-*"))  # nothing written into a configured keyring
    assert _flower_processes() <= before

