"""The launcher library: validation before anything starts, isolated launch environments,
and a process sweep that ends everything a launch started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from server.launcher import (
    EXIT_TIMEOUT,
    FEDERATION_KEYS,
    LAUNCH_ID_ENV,
    LaunchPlan,
    ProcessSweeper,
    UserError,
    become_subreaper,
    flower_env,
    launch,
    new_launch_id,
    prepare,
    ray_tmpdir,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "num-server-rounds": 2, "image-size": 32, "unet-channels": "8,16", "patients-per-hospital": 20,
    "holdout-per-hospital": 4,
}
# The longest suffix Ray appends to RAY_TMPDIR for an AF_UNIX socket (Linux limit: 107 bytes).
RAY_SOCKET_SUFFIX = "/ray/session_2026-11-29_03-51-04_123456_4194304/sockets/plasma_store"


@pytest.mark.parametrize(
    ("run_config", "federation", "expected"),
    [
        ({"lr": -1.0}, {}, "The 'lr' parameter must be a float in (0, 1]. Got -1.0 instead."),
        ({"num-server-round": 3}, {}, "Did you mean 'num-server-rounds'?"),
        ({}, {"num-supernodes": 0}, "must be an int >= 1. Got 0 instead."),
        ({}, {"num-supernode": 2}, "Did you mean 'num-supernodes'?"),
        ({"privacy.mode": "sample", "privacy.delta": 0.9}, {"num-supernodes": 2}, "'privacy.delta'"),
    ],
)
def test_invalid_launch_raises_one_sentence_before_anything_starts(
    run_config: dict[str, object], federation: dict[str, object], expected: str, tmp_path: Path
) -> None:
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}

    with pytest.raises(UserError) as err:
        launch({**TINY, **run_config}, federation, project=ROOT, home=tmp_path / "home", timeout=30)

    assert expected in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "home").exists()  # no Flower home, no staged app, no log
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children_before


def test_prepare_resolves_paths_and_federation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    plan = prepare({**TINY, "output-dir": "out"}, {"num-supernodes": 3}, project=ROOT)

    assert isinstance(plan, LaunchPlan) and plan.num_hospitals == 3
    assert plan.run_config["output-dir"] == str(tmp_path / "out")
    assert plan.federation_config == {"num-supernodes": 3, "client-resources-num-cpus": 1}
    # one --run-config string with every override, TOML literals
    assert "unet-channels=\"8,16\"" in plan.run_config_arg() and "num-server-rounds=2" in plan.run_config_arg()
    assert set(plan.federation_config) <= set(FEDERATION_KEYS)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("project", [ROOT, Path("/tmp") / ("deep-" * 30) / "fedscan"])
def test_two_launch_environments_share_nothing(project: Path) -> None:
    a = flower_env(project, launch_id=new_launch_id(), env_overrides={"RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": "1"})
    b = flower_env(project, launch_id=new_launch_id())

    for key in ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT", "FLWR_HOME", "RAY_TMPDIR",
                LAUNCH_ID_ENV):
        assert a[key] != b[key], key
    assert {a["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"], a["FLWR_LOCAL_CONTROL_API_PORT"]}.isdisjoint(
        {b["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"], b["FLWR_LOCAL_CONTROL_API_PORT"]}
    )
    for env in (a, b):
        assert env["RAY_ADDRESS"] == "local"  # a bare ray.init() starts its own cluster
        assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1" and env["FLWR_TELEMETRY_ENABLED"] == "0"
        assert len((env["RAY_TMPDIR"] + RAY_SOCKET_SUFFIX).encode()) <= 107
        assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)  # flower-superlink found
    assert a["RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES"] == "1"
    assert "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES" not in b or b[
        "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES"
    ] == os.environ.get("RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES")
    assert ray_tmpdir(project) != ray_tmpdir(project, "0123456789abcdef")


_ORPHAN_TREE = r"""
import os, signal, subprocess, sys, time
# A child that leaves an orphan behind in its own session, ignoring SIGTERM, as Ray's
# raylet and Flower's simulation process could: the parent-pid watchdog alone is not enough.
code = "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); os.setsid(); time.sleep(120)"
orphan = subprocess.Popen([sys.executable, "-c", code])
print(orphan.pid, flush=True)
os._exit(0)
"""


def test_sweeper_ends_orphans_that_ignore_sigterm(tmp_path: Path) -> None:
    assert become_subreaper()
    launch_id = new_launch_id()
    env = {**os.environ, LAUNCH_ID_ENV: launch_id}
    sweeper = ProcessSweeper(launch_id)
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN_TREE], env=env, stdout=subprocess.PIPE, text=True)
    sweeper.add_root(parent.pid)
    assert parent.stdout is not None
    orphan_pid = int(parent.stdout.readline())
    parent.wait(timeout=10)
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # no tag: must survive
    deadline = time.monotonic() + 5
    while psutil.Process(orphan_pid).ppid() != os.getpid() and time.monotonic() < deadline:
        time.sleep(0.05)

    try:
        assert psutil.Process(orphan_pid).ppid() == os.getpid()  # re-parented to us, the subreaper
        started = time.monotonic()
        ended = sweeper.stop(grace=0.5)
        took = time.monotonic() - started

        assert orphan_pid in ended and not psutil.pid_exists(orphan_pid)  # SIGKILL after the grace
        assert took < 5.0
        assert unrelated.poll() is None
    finally:
        unrelated.kill()
        unrelated.wait()
        if psutil.pid_exists(orphan_pid):
            os.kill(orphan_pid, signal.SIGKILL)


@pytest.mark.e2e
def test_launch_timeout_stops_everything_and_says_124(tmp_path: Path) -> None:
    config = {**TINY, "output-dir": str(tmp_path / "out"), "cache-dir": str(tmp_path / "cache")}

    result = launch(config, {"num-supernodes": 2}, project=ROOT, timeout=6.0)

    assert result.exit_code == EXIT_TIMEOUT and result.status == "timed out"
    assert result.wall_s < 6.0 + 15.0  # the limit, plus SIGTERM's grace and the sweep
    assert result.launch_id and result.superlink_log is not None and result.superlink_log.exists()
    left = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(LAUNCH_ID_ENV) == result.launch_id and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.Error:
            pass
    assert left == []
    assert not Path(flower_env(ROOT, launch_id=result.launch_id)["RAY_TMPDIR"]).exists()
