"""Stopping `fedscan run` at any moment ends every process it started (issue 7, item 10).

Each case starts a real `fedscan run` (2 hospitals, tiny config) with a marker variable in
its environment, which every process it starts inherits, records the pids of all its
descendants while it runs, sends SIGTERM at one moment of the run, and checks by pid that
within a few seconds of the command's exit no process carrying the marker and none of the
recorded descendants is left: SuperLink, SuperExec, ServerApp/simulation engine, Ray's
gcs_server, raylet and workers. `fedscan run` exits with 128 + the signal number (143).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
FEDSCAN = str(Path(sys.executable).parent / "fedscan")
TINY = (
    "num-server-rounds=3 image-size=32 unet-channels='8,16' patients-per-hospital=20 holdout-per-hospital=4 "
    "local-epochs=1"
)
MARK = "FEDSCAN_TEST_INTERRUPT_MARK"


def _marked(mark: str) -> dict[int, str]:
    """Live (non-zombie) processes whose environment carries ``MARK=mark``: pid -> name."""
    found = {}
    for p in psutil.process_iter(["pid", "name"]):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get(MARK) == mark:
                found[p.pid] = p.info["name"]
        except psutil.Error:
            pass
    return found


class _Recorder(threading.Thread):
    """Records (pid, start time, latest command line) of every descendant of ``pid`` every 0.1 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.done = pid, threading.Event()
        self.seen: dict[tuple[int, float], str] = {}

    def run(self) -> None:
        while not self.done.is_set():
            try:
                for child in psutil.Process(self.pid).children(recursive=True):
                    try:  # the latest command line: a child sampled between fork and exec shows its parent's
                        cmdline = " ".join(child.cmdline())[:300]
                        key = (child.pid, child.create_time())
                        if cmdline or key not in self.seen:
                            self.seen[key] = cmdline
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            time.sleep(0.1)

    def alive(self) -> dict[int, str]:
        left = {}
        for (pid, created), name in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    left[pid] = name
            except psutil.Error:
                pass
        return left


def _interrupt_run(
    tmp_path: Path, trigger: str | None, delay: float
) -> tuple[int, str, dict[str, dict[Any, str]]]:
    """Start a run, SIGTERM it ``delay`` s after ``trigger`` appears in its output (or after start)."""
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")} | {MARK: mark}
    config = f"{TINY} output-dir='{tmp_path / 'out'}' cache-dir='{tmp_path / 'cache'}'"
    proc = subprocess.Popen(
        [FEDSCAN, "run", "--hospitals", "2", "-c", config],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    recorder = _Recorder(proc.pid)
    recorder.start()
    output: list[str] = []
    fired = threading.Event()

    fired_at: list[float] = []

    def fire() -> None:
        if not fired.is_set():
            fired.set()
            fired_at.append(time.monotonic())
            proc.send_signal(signal.SIGTERM)

    timer = threading.Timer(delay, fire) if trigger is None else None
    if timer:
        timer.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        output.append(line)
        if trigger is not None and trigger in line and not fired.is_set():
            threading.Timer(delay, fire).start()
            trigger = None
    code = proc.wait(timeout=60)
    stop_s = time.monotonic() - fired_at[0] if fired_at else float("nan")
    recorder.done.set()
    recorder.join()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and (_marked(mark) or recorder.alive()):
        time.sleep(0.2)
    left: dict[str, dict[Any, str]] = {
        "marked": _marked(mark),
        "descendants": recorder.alive(),
        "seen": dict(recorder.seen),
    }
    print(f"SIGTERM -> exit: {stop_s:.1f} s; {len(recorder.seen)} descendants seen")
    for pid in set(left["marked"]) | set(left["descendants"]):  # never leave them to others
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass
    return code, "".join(output), left


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("trigger", "delay", "moment"),
    [
        (None, 2.0, "SuperLink start-up"),
        ("Successfully started run", 1.0, "ServerApp and Ray start-up"),
        ("[ROUND 1/", 1.5, "a round"),
    ],
)
def test_sigterm_at_any_moment_leaves_no_process(
    tmp_path: Path, trigger: str | None, delay: float, moment: str
) -> None:
    code, output, left = _interrupt_run(tmp_path, trigger, delay)

    assert left["marked"] == {} and left["descendants"] == {}, (
        f"left after SIGTERM at {moment}: {left}\n{output}"
    )
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "interrupted" in output
    if (
        trigger == "[ROUND 1/"
    ):  # the run really was under way: Ray and the simulation were among its processes
        names = " ".join(left["seen"].values())
        assert "raylet" in names and "flower-superlink" in names, names
