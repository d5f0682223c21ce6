"""End to end: `fedscan sweep` on a real two-node Ray cluster, and SIGTERM in the middle of a sweep."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import psutil
import pytest

from server.cli import main as cli_main
from server.launcher import LAUNCH_ID_ENV, free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FEDSCAN = str(BIN / "fedscan")
TINY = {"num-server-rounds": 1, "image-size": 32, "unet-channels": '"8,16"', "patients-per-hospital": 20,
        "holdout-per-hospital": 4, "server-eval-patients": 8}

# Runs the sweep driver with an audit hook that records every file and folder it opens, so
# the test can show results arrived as Ray objects, not by reading the trials' folders.
AUDITED = """
import json, sys
opened = []
def hook(event, args):
    if event in ("open", "os.listdir", "os.scandir", "glob.glob") and args and isinstance(args[0], str):
        opened.append(args[0])
sys.addaudithook(hook)
from server.cli import main
code = main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump(opened, f)
sys.exit(code)
"""


def _env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "RAY_"))}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", **more}


def _sweep_file(path: Path, out: Path, cache: Path, extra: str, federation: str = "num-supernodes = 2") -> Path:
    run = "\n".join(f"{k} = {v}" for k, v in TINY.items())
    path.write_text(f'[sweep]\nname = "e2e"\noutput-dir = "{out}"\ntimeout = 300\n'
                    f'[run-config]\n{run}\ncache-dir = "{cache}"\n[federation-config]\n{federation}\n{extra}')
    return path


def _tree(pids: list[int]) -> dict[int, float]:
    """The processes ``pids`` and all their descendants: pid -> create time."""
    found: dict[int, float] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                found[p.pid] = p.create_time()
        except psutil.Error:
            continue
    return found


def _alive(procs: dict[int, float]) -> list[int]:
    alive = []
    for pid, created in procs.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.Error:
            pass
    return alive


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def _tagged(launch_ids: set[str]) -> list[int]:
    """Processes whose environment carries one of these launch ids."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(LAUNCH_ID_ENV) in launch_ids:
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


@contextmanager
def two_node_cluster(cpus: int = 3) -> Iterator[tuple[str, Path, Path]]:
    """A head and a second node (own temp folder, own CPU count) on this machine; stopped by PID."""
    tag = secrets.token_hex(3)
    head_tmp, node_tmp = Path(f"/tmp/fs-h{tag}"), Path(f"/tmp/fs-n{tag}")  # short: Ray's socket paths
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", str(cpus), "--disable-usage-stats"]
    ray = str(BIN / "ray")
    try:
        subprocess.run([ray, "start", "--head", "--port", str(port), "--temp-dir", str(head_tmp),
                        "--include-dashboard=false", "--ray-client-server-port", str(free_port()), *common],
                       check=True, capture_output=True, env=_env(), timeout=120)
        subprocess.run([ray, "start", "--address", address, "--temp-dir", str(node_tmp), *common],
                       check=True, capture_output=True, env=_env(), timeout=120)
        yield address, head_tmp, node_tmp
    finally:
        roots = [p.pid for p in psutil.process_iter(["cmdline"])
                 if any(str(t) in " ".join(p.info["cmdline"] or []) for t in (head_tmp, node_tmp))]
        procs = _tree(roots)
        for pid in procs:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while _alive(procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in _alive(procs):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(procs) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [_cmdline(p) for p in _alive(procs)]
        for folder in (head_tmp, node_tmp):
            shutil.rmtree(folder, ignore_errors=True)
        assert not left, left


def _cluster_view(address: str) -> dict[str, list]:
    """The cluster's nodes and jobs, asked from a separate driver (itself one job)."""
    code = (
        "import json, logging, ray\n"
        f"ray.init(address={address!r}, logging_level=logging.ERROR, log_to_driver=False)\n"
        "from ray._private import state\n"
        "jobs = [{'pid': j.get('DriverPid'), 'entrypoint': j.get('Entrypoint', '')} for j in state.jobs()]\n"
        "nodes = [n['NodeID'] for n in ray.nodes() if n['Alive']]\n"
        "print(json.dumps({'jobs': jobs, 'nodes': nodes}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.e2e
def test_two_node_cluster_sweep_isolates_trials_and_matches_a_plain_run(tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "cache"
    sweep = _sweep_file(tmp_path / "s.toml", out, cache,
                        "[[trials]]\nseed = 0\n[[trials]]\nseed = 1\nfaults.crash-rate = 1.0\n")
    folder = out / "e2e"
    opened_log = tmp_path / "opened.json"
    with two_node_cluster(cpus=3) as (address, head_tmp, _node_tmp):
        # A plain run side by side, its RAY_TMPDIR pointing at the cluster's temp folder and
        # RAY_ADDRESS=auto: it must start its own Ray, not join the cluster. Same config as trial 1.
        run_config = " ".join(f"{k}={v.replace(chr(34), chr(39)) if isinstance(v, str) else v}"
                              for k, v in TINY.items())
        plain = subprocess.Popen(
            [FEDSCAN, "run", "--hospitals", "2", "-c", f"{run_config} seed=0 output-dir='{tmp_path / 'plain'}' "
             f"cache-dir='{cache}'"], cwd=ROOT, env=_env(RAY_TMPDIR=str(head_tmp), RAY_ADDRESS="auto"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        driver = subprocess.run(
            [sys.executable, "-c", AUDITED, str(opened_log), "sweep", str(sweep), "--address", address],
            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
        plain_out, _ = plain.communicate(timeout=400)
        assert plain.returncode == 0, plain_out[-3000:]

        # One trial completed, the other failed, and the sweep says so at the end (exit 1).
        assert driver.returncode == 1, driver.stdout[-3000:] + driver.stderr[-3000:]
        records = {r["swept"]["faults.crash-rate"]: r for r in map(json.loads, (folder / "trials.jsonl").open())}
        ok, bad = records[0.0], records[1.0]
        assert ok["status"] == "completed" and ok["exit_code"] == 0
        assert bad["status"] == "failed" and "fewer than faults.min-available" in bad["error"]
        assert bad["log_tail"] and ok["peak_rss_bytes"] > 100e6
        assert f"{ok['trial']} completed" in driver.stdout and f"{bad['trial']} failed" in driver.stdout

        # Each trial ran on its own node (3 CPUs each, 3 needed each), both nodes of this cluster.
        view = _cluster_view(address)
        assert {ok["node"]["node_id"], bad["node"]["node_id"]} == set(view["nodes"])
        # No Flower simulation joined the cluster's Ray: its only drivers were the sweep and the view.
        entrypoints = [j["entrypoint"] for j in view["jobs"]]
        assert len(entrypoints) == 2, entrypoints
        assert not any("flwr" in e or "fedscan run" in e for e in entrypoints), entrypoints

        # Results came as Ray objects: the driver never opened anything in the trials' folders.
        opened = json.loads(opened_log.read_text())
        assert opened and not [p for p in opened if p.startswith(f"{folder / 'trials'}{os.sep}")]
        assert Path(ok["run_dir"]).is_dir()  # ... which the trial did write (the same disk, here)

        # Determinism: the trial's metrics equal the plain run's to 1e-6.
        results = pd.read_csv(folder / "results.csv", dtype={"site": str, "trial": str})
        trial = results[(results["trial"] == ok["trial"]) & (results["split"] != "privacy")]
        standalone = pd.read_csv(next((tmp_path / "plain").glob("*-run*")) / "metrics.csv", dtype={"site": str})
        keys = ["round", "site", "split", "metric"]
        merged = trial.merge(standalone, on=keys, suffixes=("_sweep", "_plain"))
        assert len(merged) == len(standalone) == len(trial) > 20
        assert (merged["value_sweep"] - merged["value_plain"]).abs().max() <= 1e-6
        # ... and another seed gives another model: the failed trial's round-0 evaluation differs.
        start = results[(results["round"] == 0) & (results["split"] == "public")].pivot(
            index="metric", columns="trial", values="value")
        assert start.shape == (5, 2) and (start[ok["trial"]] - start[bad["trial"]]).abs().max() > 1e-3

        # --resume keeps the completed trial and reruns the failed one (here: timed out at 3 s).
        before = results[results["trial"] == ok["trial"]].reset_index(drop=True)
        resumed = subprocess.run([FEDSCAN, "sweep", str(sweep), "--address", address, "--resume", "--timeout", "3"],
                                 cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 1, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "(1 already done)" in resumed.stdout and f"{ok['trial']} started" not in resumed.stdout
        records = [json.loads(line) for line in (folder / "trials.jsonl").open()]
        assert sorted((r["trial"], r["status"]) for r in records) == sorted(
            [(ok["trial"], "completed"), (bad["trial"], "timed out")])
        results = pd.read_csv(folder / "results.csv", dtype={"site": str, "trial": str})
        assert not results.duplicated(["trial", *keys]).any()
        pd.testing.assert_frame_equal(results[results["trial"] == ok["trial"]].reset_index(drop=True), before)
        assert not _tagged({r["launch_id"] for r in records})
        for name in ("sweep_report.md", "sweep_report.html"):
            assert bad["trial"] in (folder / name).read_text()
        (folder / "sweep_report.md").unlink()
        assert cli_main(["report", str(folder)]) == 0  # rebuilt from the sweep folder alone
        assert ok["trial"] in (folder / "sweep_report.md").read_text()


@pytest.mark.e2e
def test_sigterm_stops_every_trial_and_everything_it_started(tmp_path: Path) -> None:
    sweep = _sweep_file(tmp_path / "s.toml", tmp_path / "out", tmp_path / "cache",
                        "[grid]\nseed = [0, 1]\n", federation="num-supernodes = 2")
    sweep.write_text(sweep.read_text().replace("num-server-rounds = 1", "num-server-rounds = 50"))
    driver = subprocess.Popen([FEDSCAN, "sweep", str(sweep), "--max-parallel", "2"], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[int, float] = {}
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # until both trials' Flower simulations run
        seen.update(_tree([driver.pid]))
        simulations = [pid for pid in _alive(seen) if "flwr-simulation" in _cmdline(pid)]
        if len(simulations) == 2:
            break
        assert driver.poll() is None, driver.communicate()[0][-3000:]
        time.sleep(0.5)
    time.sleep(3)  # Flower's Ray and the hospitals are starting
    seen.update(_tree([driver.pid]))

    driver.send_signal(signal.SIGTERM)
    output, _ = driver.communicate(timeout=120)

    assert driver.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert not _alive(seen), [_cmdline(p) for p in _alive(seen)]
    records = [json.loads(line) for line in (tmp_path / "out" / "e2e" / "trials.jsonl").open()]
    assert len(records) == 2 and {r["status"] for r in records} == {"interrupted"}
    assert not _tagged({r["launch_id"] for r in records})
    assert "stopping 2 running trial(s)" in output
