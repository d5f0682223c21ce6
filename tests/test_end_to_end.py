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
