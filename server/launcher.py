"""Start a fedscan run on a private Flower SuperLink, and stop everything it started.

The one place that starts Flower processes: ``fedscan run``, the benchmarks and the sweep
runner all call :func:`launch` (or :func:`prepare` alone, to validate). It handles the
Flower 1.42 traps:

- a fresh ``flower-superlink`` (simulation mode) per launch, on its own ports, never the
  detached one ``flwr run`` would start (which outlives the run and keeps the app code,
  environment and working directory it was first started with);
- its own ``FLWR_HOME`` per launch (Flower's ``install_from_fab`` copies non-atomically into
  it), a short ``RAY_TMPDIR`` per launch (Ray's AF_UNIX socket paths must fit in 107 bytes)
  and ``RAY_ADDRESS=local`` (Flower's bare ``ray.init()`` would otherwise join whatever
  cluster ``RAY_ADDRESS`` or ``$RAY_TMPDIR/ray/ray_current_cluster`` names), so launches
  can run side by side on one machine;
- no runtime dependency installation (it would build a uv environment with a CUDA torch),
  no telemetry, no update check;
- a staged copy of just the app (``flwr run`` walks every file under the app folder, 50,000
  in ``.venv``), one ``--run-config`` string (``flwr`` merges several ``-c`` flags with a
  shallow update, dropping nested keys), and ``flwr ls`` to learn how the run really ended
  (``flwr run --stream`` exits 0 even when the ServerApp failed);
- stopping ends *every* process the launch started, whatever the moment: see
  :class:`ProcessSweeper`.

Validation (keys, values, federation, pre-flight) happens in :func:`prepare`, before
anything starts, and raises :class:`UserError` with one sentence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from common.validation import did_you_mean
from sims.config import ConfigError, check_known_keys, config_from_run_config, privacy_warnings

DEFAULT_HOSPITALS = 4
DEFAULT_CPUS_PER_HOSPITAL = 1
FEDERATION_KEYS = (
    "num-supernodes",
    "client-resources-num-cpus",
    "client-resources-num-gpus",
    "backend",
    "verbose",
    "init-args-num-cpus",
    "init-args-num-gpus",
    "init-args-logging-level",
    "init-args-log-to-driver",
)
EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130  # 128 + SIGINT; a signal gives 128 + its number (143 for SIGTERM)

LAUNCH_ID_ENV = "FEDSCAN_LAUNCH_ID"
"""Environment variable that tags every process of a launch with its launch id."""

APP_PACKAGES = ("server", "clients", "sims", "privacy", "scenarios", "common")
APP_FILES = ("pyproject.toml", "README.md")
LOG_TAIL_LINES = 400


class UserError(Exception):
    """A mistake in what the user asked for: one sentence (the CLI exits with code 2)."""


# --------------------------------------------------------------------------- #
# Validation: nothing starts before this has passed                            #
# --------------------------------------------------------------------------- #


# flwr's own pattern (flwr.common.config.parse_config_args)
_PAIR = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def parse_pairs(values: Sequence[str], what: str) -> dict[str, Any]:
    """Parse ``k=v`` TOML pairs exactly as ``flwr run`` does (or one ``.toml`` file).

    Each string is parsed on its own and the *flattened* pairs merged key by key: flwr's
    own merge is a shallow dict update, which drops ``privacy.mode`` when a later ``-c``
    sets ``privacy.delta``.

    Raises
    ------
    UserError
        A missing file or a string ``flwr`` cannot parse.
    """
    from flwr.common.config import parse_config_args

    for value in values:
        # flwr silently skips whatever is not a key=value pair; a typo must not vanish.
        stray = _PAIR.sub(" ", value).split() if not value.endswith(".toml") else []
        if stray:
            raise UserError(
                f"The {what} {value!r} must be space-separated key=value pairs (or one .toml file). "
                f"Got {stray[0]!r}, which is not a key=value pair."
            )
    try:
        merged: dict[str, Any] = {}
        for value in values:
            merged.update(parse_config_args([value]))
        return merged
    except FileNotFoundError as err:
        raise UserError(f"The {what} file '{err.filename}' does not exist.") from None
    except IsADirectoryError as err:
        raise UserError(f"The {what} file '{err.filename}' is a folder, not a .toml file.") from None
    except Exception as err:  # click.ClickException / ValueError / TOMLDecodeError / OSError
        message = getattr(err, "message", None) or str(err)
        message = " ".join(str(message).split())  # one line, whatever the parser said
        raise UserError(f"Could not parse {what} {list(values)!r}: {message}") from None


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal for ``flwr run --run-config``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def project_defaults(project: Path) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of ``project/pyproject.toml``, flattened.

    Raises
    ------
    UserError
        No ``pyproject.toml`` in ``project``, or no valid table in it.
    """
    path = Path(project) / "pyproject.toml"
    try:
        from flwr.common.config import flatten_dict

        data = tomllib.loads(path.read_text())
        return dict(flatten_dict(data["tool"]["flwr"]["app"]["config"]))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise UserError(f"No pyproject.toml in '{project}': run fedscan from the fedscan project folder.") from None
    except (KeyError, TypeError, ValueError, tomllib.TOMLDecodeError) as err:
        raise UserError(f"'{path}' has no valid [tool.flwr.app.config] table ({err}).") from None


def resolve_run_config(
    project: Path, overrides: Mapping[str, Any], hospitals: int | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Validate run-config overrides against the declared keys; make paths absolute.

    Relative ``output-dir``, ``cache-dir``, ``checkpoint.keyring`` and
    ``checkpoint.resume-from`` are resolved against the current directory, so the
    SuperLink's working directory does not matter. With ``hospitals``, the pre-flight
    checks the ServerApp makes (:func:`server.preflight.preflight`) run here too.

    Returns
    -------
    resolved : dict
        The overrides to hand to ``flwr run``.
    warnings : list of str
        Legal but odd settings (noise 0 with DP on, ...), to show once validation passed.

    Raises
    ------
    UserError
        One sentence naming the key, the value and what is allowed.
    """
    try:
        check_known_keys(list(overrides))
        merged = {**project_defaults(project), **overrides}
        config = config_from_run_config(merged)
    except ConfigError as err:
        raise UserError(str(err)) from None
    resolved = dict(overrides)
    for key in ("checkpoint.resume-from", "checkpoint.keyring"):
        if merged.get(key):
            resolved[key] = str((Path.cwd() / str(merged[key])).resolve())
    if hospitals is not None:
        from server.preflight import preflight

        try:  # the same checks the ServerApp makes, before anything starts
            preflight(config_from_run_config({**merged, **resolved}), hospitals)
        except ConfigError as err:
            raise UserError(str(err)) from None
    for key in ("output-dir", "cache-dir"):
        folder = (Path.cwd() / str(merged[key])).resolve()
        _check_writable_folder(key, folder)
        resolved[key] = str(folder)
    return resolved, privacy_warnings(config)


def _check_writable_folder(key: str, folder: Path) -> None:
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"The '{key}' parameter must be a folder. Got '{folder}', but '{existing}' is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"The '{key}' parameter must be a writable folder. Got '{folder}' ('{existing}' is not writable).")


def resolve_federation(overrides: Mapping[str, Any], hospitals: int | None = None) -> dict[str, Any]:
    """Check federation-config keys and fill the defaults (4 hospitals, 1 CPU each).

    ``hospitals``, when given, overrides ``num-supernodes``.

    Raises
    ------
    UserError
        An unknown key (with the nearest valid one) or a bad hospital or CPU count.
    """
    for key in overrides:
        if key not in FEDERATION_KEYS:
            hint = did_you_mean(str(key), FEDERATION_KEYS)
            raise UserError(f"Unknown federation-config key {str(key)!r}.{hint} Allowed: {', '.join(FEDERATION_KEYS)}.")
    federation = {
        "num-supernodes": DEFAULT_HOSPITALS,
        "client-resources-num-cpus": DEFAULT_CPUS_PER_HOSPITAL,
        **overrides,
    }
    if hospitals is not None:
        federation["num-supernodes"] = hospitals
    n = federation["num-supernodes"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"The number of hospitals ('num-supernodes') must be an int >= 1. Got {n!r} instead.")
    cpus = federation["client-resources-num-cpus"]
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise UserError(f"The 'client-resources-num-cpus' parameter must be an int >= 1. Got {cpus!r} instead.")
    return federation


@dataclasses.dataclass(frozen=True)
class LaunchPlan:
    """A validated launch: what :func:`launch` hands to ``flwr run``.

    Attributes
    ----------
    project : Path
        The fedscan project folder (absolute).
    run_config : dict
        Run-config overrides, paths absolute (the defaults come from ``pyproject.toml``).
    federation_config : dict
        ``num-supernodes``, ``client-resources-num-cpus`` and any other federation keys.
    warnings : tuple of str
        Legal but odd settings, for the caller to show.
    """

    project: Path
    run_config: dict[str, Any]
    federation_config: dict[str, Any]
    warnings: tuple[str, ...] = ()

    @property
    def num_hospitals(self) -> int:
        return int(self.federation_config["num-supernodes"])

    def run_config_arg(self) -> str:
        """All overrides as one ``--run-config`` string (flwr merges several shallowly)."""
        return " ".join(f"{key}={toml_value(value)}" for key, value in self.run_config.items())

    def federation_config_arg(self) -> str:
        return " ".join(f"{key}={toml_value(value)}" for key, value in self.federation_config.items())


def prepare(
    run_config: Mapping[str, Any], federation_config: Mapping[str, Any] | None = None, *, project: Path
) -> LaunchPlan:
    """Validate everything a launch needs (keys, values, federation, pre-flight); start nothing.

    Parameters
    ----------
    run_config : mapping
        Run-config overrides with flattened kebab-case keys, e.g. ``{"privacy.mode": "sample"}``.
    federation_config : mapping, optional
        Federation keys (:data:`FEDERATION_KEYS`); default 4 hospitals, 1 CPU each.
    project : Path
        The fedscan project folder (holds ``pyproject.toml``).

    Raises
    ------
    UserError
        One sentence naming the thing, the value and what is allowed.
    """
    project = Path(project).resolve()
    federation = resolve_federation(dict(federation_config or {}))
    resolved, warnings = resolve_run_config(project, dict(run_config), federation["num-supernodes"])
    return LaunchPlan(project, resolved, federation, tuple(warnings))


# --------------------------------------------------------------------------- #
# The environment of one launch                                               #
# --------------------------------------------------------------------------- #


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Ray puts AF_UNIX sockets under RAY_TMPDIR/ray/session_<date>_<pid>/sockets/plasma_store
# (about 70 more characters); Linux caps such paths at 107 bytes.
_MAX_RAY_TMPDIR = 36


def ray_tmpdir(project: Path, launch_id: str | None = None) -> Path:
    """A short ``RAY_TMPDIR``: ``<project>/.ray[/<id>]``, or ``/tmp/fedscan-ray-<hash>[/<id>]``.

    The project-local path is used when short enough for Ray's socket paths
    (<= 36 characters), else a per-project folder in /tmp. With ``launch_id``, a
    sub-folder named by its first 8 characters, so parallel launches never share one.
    """
    suffix = f"/{launch_id[:8]}" if launch_id else ""
    local = Path(f"{project}/.ray{suffix}")
    if len(str(local)) <= _MAX_RAY_TMPDIR:
        return local
    digest = hashlib.sha1(str(project).encode()).hexdigest()[:10]
    return Path(f"/tmp/fedscan-ray-{digest}{suffix}")


def flower_env(
    project: Path,
    *,
    launch_id: str | None = None,
    flwr_home: Path | None = None,
    env_overrides: Mapping[str, str] | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Environment for one launch's SuperLink and ``flwr``: own homes and ports, no downloads.

    Parameters
    ----------
    project : Path
        The fedscan project folder.
    launch_id : str, optional
        Tags every process of the launch (``FEDSCAN_LAUNCH_ID``) and names its
        ``RAY_TMPDIR``; a fresh one by default.
    flwr_home : Path, optional
        ``FLWR_HOME``; default ``<project>/.flwr/launches/<launch_id>/flwr``.
    env_overrides : mapping, optional
        Applied last (e.g. ``RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES``).
    base : mapping, optional
        The environment to start from; default ``os.environ``.

    Folders are not created here (see :func:`launch`).
    """
    launch_id = launch_id or new_launch_id()
    env = dict(os.environ if base is None else base)
    # flwr finds `flower-superlink` etc. on PATH: put this interpreter's bin first.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env[LAUNCH_ID_ENV] = launch_id
    env["FLWR_HOME"] = str(flwr_home or project / ".flwr" / "launches" / launch_id / "flwr")
    env["RAY_TMPDIR"] = str(ray_tmpdir(project, launch_id))
    # A bare ray.init() joins the cluster in RAY_ADDRESS or ray_current_cluster; "local"
    # always starts a new one.
    env["RAY_ADDRESS"] = "local"
    env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    # Fresh ports per launch: a SuperLink left over from anything else (and the stale app
    # code it may hold) can never be picked up.
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
    env.update(env_overrides or {})
    return env


def new_launch_id() -> str:
    return secrets.token_hex(8)


def stage_app(project: Path, stage: Path) -> Path:
    """Copy just the app (packages' ``*.py``, ``pyproject.toml``) into ``stage``.

    ``flwr run`` walks every file under the app folder before filtering (about 50,000 in
    ``.venv`` alone, 3 s here); a staged copy is built in milliseconds and is, by
    construction, exactly the code on disk now.
    """
    if stage.exists():
        shutil.rmtree(stage)
    for relative in app_files(project):
        dst = stage / relative
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(project / relative, dst)
    return stage


def app_files(project: Path) -> list[Path]:
    """The app's files, relative to ``project``: the packages' ``*.py`` and ``pyproject.toml``, sorted."""
    files = [Path(name) for name in APP_FILES if (project / name).is_file()]
    for package in APP_PACKAGES:
        files += [src.relative_to(project) for src in (project / package).rglob("*.py")
                  if "__pycache__" not in src.parts]
    return sorted(files)


def code_digest(project: Path) -> str:
    """SHA-256 over the app's code and ``pyproject.toml`` (its defaults): what a run executes.

    Left out: the README and the sweep's own modules (``server/sweep_*.py``: the driver, its
    report), which change no result, so fixing a report does not invalidate finished
    trials. Two nodes with the same digest run the same code.
    """
    digest = hashlib.sha256()
    for relative in app_files(project):
        if relative.name == "README.md" or (relative.parent == Path("server") and relative.name.startswith("sweep_")):
            continue
        digest.update(str(relative).encode() + b"\0")
        digest.update((project / relative).read_bytes() + b"\0")
    return digest.hexdigest()


# --------------------------------------------------------------------------- #
# Stopping every process a launch started                                     #
# --------------------------------------------------------------------------- #

_PR_SET_CHILD_SUBREAPER = 36
_subreaper_lock = threading.Lock()
_subreaper_set = False


def become_subreaper() -> bool:
    """Make this process a child subreaper (Linux); return whether it is one.

    Processes whose parent dies (Flower's SuperExec children, Ray's raylet and workers)
    are then re-parented to this process instead of init, so they stay in its process
    tree. Process-wide and idempotent.
    """
    global _subreaper_set
    with _subreaper_lock:
        if _subreaper_set:
            return True
        if not sys.platform.startswith("linux"):
            return False
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _subreaper_set = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        except (OSError, AttributeError):
            _subreaper_set = False
        return _subreaper_set


class ProcessSweeper:
    """Finds and ends every process of one launch.

    A process belongs to the launch if its environment carries ``FEDSCAN_LAUNCH_ID=<id>``
    (everything the launch starts inherits it: SuperLink, SuperExec, ServerApp, simulation
    engine, Ray's gcs_server, raylet and workers) or if it was seen, while the launch ran,
    as a descendant of a process the launch started (matched by pid *and* start time, so a
    reused pid is never hit). Stopping sends SIGTERM to all of them at once, waits
    ``grace`` seconds, sends SIGKILL to the rest, and repeats the search until none is
    left (a process may spawn another while going down).
    """

    def __init__(self, launch_id: str) -> None:
        self.launch_id = launch_id
        self.roots: list[int] = []
        self.seen: dict[int, float] = {}  # pid -> create_time

    def add_root(self, pid: int) -> None:
        self.roots.append(pid)
        self._remember(pid)

    def _remember(self, pid: int) -> None:
        import psutil

        try:
            self.seen[pid] = psutil.Process(pid).create_time()
        except psutil.Error:
            pass

    def record(self) -> None:
        """Remember the current descendants of the launch's processes (call now and then)."""
        import psutil

        for root in self.roots:
            try:
                children = psutil.Process(root).children(recursive=True)
            except psutil.Error:
                continue
            for child in children:
                with contextlib.suppress(psutil.Error):
                    self.seen.setdefault(child.pid, child.create_time())
        self._reap_zombies()

    def _reap_zombies(self) -> None:
        # As subreaper, orphans of the launch that exit become *our* zombies; reap only
        # those known to be the launch's (never another thread's subprocess).
        import psutil

        try:
            children = psutil.Process().children()
        except psutil.Error:
            return
        for child in children:
            with contextlib.suppress(psutil.Error, ChildProcessError, OSError):
                if child.pid in self.seen and child.status() == psutil.STATUS_ZOMBIE:
                    if self.seen[child.pid] == child.create_time():
                        os.waitpid(child.pid, os.WNOHANG)

    def find(self) -> list[Any]:
        """The launch's processes still alive (zombies excluded), as ``psutil.Process``."""
        import psutil

        me = os.getpid()
        found: dict[int, psutil.Process] = {}
        for pid, created in list(self.seen.items()):
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if pid != me and p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    found[pid] = p
        uid = os.getuid()
        for p in psutil.process_iter():
            if p.pid == me or p.pid in found:
                continue
            with contextlib.suppress(psutil.Error):
                if p.uids().real != uid or p.status() == psutil.STATUS_ZOMBIE:
                    continue
                if p.environ().get(LAUNCH_ID_ENV) == self.launch_id:
                    found[p.pid] = p
        return list(found.values())

    def stop(self, grace: float = 3.0) -> list[int]:
        """End every process of the launch; return the pids that were ended."""
        import psutil

        ended: list[int] = []
        for _ in range(5):
            self.record()
            procs = self.find()
            if not procs:
                break
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(signal.SIGTERM)
            _, alive = psutil.wait_procs(procs, timeout=grace)
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.send_signal(signal.SIGKILL)
            psutil.wait_procs(alive, timeout=3.0)
            ended += [p.pid for p in procs]
            grace = 1.0  # later passes catch stragglers spawned while going down
        self._reap_zombies()
        return ended


# --------------------------------------------------------------------------- #
# The private SuperLink                                                       #
# --------------------------------------------------------------------------- #


class SuperLink:
    """A ``flower-superlink`` in simulation mode that this process started and will stop."""

    def __init__(self, env: dict[str, str], log_file: Path) -> None:
        self.env = env
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Start it and wait until its HTTP health check answers.

        Raises
        ------
        RuntimeError
            It exited or did not become ready in ``timeout`` seconds (its log is named).
        """
        import httpx

        port = self.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
        command = [
            "flower-superlink",
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
            "--control-api-address",
            f"127.0.0.1:{self.env['FLWR_LOCAL_CONTROL_API_PORT']}",
            "--fleet-api-address",
            f"127.0.0.1:{free_port()}",
            "--host",
            "127.0.0.1",
            "--port",
            port,
            "--database",
            ":flwr-in-memory:",
            "--log-file",
            str(self.log_file),
        ]
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        # Own session: a signal to our process group (Ctrl-C) does not reach it half-way;
        # the launch stops it, and everything it started, itself.
        self.process = subprocess.Popen(
            command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not should_stop():
            if self.process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with code {self.process.returncode}; see {self.log_file}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        if not should_stop():
            raise RuntimeError(f"flower-superlink did not become ready in {timeout:.0f} s; see {self.log_file}")


# --------------------------------------------------------------------------- #
# One launch                                                                  #
# --------------------------------------------------------------------------- #

_RUN_ID = re.compile(r"Successfully started run (\d+)")


@dataclasses.dataclass(frozen=True)
class RunResult:
    """How a launch ended.

    Attributes
    ----------
    run_id : str or None
        Flower's run id (None if the run never started).
    run_dir : Path or None
        The run's output folder (``<output-dir>/<stamp>-run<id>``), if it wrote one.
    status : str
        ``flwr ls`` status, e.g. ``"finished:completed"``, ``"finished:failed (...)"``;
        ``"not started (...)"``, ``"timed out"`` or ``"interrupted"``.
    exit_code : int
        0 completed, 1 failed, 124 timed out, 130 interrupted (128 + the signal number
        when a signal stopped it: 143 for SIGTERM, 129 for SIGHUP).
    log_tail : list of str
        The last lines of the streamed Flower log.
    wall_s : float
        Seconds from the call until every process was stopped.
    flwr_exit_code : int or None
        ``flwr run``'s own exit code (0 even for failed runs; hence ``status``).
    superlink_log : Path or None
        The SuperLink's log file, kept when the run failed or timed out (else None).
    launch_id : str
        The value of ``FEDSCAN_LAUNCH_ID`` in every process of the launch.
    """

    run_id: str | None
    run_dir: Path | None
    status: str
    exit_code: int
    log_tail: list[str]
    wall_s: float
    flwr_exit_code: int | None = None
    superlink_log: Path | None = None
    launch_id: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == EXIT_OK


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_signals(cancel: threading.Event) -> Iterator[list[int]]:
    """In the main thread: SIGINT, SIGTERM and SIGHUP set ``cancel`` (and are recorded).

    Yields the list the signal numbers are appended to. The handler raises nothing: an
    exception raised at an arbitrary point (inside httpx, holding its connection-pool
    lock) can deadlock the very clean-up it should start. The launch polls ``cancel``
    at least every half second instead, and further signals cannot cut the clean-up
    short. A no-op outside the main thread (Python delivers signals there only); the
    previous handlers are restored on exit.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        cancel.set()

    previous = {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _run_status(
    env: dict[str, str], project: Path, run_id: str, timeout: float, should_stop: Callable[[], bool]
) -> str:
    """How the SuperLink says the run ended (``flwr ls``): ``flwr run --stream`` exits 0 regardless."""
    proc = subprocess.Popen(
        ["flwr", "ls", "local", "--run-id", run_id, "--format", "json"],
        env=env, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + max(timeout, 1.0)
    while True:
        try:
            stdout, stderr = proc.communicate(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if should_stop() or time.monotonic() > deadline:
                proc.kill()
                proc.communicate()
                return "unknown (flwr ls did not answer)"
    try:
        runs = json.loads(stdout).get("runs", [])
        if not runs:
            return "unknown"
        details = runs[0].get("status-details") or ""
        return f"{runs[0].get('status', 'unknown')}" + (f" ({details})" if details else "")
    except (json.JSONDecodeError, AttributeError, IndexError):
        return f"unknown ({stdout.strip() or stderr.strip()})"


def find_run_dir(output_dir: Path, run_id: str) -> Path | None:
    """The run folder ``<output_dir>/<stamp>-run<run_id>`` (the newest, if several)."""
    matches = sorted(Path(output_dir).glob(f"*-run{run_id}"))
    return matches[-1] if matches else None


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def launch(
    run_config: Mapping[str, Any] | LaunchPlan,
    federation_config: Mapping[str, Any] | None = None,
    *,
    project: Path | str = ".",
    env_overrides: Mapping[str, str] | None = None,
    timeout: float | None = None,
    stream: TextIO | None = None,
    home: Path | None = None,
    extra_args: Sequence[str] = (),
    cancel: threading.Event | None = None,
    grace: float = 3.0,
    launch_id: str | None = None,
    env_base: Mapping[str, str] | None = None,
) -> RunResult:
    """Run one fedscan simulation on a private SuperLink and stop everything it started.

    Parameters
    ----------
    run_config : mapping or LaunchPlan
        Run-config overrides (flattened kebab-case keys; relative paths resolve against
        the current directory), or a plan from :func:`prepare`.
    federation_config : mapping, optional
        Federation keys; default ``num-supernodes=4 client-resources-num-cpus=1``.
        Ignored when ``run_config`` is a plan.
    project : Path
        The fedscan project folder.
    env_overrides : mapping, optional
        Extra environment for every process of the launch (applied last).
    timeout : float, optional
        Wall-clock limit in seconds; past it the launch is stopped (exit code 124).
    stream : text file, optional
        Where Flower's log lines go as they arrive (e.g. ``sys.stdout``); default: nowhere.
    home : Path, optional
        Folder for this launch's ``FLWR_HOME``, staged app and SuperLink log; default a
        fresh ``<project>/.flwr/launches/<launch id>``, removed at the end except the
        SuperLink log of a failed or timed-out run.
    extra_args : sequence of str
        More ``flwr run`` options, passed on.
    cancel : threading.Event, optional
        Set it (from any thread) to stop the launch (exit code 130).
    grace : float
        Seconds between SIGTERM and SIGKILL when stopping.
    launch_id : str, optional
        The id tagging every process of the launch (``FEDSCAN_LAUNCH_ID``); a fresh one by
        default. A caller that may need to stop the launch from outside (the sweep runner)
        picks it.
    env_base : mapping, optional
        The environment to start from instead of ``os.environ`` (a Ray worker's carries
        ``RAY_*`` and ``OMP_NUM_THREADS`` values that must not reach the run).

    Returns
    -------
    RunResult

    Raises
    ------
    UserError
        Invalid config or federation, or a failed pre-flight check; nothing was started.

    Notes
    -----
    Called from the main thread, SIGINT, SIGTERM and SIGHUP stop the launch (exit code
    128 + the signal number) and are restored afterwards; from another thread, use
    ``cancel``. Parallel launches are isolated: own ports, ``FLWR_HOME``, ``RAY_TMPDIR``,
    ``RAY_ADDRESS=local``, and a launch id tagging all their processes.
    """
    started = time.monotonic()
    deadline = started + timeout if timeout is not None else None
    plan = run_config if isinstance(run_config, LaunchPlan) else prepare(
        run_config, federation_config, project=Path(project)
    )
    launch_id = launch_id or new_launch_id()
    folder = Path(home) if home is not None else plan.project / ".flwr" / "launches" / launch_id
    env = flower_env(plan.project, launch_id=launch_id, flwr_home=folder / "flwr", env_overrides=env_overrides,
                     base=env_base)
    become_subreaper()
    sweeper = ProcessSweeper(launch_id)
    cancel = cancel or threading.Event()
    superlink = SuperLink(env, folder / "superlink.log")
    tail: list[str] = []
    run_id: str | None = None
    flwr_code: int | None = None
    status = "not started"
    exit_code = EXIT_RUN_FAILED

    def out_of_time() -> bool:
        return deadline is not None and time.monotonic() > deadline

    def should_stop() -> bool:
        return cancel.is_set() or out_of_time()

    flwr: subprocess.Popen[str] | None = None
    with stop_signals(cancel) as received:
        try:
            for path in (folder / "flwr", Path(env["RAY_TMPDIR"])):
                path.mkdir(parents=True, exist_ok=True)
            stage = stage_app(plan.project, folder / "app")
            command = ["flwr", "run", str(stage), "local", "--stream"]
            command += ["--run-config", plan.run_config_arg(), "--federation-config", plan.federation_config_arg()]
            command += [a for a in extra_args if a != "--stream"]
            for attempt in range(3):  # a port taken between free_port() and the bind: new ports
                try:
                    superlink.start(should_stop=should_stop)
                    status = "starting"
                    break
                except RuntimeError as err:
                    status = f"not started ({err})"
                    exited = superlink.process is not None and superlink.process.poll() is not None
                    if not exited:  # not ready in time: retrying would not help
                        break
                    if attempt < 2:
                        env.update(flower_env(plan.project, launch_id=launch_id, flwr_home=folder / "flwr",
                                              env_overrides=env_overrides, base=env_base))
                finally:
                    if superlink.process is not None:
                        sweeper.add_root(superlink.process.pid)
            if status == "starting" and not should_stop():
                lines: queue.Queue[str | None] = queue.Queue()
                flwr = subprocess.Popen(
                    command, env=env, cwd=plan.project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
                sweeper.add_root(flwr.pid)
                threading.Thread(target=_pump, args=(flwr.stdout, lines), daemon=True).start()
                last_record = 0.0
                while not should_stop():
                    try:
                        line = lines.get(timeout=0.5)
                    except queue.Empty:
                        line = ""
                    if line is None:
                        break
                    if line:
                        if stream is not None:
                            stream.write(line)
                            stream.flush()
                        tail.append(line.rstrip("\n"))
                        del tail[:-LOG_TAIL_LINES]
                        if run_id is None and (match := _RUN_ID.search(line)):
                            run_id = match.group(1)
                    if time.monotonic() - last_record > 1.0:
                        sweeper.record()
                        last_record = time.monotonic()
                if not should_stop():
                    flwr_code = flwr.wait()
            if run_id is not None and not should_stop():
                left = deadline - time.monotonic() if deadline is not None else 60.0
                status = _run_status(env, plan.project, run_id, min(60.0, left), should_stop)
                if flwr_code == 0 and status.startswith("finished:completed"):
                    exit_code = EXIT_OK
            elif run_id is None and not status.startswith("not started ("):
                status = "not started (flwr run printed no run id)"
            if cancel.is_set():
                status, exit_code = "interrupted", (128 + received[0]) if received else EXIT_INTERRUPTED
            elif out_of_time():
                status, exit_code = "timed out", EXIT_TIMEOUT
        finally:
            if flwr is not None and flwr.poll() is None:
                flwr.kill()  # the client only; the run itself dies with the SuperLink's processes
            sweeper.stop(grace=grace)
            for process in (flwr, superlink.process):
                if process is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(timeout=1.0)  # reap our direct children
            if flwr is not None and flwr.stdout is not None:
                flwr.stdout.close()
            shutil.rmtree(folder / "app", ignore_errors=True)
            shutil.rmtree(folder / "flwr", ignore_errors=True)
            shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)

    run_dir = find_run_dir(Path(plan.run_config["output-dir"]), run_id) if run_id else None
    if exit_code == EXIT_OK and run_dir is None:
        exit_code = EXIT_RUN_FAILED
    log: Path | None = superlink.log_file
    if exit_code not in (EXIT_RUN_FAILED, EXIT_TIMEOUT) and home is None:  # its log explains nothing then
        shutil.rmtree(folder, ignore_errors=True)
        log = None
    return RunResult(
        run_id=run_id,
        run_dir=run_dir,
        status=status,
        exit_code=exit_code,
        log_tail=tail,
        wall_s=time.monotonic() - started,
        flwr_exit_code=flwr_code,
        superlink_log=log,
        launch_id=launch_id,
    )
