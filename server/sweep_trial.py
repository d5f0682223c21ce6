"""One sweep trial, as it runs inside a Ray task: a process-isolated ``fedscan run``.

:func:`run_trial` is the body of the Ray task. It runs the trial through
:func:`server.launcher.launch` (a private SuperLink and a private Flower Ray in child
processes, never Flower inside this worker: Flower's simulation calls a bare ``ray.init()``
and ``ray.shutdown()``, which would poison the worker) and returns everything the driver
records *as a value*: cluster nodes share no disk, so the driver never reads a trial's
folder.

The worker's environment is cleaned before the launch: Ray gives its workers ``RAY_*``
variables (job id, raylet pid) and ``OMP_NUM_THREADS`` = the task's CPUs; the first could
make Flower's Ray attach to the sweep's cluster, the second would change the hospitals'
thread count and so their floating-point results against a standalone ``fedscan run``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

OBJECT_STORE_BYTES = 256 * 1024**2
"""Object-store cap of each trial's own Flower Ray (a local Ray otherwise reserves 30% of RAM)."""

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
DROPPED_ENV = ("OMP_NUM_THREADS", "PYTHONBREAKPOINT")
LOG_TAIL = 60

STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"
STATUS_TIMED_OUT = "timed out"
STATUS_INTERRUPTED = "interrupted"
STATUS_ERROR = "error"


def trial_env(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without what a Ray worker adds (``RAY_*``, ``OMP_NUM_THREADS``, ...).

    ``CUDA_VISIBLE_DEVICES`` stays: Ray sets it to the GPUs it assigned to the task.
    """
    return {k: v for k, v in environ.items() if not k.startswith("RAY_") and k not in DROPPED_ENV}


def node_info() -> dict[str, Any]:
    """This node's Ray id, host name, IP and the GPUs Ray assigned to the task (inside a Ray worker)."""
    info: dict[str, Any] = {"hostname": socket.gethostname(), "node_id": "", "ip": "", "gpu_ids": []}
    try:
        import ray

        if ray.is_initialized():
            info["node_id"] = ray.get_runtime_context().get_node_id()
            info["ip"] = ray.util.get_node_ip_address()
            info["gpu_ids"] = [str(g) for g in ray.get_gpu_ids()]  # also in CUDA_VISIBLE_DEVICES
    except Exception:  # noqa: BLE001 - outside Ray there is no node id; never fail a trial on it
        pass
    return info


SCENARIO_TABLES = ("ood.csv", "robustness.csv", "timings.csv")


def _rows(path: Path) -> list[list[str]]:
    """A CSV file's rows (header first), or [] when the run did not write it."""
    try:
        with path.open(newline="") as f:
            return [row for row in csv.reader(f)]
    except (OSError, csv.Error):
        return []


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class StopFlag:
    """A flag the driver sets to stop every trial (a Ray actor; each trial polls it every second).

    Trials stop their launch themselves and return their results (``interrupted``), so the
    driver knows when every process of a trial is gone. A flag that cannot be reached any
    more (its owner, the driver, died) also stops the trial.
    """

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


def _stop_requested(flag: Any) -> bool:
    """Whether the driver's :class:`StopFlag` is set, or gone with the driver."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        return bool(ray.get(flag.is_set.remote(), timeout=10))
    except GetTimeoutError:  # a busy node: ask again next time
        return False
    except RayActorError:
        return True


def run_trial(payload: Mapping[str, Any], cancel: threading.Event | None = None) -> dict[str, Any]:
    """Run one trial and return its results (the Ray task's body; also callable directly).

    Parameters
    ----------
    payload : mapping
        ``trial`` (id), ``project``, ``run_config``, ``federation``, ``timeout_s``,
        ``launch_id``, ``code_digest`` (the driver's; a node with other code refuses),
        ``grace`` and ``stop_flag`` (a :class:`StopFlag` actor handle), optional.
    cancel : threading.Event, optional
        Set to stop the trial. Inside Ray, the driver sets ``stop_flag`` instead (and
        ``ray.cancel`` raises ``KeyboardInterrupt`` here); either way every process of the
        launch is stopped before this returns.

    Returns
    -------
    dict
        ``status``, ``exit_code``, ``error``, ``run_dir``, ``node``, ``wall_s``,
        ``peak_rss_bytes``, ``started_at``, ``ended_at``, ``log_tail``, ``config``
        (the run's config.json), ``metrics`` and ``privacy`` (CSV rows, header first).
    """
    from common.sampling import TreeMemory
    from server.launcher import EXIT_OK, EXIT_TIMEOUT, LaunchPlan, RunResult, code_digest, launch

    started = time.time()
    base: dict[str, Any] = {
        "trial": payload["trial"], "node": node_info(), "started_at": _stamp(started), "launch_id": payload["launch_id"],
        "run_dir": None, "config": None, "metrics": [], "privacy": [], "peak_rss_bytes": None, "log_tail": [],
    }

    def ended(status: str, exit_code: int, error: str | None, **more: Any) -> dict[str, Any]:
        return {**base, "status": status, "exit_code": exit_code, "error": error, "wall_s": time.time() - started,
                "ended_at": _stamp(time.time()), **more}

    project = Path(payload["project"])
    if not (project / "pyproject.toml").is_file():
        return ended(STATUS_ERROR, 2, f"no fedscan project at '{project}' on node {base['node']['hostname']}: "
                     "every node needs the same code at the same path")
    digest = code_digest(project)
    if digest != payload["code_digest"]:
        return ended(STATUS_ERROR, 2, f"the code at '{project}' on node {base['node']['hostname']} differs from "
                     f"the driver's (digest {digest[:12]} != {payload['code_digest'][:12]})")

    plan = LaunchPlan(project, dict(payload["run_config"]), dict(payload["federation"]))
    cancel = cancel or threading.Event()
    outcome: list[RunResult | BaseException] = []

    def body() -> None:
        try:
            outcome.append(launch(
                plan, project=project, timeout=float(payload["timeout_s"]), cancel=cancel,
                launch_id=payload["launch_id"], env_base=trial_env(os.environ),
                env_overrides={"RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": str(OBJECT_STORE_BYTES)},
                grace=float(payload.get("grace", 3.0)),
            ))
        except BaseException as err:  # noqa: BLE001 - reported as the trial's error
            outcome.append(err)

    # The launch runs in a thread: ray.cancel's KeyboardInterrupt then lands here, in a
    # join, never half-way through the launch's own clean-up.
    with TreeMemory(os.getpid(), interval=1.0, include_root=False) as memory:
        worker = threading.Thread(target=body, name=f"trial-{payload['trial']}", daemon=True)
        worker.start()
        flag, asked = payload.get("stop_flag"), time.monotonic()
        while worker.is_alive():
            try:
                worker.join(0.5)
                if flag is not None and not cancel.is_set() and time.monotonic() - asked >= 1.0:
                    asked = time.monotonic()
                    if _stop_requested(flag):
                        cancel.set()
            except KeyboardInterrupt:
                cancel.set()
    base["peak_rss_bytes"] = memory.peak or None
    result = outcome[0] if outcome else RuntimeError("the launch thread returned nothing")
    if isinstance(result, BaseException):
        return ended(STATUS_ERROR, 1, f"{type(result).__name__}: {result}")

    base["log_tail"] = [_ANSI.sub("", line) for line in result.log_tail[-LOG_TAIL:]]
    if result.run_dir is not None:
        base["run_dir"] = str(result.run_dir)
        base["config"] = _json(result.run_dir / "config.json")
        base["metrics"] = _rows(result.run_dir / "metrics.csv")
        base["privacy"] = _rows(result.run_dir / "privacy.csv")
        # The scenarios' own tables (small), and wall-clock timings, for the sweep report.
        base["tables"] = {
            name: rows for name in SCENARIO_TABLES if (rows := _rows(result.run_dir / name))
        }
    if result.exit_code == EXIT_OK:
        return ended(STATUS_COMPLETED, 0, None)
    if result.exit_code == EXIT_TIMEOUT:
        return ended(STATUS_TIMED_OUT, result.exit_code, f"did not finish within {float(payload['timeout_s']):g} s")
    if result.exit_code > 128 or cancel.is_set():
        return ended(STATUS_INTERRUPTED, result.exit_code, "stopped by the sweep (Ctrl-C or SIGTERM)")
    return ended(STATUS_FAILED, result.exit_code, _error_line(result.status, result.log_tail))


def _error_line(status: str, tail: list[str]) -> str:
    """The run's status; when it names no exception, also the log's last error line."""
    if "exception" in status.lower():
        return status
    errors = [_ANSI.sub("", line).strip() for line in tail if "Error" in line or "ERROR" in line]
    errors = [line for line in errors if "Exit Code" not in line]
    return f"{status}; {errors[-1]}" if errors else status


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
