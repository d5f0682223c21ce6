"""The ``fedscan`` command line.

``fedscan run [flwr run options]`` runs ``flwr run .`` safely on this machine: it starts
a fresh, private SuperLink (own ports, project-local ``FLWR_HOME``, no runtime
dependency installation, no telemetry), streams the run, checks how the ServerApp
really ended (``flwr run --stream`` exits 0 even when it failed), stops the SuperLink
it started by PID, and prints the per-hospital result table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
EXIT_USER_ERROR = 2
EXIT_RUN_FAILED = 1


class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, exit code 2."""


# --------------------------------------------------------------------------- #
# Argument handling                                                           #
# --------------------------------------------------------------------------- #


def _parse_pairs(values: Sequence[str], what: str) -> dict[str, Any]:
    """Parse ``k=v`` TOML pairs exactly as ``flwr run`` does (or one ``.toml`` file)."""
    from flwr.common.config import parse_config_args

    try:
        # Parse each -c on its own and merge the *flattened* pairs: flwr's own merge
        # is a shallow dict update, which drops `privacy.mode` when a later -c sets
        # `privacy.delta`.
        merged: dict[str, Any] = {}
        for value in values:
            merged.update(parse_config_args([value]))
        return merged
    except FileNotFoundError as err:
        raise UserError(f"The {what} file '{err.filename}' does not exist.") from None
    except Exception as err:  # click.ClickException / ValueError / TOMLDecodeError
        message = getattr(err, "message", None) or str(err)
        raise UserError(f"Could not parse {what} {list(values)!r}: {message}") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def project_defaults(project: Path) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of ``project/pyproject.toml``."""
    path = project / "pyproject.toml"
    try:
        from flwr.common.config import flatten_dict

        data = tomllib.loads(path.read_text())
        return dict(flatten_dict(data["tool"]["flwr"]["app"]["config"]))
    except FileNotFoundError:
        raise UserError(
            f"No pyproject.toml in '{project}': run fedscan from the fedscan project folder."
        ) from None
    except (KeyError, tomllib.TOMLDecodeError) as err:
        raise UserError(f"'{path}' has no valid [tool.flwr.app.config] table ({err}).") from None


def resolve_run_config(project: Path, overrides: dict[str, Any], hospitals: int | None = None) -> dict[str, Any]:
    """Validate user overrides against the declared keys and make paths absolute.

    Returns the overrides to pass on to ``flwr run`` (paths resolved against the
    current directory, so the SuperLink's working directory does not matter).
    """
    try:
        check_known_keys(list(overrides))
        merged = {**project_defaults(project), **overrides}
        config = config_from_run_config(merged)
    except ConfigError as err:
        raise UserError(str(err)) from None
    for note in privacy_warnings(config):
        print(f"fedscan: warning: {note}", file=sys.stderr)
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
    return resolved


def _check_writable_folder(key: str, folder: Path) -> None:
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"The '{key}' parameter must be a folder. Got '{folder}', but '{existing}' is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"The '{key}' parameter must be a writable folder. Got '{folder}' ('{existing}' is not writable).")


def resolve_federation(overrides: dict[str, Any], hospitals: int | None) -> dict[str, Any]:
    for key in overrides:
        if key not in FEDERATION_KEYS:
            import difflib

            close = difflib.get_close_matches(key, FEDERATION_KEYS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise UserError(
                f"Unknown federation-config key '{key}'.{hint} Allowed: {', '.join(FEDERATION_KEYS)}."
            )
    federation = {
        "num-supernodes": DEFAULT_HOSPITALS,
        "client-resources-num-cpus": DEFAULT_CPUS_PER_HOSPITAL,
        **overrides,
    }
    if hospitals is not None:
        federation["num-supernodes"] = hospitals
    n = federation["num-supernodes"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(
            f"The number of hospitals ('num-supernodes') must be an int >= 1. Got {n!r} instead."
        )
    cpus = federation["client-resources-num-cpus"]
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise UserError(
            f"The 'client-resources-num-cpus' parameter must be an int >= 1. Got {cpus!r} instead."
        )
    return federation


# --------------------------------------------------------------------------- #
# The private SuperLink                                                       #
# --------------------------------------------------------------------------- #


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(project: Path) -> dict[str, str]:
    """Environment for the SuperLink and ``flwr``: project-local homes, no downloads."""
    env = os.environ.copy()
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["FLWR_HOME"] = str(project / ".flwr")
    env["RAY_TMPDIR"] = str(ray_tmpdir(project))
    env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    # A fresh pair of ports per run: a SuperLink left over from anything else (and
    # the stale app code it may hold) can never be picked up by this run.
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(_free_port())
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(_free_port())
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    Path(env["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    return env


# Ray puts AF_UNIX sockets under RAY_TMPDIR/ray/session_<date>_<pid>/sockets/plasma_store
# (about 70 more characters); Linux caps such paths at 107 bytes.
_MAX_RAY_TMPDIR = 36


def ray_tmpdir(project: Path) -> Path:
    """``<project>/.ray``, or a short per-project folder in /tmp when that path is too long."""
    local = project / ".ray"
    if len(str(local)) <= _MAX_RAY_TMPDIR:
        return local
    digest = hashlib.sha1(str(project).encode()).hexdigest()[:10]
    return Path("/tmp") / f"fedscan-ray-{digest}"


APP_PACKAGES = ("server", "clients", "sims", "privacy", "scenarios")
APP_FILES = ("pyproject.toml", "README.md")


def stage_app(project: Path, stage: Path) -> Path:
    """Copy just the app (packages' ``*.py``, ``pyproject.toml``) into ``stage``.

    ``flwr run`` walks every file under the app folder before filtering (about 50,000
    in ``.venv`` alone, 3 s here); a staged copy is built in milliseconds and is, by
    construction, exactly the code on disk now.
    """
    if stage.exists():
        shutil.rmtree(stage)
    for name in APP_FILES:
        if (project / name).is_file():
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(project / name, stage / name)
    for package in APP_PACKAGES:
        for src in (project / package).rglob("*.py"):
            if "__pycache__" in src.parts:
                continue
            dst = stage / src.relative_to(project)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return stage


class SuperLink:
    """A ``flower-superlink`` in simulation mode that this process started and will stop."""

    def __init__(self, env: dict[str, str], log_file: Path) -> None:
        self.env = env
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
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
            f"127.0.0.1:{_free_port()}",
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
        # Own session, so stop() can end the SuperLink and everything it spawned
        # (ServerApp, simulation engine, Ray) by process group, and nothing else.
        self.process = subprocess.Popen(
            command,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"flower-superlink exited with code {self.process.returncode}; see {self.log_file}"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"flower-superlink did not become ready in {timeout:.0f} s; see {self.log_file}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=wait)
                # Give the group's children a moment to follow, then make sure.
                time.sleep(0.2)
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue
            return


# --------------------------------------------------------------------------- #
# fedscan run                                                                 #
# --------------------------------------------------------------------------- #

_RUN_ID = re.compile(r"Successfully started run (\d+)")
_ERROR_START = re.compile(r"(ERROR|Traceback|Exception|Error:)")


def _run_status(env: dict[str, str], project: Path, run_id: str) -> str:
    out = subprocess.run(
        ["flwr", "ls", "local", "--run-id", run_id, "--format", "json"],
        env=env,
        cwd=project,
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        payload = json.loads(out.stdout)
        runs = payload.get("runs", [])
        if not runs:
            return "unknown"
        details = runs[0].get("status-details") or ""
        return f"{runs[0].get('status', 'unknown')}" + (f" ({details})" if details else "")
    except (json.JSONDecodeError, AttributeError, IndexError):
        return f"unknown ({out.stdout.strip() or out.stderr.strip()})"


def _find_run_dir(output_dir: Path, run_id: str) -> Path | None:
    matches = sorted(output_dir.glob(f"*-run{run_id}*"))
    return matches[-1] if matches else None


def command_run(args: argparse.Namespace, passthrough: list[str]) -> int:
    project = Path(args.app).resolve()
    overrides = _parse_pairs(args.run_config, "run config")
    federation = resolve_federation(_parse_pairs(args.federation_config, "federation config"), args.hospitals)
    run_config = resolve_run_config(project, overrides, federation["num-supernodes"])

    env = flower_env(project)
    stage = stage_app(project, project / ".flwr" / "stage" / str(os.getpid()))
    command = ["flwr", "run", str(stage), "local", "--stream"]
    # One --run-config for all pairs: flwr merges separate ones with a shallow dict
    # update, so `-c privacy.mode=... -c privacy.delta=...` would keep only the last
    # key of the `privacy` table.
    command += ["--run-config", " ".join(f"{key}={_toml_value(value)}" for key, value in run_config.items())]
    command += ["--federation-config", " ".join(f"{k}={_toml_value(v)}" for k, v in federation.items())]
    command += passthrough

    superlink = SuperLink(env, project / ".flwr" / "local-superlink" / f"superlink-{os.getpid()}.log")
    started = time.monotonic()
    run_id: str | None = None
    tail: list[str] = []
    print(f"fedscan: {federation['num-supernodes']} hospitals; starting a private SuperLink", flush=True)

    def _terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        superlink.start()
        with subprocess.Popen(
            command, env=env, cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as flwr:
            assert flwr.stdout is not None
            for line in flwr.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                tail = (tail + [line.rstrip("\n")])[-400:]
                if run_id is None and (match := _RUN_ID.search(line)):
                    run_id = match.group(1)
            code = flwr.wait()
        status = _run_status(env, project, run_id) if run_id else "not started"
    except KeyboardInterrupt:
        print("\nfedscan: interrupted; stopping the SuperLink", file=sys.stderr)
        return 130
    finally:
        superlink.stop()
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(stage, ignore_errors=True)

    elapsed = time.monotonic() - started
    if code != 0 or not status.startswith("finished:completed"):
        print(f"\nfedscan: the run failed: {status} (flwr exit code {code}).", file=sys.stderr)
        errors = [i for i, line in enumerate(tail) if _ERROR_START.search(line)]
        if errors:  # the end of the server's traceback, where its error is
            block = tail[errors[0] :]
            print("\n".join(block[-15:]), file=sys.stderr)
        print(f"SuperLink log: {superlink.log_file}", file=sys.stderr)
        return EXIT_RUN_FAILED

    run_dir = _find_run_dir(Path(run_config["output-dir"]), run_id or "")
    if run_dir is None:
        print(f"fedscan: run {run_id} completed but wrote no run folder.", file=sys.stderr)
        return EXIT_RUN_FAILED
    print()
    summary = run_dir / "summary.md"
    if summary.exists():
        print(summary.read_text())
    print(f"fedscan: run {run_id} completed in {elapsed:.1f} s; outputs in {run_dir}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    """Rebuild ``privacy_report.md`` and ``privacy_report.html`` from a run's files."""
    from privacy.report import ReportError, build_report

    try:
        md, html = build_report(args.run_dir)
    except ReportError as err:
        raise UserError(str(err)) from None
    print(f"fedscan: wrote {md} and {html}")
    return 0


def command_keygen(args: argparse.Namespace) -> int:
    """Create a keyring folder (AES-256 encryption key, Ed25519 signing pair; files 0600)."""
    from privacy.keys import KeyringError, generate_keyring

    try:
        keyring = generate_keyring(args.folder, overwrite=args.overwrite)
    except KeyringError as err:
        raise UserError(str(err).replace("Pass overwrite=True", "Pass --overwrite")) from None
    print(f"fedscan: keyring {keyring.key_id} written to {Path(args.folder).resolve()} "
          "(encryption.key, signing.key: 0600; verify.pub)")
    return 0


def command_checkpoint(args: argparse.Namespace) -> int:
    """``verify`` (signature and GCM tag), ``inspect`` (header only, no key), ``export``."""
    import dataclasses

    from privacy.checkpoint import CheckpointError, read_checkpoint, read_header
    from privacy.keys import KeyringError, load_keyring

    try:
        if args.action == "inspect":
            header = read_header(args.file)
            print(json.dumps(dataclasses.asdict(header), indent=2, sort_keys=True, default=str))
            return 0
        keyring = load_keyring(args.keyring)
        if args.action == "verify":
            # read_checkpoint checks the signature, then the GCM tag; nothing is shown.
            header = read_checkpoint(args.file, keyring=keyring).header
            print(f"fedscan: {args.file}: signature and tag valid (key {header.key_id}, run {header.run_id}, "
                  f"round {header.round})")
            return 0
        checkpoint = read_checkpoint(args.file, keyring=keyring)
        out = Path(args.out)
        if out.exists():
            raise UserError(f"Refusing to overwrite '{out}': choose a new file name.")
        import torch

        # A plain state dict of tensors: loadable with torch.load(..., weights_only=True).
        torch.save({k: v.clone() for k, v in checkpoint.tensors.items()}, out)
        print(f"fedscan: exported {len(checkpoint.tensors)} tensors to {out} (torch.load(..., weights_only=True))")
        return 0
    except (CheckpointError, KeyringError) as err:
        raise UserError(str(err)) from None
    except FileNotFoundError as err:
        raise UserError(f"No such file: '{err.filename}'.") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedscan", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run the federated simulation (flwr run . with the traps handled)",
        description="Run `flwr run .` on a private SuperLink. Other flwr run options are passed on.",
    )
    run.add_argument("app", nargs="?", default=".", help="the fedscan project folder (default: .)")
    run.add_argument("-c", "--run-config", action="append", default=[], help="'key=value ...' or a .toml file")
    run.add_argument("--federation-config", action="append", default=[], help="'num-supernodes=4 ...'")
    run.add_argument("--hospitals", type=int, default=None, help="shortcut for num-supernodes")
    report = sub.add_parser(
        "report",
        help="rebuild a run's privacy-budget report",
        description="Rebuild privacy_report.md and privacy_report.html from RUN_DIR's privacy.csv, "
        "metrics.csv and config.json.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, e.g. outputs/latest")
    keygen = sub.add_parser("keygen", help="create a keyring folder for encrypted, signed checkpoints")
    keygen.add_argument("folder", nargs="?", default="keys", help="the keyring folder (default: keys)")
    keygen.add_argument("--overwrite", action="store_true", help="replace existing keys")
    ckpt = sub.add_parser("checkpoint", help="verify, inspect or export an encrypted checkpoint")
    ckpt_sub = ckpt.add_subparsers(dest="action", required=True)
    for action, text in (("verify", "check structure and signature"), ("inspect", "print the metadata, never weights")):
        one = ckpt_sub.add_parser(action, help=text)
        one.add_argument("file", metavar="FILE")
        if action == "verify":
            one.add_argument("--keyring", default="keys", help="keyring folder (default: keys)")
    export = ckpt_sub.add_parser("export", help="decrypt to a plain weights-only torch file")
    export.add_argument("file", metavar="FILE")
    export.add_argument("out", metavar="OUT")
    export.add_argument("--keyring", default="keys", help="keyring folder (default: keys)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, passthrough = parser.parse_known_args(argv)
    passthrough = [a for a in passthrough if a != "--stream"]
    if shutil.which("flwr", path=str(Path(sys.executable).parent)) is None and shutil.which("flwr") is None:
        print("fedscan: the 'flwr' command is not installed in this environment.", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        if args.command == "run":
            return command_run(args, passthrough)
        if passthrough:
            parser.error(f"unrecognized arguments: {' '.join(passthrough)}")
        if args.command == "report":
            return command_report(args)
        if args.command == "keygen":
            return command_keygen(args)
        if args.command == "checkpoint":
            return command_checkpoint(args)
    except UserError as err:
        print(f"fedscan: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
