"""End to end: `fedscan run` drives a real Flower simulation (SuperLink, Ray, 2 SuperNodes)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import psutil
import pytest

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
def test_two_hospitals_two_rounds_write_complete_finite_outputs(tmp_path: Path) -> None:
    before = _flower_processes()
    out_dir = tmp_path / "outputs"

    proc = _fedscan("--hospitals", "2", "-c", f"{TINY} output-dir='{out_dir}' cache-dir='{tmp_path / 'cache'}'")

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
    holdout = metrics[(metrics["site"] == "global") & (metrics["split"] == "holdout")]
    assert sorted(holdout["round"].unique()) == [0, 1, 2]
    assert (metrics["value"][metrics["metric"].str.startswith("dice")].between(0, 1)).all()
    assert "Final round (2)" in (run_dir / "summary.md").read_text()

    # The SuperLink and everything it started are gone.
    assert _flower_processes() <= before


@pytest.mark.e2e
def test_failed_server_app_exits_nonzero_with_its_error(tmp_path: Path) -> None:
    # A copy of the app whose ServerApp raises: `flwr run --stream` alone would exit 0.
    app = tmp_path / "app"
    for name in ("pyproject.toml", "README.md"):
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_bytes((ROOT / name).read_bytes()) if (ROOT / name).exists() else None
    for package in ("server", "clients", "sims", "privacy", "scenarios"):
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


@pytest.mark.e2e
def test_budget_guard_stops_a_hospital_at_its_target_and_privacy_report_is_written(tmp_path: Path) -> None:
    # Fixed noise 1.88 at q = 8/28 and 8 steps a round gives epsilon 1.71, 2.42, 2.99
    # after rounds 1-3 (delta 1e-3): with a budget of 2.5 each hospital must sit out round 3.
    out_dir = tmp_path / "outputs"
    privacy = (
        "privacy.mode='both' privacy.target-epsilon=2.5 privacy.calibrate-noise=false "
        "privacy.noise-multiplier=1.88 privacy.delta=1e-3 patients-per-hospital=40"
    )

    proc = _fedscan(
        "--hospitals", "2", "-c", TINY, "-c", "num-server-rounds=3",
        "-c", f"{privacy} output-dir='{out_dir}' cache-dir='{tmp_path / 'c'}'",
    )

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "declines round 3 to protect its privacy budget" in proc.stdout
    run_dir = (out_dir / "latest").resolve()
    privacy_csv = pd.read_csv(run_dir / "privacy.csv", dtype={"site": str})
    assert list(privacy_csv.columns) == [
        "round", "site", "participated", "steps", "sample_rate", "noise_multiplier",
        "epsilon_rdp", "epsilon_prv", "delta", "budget_exhausted",
    ]
    hospitals = privacy_csv[privacy_csv["site"] != "client-level"]
    assert len(hospitals) == 2 * 3
    assert (hospitals["epsilon_rdp"] <= 2.5).all()
    for site in ("0", "1"):
        rows = hospitals[hospitals["site"] == site].set_index("round")
        assert rows.loc[[1, 2], "participated"].tolist() == [1, 1]
        assert rows.loc[3, "participated"] == 0 and rows.loc[3, "steps"] == 0
        assert rows.loc[3, "budget_exhausted"] == 1 and rows.loc[2, "budget_exhausted"] == 0
        assert rows.loc[3, "epsilon_rdp"] == rows.loc[2, "epsilon_rdp"]  # sitting out spends nothing
        assert rows.loc[1, "epsilon_rdp"] < rows.loc[2, "epsilon_rdp"]
        assert (rows["epsilon_prv"] <= rows["epsilon_rdp"]).all()
    client = privacy_csv[privacy_csv["site"] == "client-level"]
    assert client["round"].tolist() == [1, 2, 3] and client["epsilon_rdp"].is_monotonic_increasing
    report = (run_dir / "privacy_report.md").read_text()
    assert "ran out of budget in round 3" in report
    assert "data:image/png;base64," in (run_dir / "privacy_report.html").read_text()


@pytest.mark.e2e
def test_stopped_and_resumed_dp_run_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    private = "privacy.mode='sample' privacy.target-epsilon=3 privacy.delta=1e-3 patients-per-hospital=40"
    common = ["--hospitals", "2", "-c", TINY, "-c", f"num-server-rounds=3 {private} cache-dir='{tmp_path / 'c'}'"]

    stopped = _fedscan(*common, "-c", f"output-dir='{tmp_path / 'a'}' checkpoint.stop-after=2")
    first = (tmp_path / "a" / "latest").resolve()
    resumed = _fedscan(*common, "-c", f"output-dir='{tmp_path / 'b'}' checkpoint.resume-from='{first}'")
    whole = _fedscan(*common, "-c", f"output-dir='{tmp_path / 'c2'}'")

    for proc in (stopped, resumed, whole):
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in (first / "checkpoints").iterdir()) == ["round-0001.ckpt", "round-0002.ckpt"]
    assert (first / "keys" / "encryption.key").stat().st_mode & 0o077 == 0
    b, c = (tmp_path / "b" / "latest").resolve(), (tmp_path / "c2" / "latest").resolve()
    m_b, m_c = pd.read_csv(b / "metrics.csv", dtype={"site": str}), pd.read_csv(c / "metrics.csv", dtype={"site": str})
    merged = m_b.merge(m_c, on=["round", "site", "split", "metric"], suffixes=("_resumed", "_whole"))
    assert len(merged) == len(m_c) == len(m_b)
    assert (merged["value_resumed"] - merged["value_whole"]).abs().max() <= 1e-6
    p_b, p_c = pd.read_csv(b / "privacy.csv"), pd.read_csv(c / "privacy.csv")
    pd.testing.assert_frame_equal(p_b, p_c, rtol=1e-9)  # every hospital's epsilon included

    # Bad resumes stop before anything runs: tampered file, other config, wrong keys.
    ckpt = first / "checkpoints" / "round-0002.ckpt"
    original = ckpt.read_bytes()
    tampered = tmp_path / "t" / "checkpoints" / "round-0002.ckpt"
    tampered.parent.mkdir(parents=True)
    data = bytearray(ckpt.read_bytes())
    data[100] ^= 0x01
    tampered.write_bytes(bytes(data))
    (tmp_path / "t" / "keys").symlink_to(first / "keys")
    other_keys = tmp_path / "other"
    subprocess.run([FEDSCAN, "keygen", str(other_keys)], check=True, capture_output=True)
    bad = [
        ("-c", f"checkpoint.resume-from='{tampered}'"),
        ("-c", f"checkpoint.resume-from='{first}' lr=0.01"),
        ("-c", f"checkpoint.resume-from='{first}' checkpoint.keyring='{other_keys}'"),
    ]
    for extra in bad:
        proc = _fedscan(*common, *extra, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("fedscan: error: Cannot resume from") and len(proc.stderr.strip().splitlines()) == 1
    assert ckpt.read_bytes() == original  # nothing overwritten
