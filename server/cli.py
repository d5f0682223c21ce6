"""The ``fedscan`` command line.

``fedscan run [flwr run options]`` validates the run, then runs it through
:func:`server.launcher.launch` (a private SuperLink, the Flower 1.42 traps handled, every
process stopped at the end) and prints the per-hospital result table; ``--dry-run``
validates and prints the resolved configs without starting anything. ``fedscan keygen``
and ``fedscan checkpoint verify|inspect|export`` manage keys and encrypted checkpoints.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.launcher import (
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_TIMEOUT,
    EXIT_USER_ERROR,
    Interrupted,
    LaunchPlan,
    UserError,
    launch,
    parse_pairs,
    resolve_federation,
    resolve_run_config,
    stop_signals_raise,
    toml_value,
)

__all__ = ["EXIT_OK", "EXIT_RUN_FAILED", "EXIT_USER_ERROR", "UserError", "build_parser", "main"]

_parse_pairs = parse_pairs  # older name, kept for callers
_ERROR_START = re.compile(r"(ERROR|Traceback|Exception|Error:)")


class _ArgumentError(Exception):
    """argparse's complaint, turned into our one-line error."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # type: ignore[override]
        # argparse prints the usage and exits; a one-line error and exit code 2 instead,
        # also when main() is called in-process.
        raise _ArgumentError(f"{message} (see {self.prog} --help).")


# --------------------------------------------------------------------------- #
# fedscan run                                                                 #
# --------------------------------------------------------------------------- #


def _plan(args: argparse.Namespace) -> LaunchPlan:
    project = Path(args.app).resolve()
    overrides = parse_pairs(args.run_config, "run config")
    federation = resolve_federation(parse_pairs(args.federation_config, "federation config"), args.hospitals)
    run_config, warnings = resolve_run_config(project, overrides, federation["num-supernodes"])
    return LaunchPlan(project, run_config, federation, tuple(warnings))


def _print_dry_run(plan: LaunchPlan) -> None:
    from server.launcher import project_defaults

    merged = {**project_defaults(plan.project), **plan.run_config}
    lines = [
        "# fedscan run --dry-run: valid; nothing was started.",
        "# run-config: pyproject.toml defaults, then the overrides (paths absolute)",
        "[run-config]",
        *(f"{key} = {toml_value(value)}" for key, value in merged.items()),
        "",
        "[federation-config]",
        *(f"{key} = {toml_value(value)}" for key, value in plan.federation_config.items()),
    ]
    print("\n".join(lines))


def command_run(args: argparse.Namespace, passthrough: list[str]) -> int:
    plan = _plan(args)
    for note in plan.warnings:
        print(f"fedscan: warning: {note}", file=sys.stderr)
    if args.dry_run:
        _print_dry_run(plan)
        return EXIT_OK
    if args.timeout is not None and not args.timeout > 0:
        raise UserError(f"The '--timeout' option must be a number of seconds > 0. Got {args.timeout!r} instead.")

    print(f"fedscan: {plan.num_hospitals} hospitals; starting a private SuperLink", flush=True)
    result = launch(plan, project=plan.project, stream=sys.stdout, timeout=args.timeout, extra_args=passthrough)

    if result.exit_code == EXIT_TIMEOUT:
        print(f"\nfedscan: the run did not finish within {args.timeout:g} s; stopped it and every process it "
              "started.", file=sys.stderr)
        return result.exit_code
    if result.exit_code > 128:
        print("\nfedscan: interrupted; stopped the run and every process it started.", file=sys.stderr)
        return result.exit_code
    if result.run_dir is None and result.status.startswith("finished:completed"):
        print(f"fedscan: run {result.run_id} completed but wrote no run folder.", file=sys.stderr)
        return EXIT_RUN_FAILED
    if result.exit_code != EXIT_OK:
        print(f"\nfedscan: the run failed: {result.status} (flwr exit code {result.flwr_exit_code}).",
              file=sys.stderr)
        errors = [i for i, line in enumerate(result.log_tail) if _ERROR_START.search(line)]
        if errors:  # the end of the server's traceback, where its error is
            block = result.log_tail[errors[0] :]
            print("\n".join(block[-15:]), file=sys.stderr)
        if result.superlink_log is not None:
            print(f"SuperLink log: {result.superlink_log}", file=sys.stderr)
        return EXIT_RUN_FAILED

    assert result.run_dir is not None
    print()
    summary = result.run_dir / "summary.md"
    if summary.exists():
        print(summary.read_text())
    print(f"fedscan: run {result.run_id} completed in {result.wall_s:.1f} s; outputs in {result.run_dir}")
    return EXIT_OK


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
    parser = _Parser(prog="fedscan", description=__doc__.splitlines()[0])
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
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="validate everything (keys, values, federation, pre-flight), print the resolved "
        "run-config and federation-config, start nothing",
    )
    run.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                     help="stop the run (and every process it started) after this many seconds; exit code 124")
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
    """Run the ``fedscan`` command line; return the exit code (2: a user error, one line)."""
    parser = build_parser()
    try:
        args, passthrough = parser.parse_known_args(argv)
        passthrough = [a for a in passthrough if a != "--stream"]
        if args.command != "run" and passthrough:
            parser.error(f"unrecognized arguments: {' '.join(passthrough)}")
        if shutil.which("flwr", path=str(Path(sys.executable).parent)) is None and shutil.which("flwr") is None:
            raise UserError("The 'flwr' command is not installed in this environment: run `make install`.")
        if args.command == "run":
            # SIGTERM/SIGHUP during validation, too, end with 128 + the signal number.
            with stop_signals_raise():
                return command_run(args, passthrough)
        if args.command == "report":
            return command_report(args)
        if args.command == "keygen":
            return command_keygen(args)
        return command_checkpoint(args)
    except (UserError, _ArgumentError) as err:
        print(f"fedscan: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Interrupted as err:  # outside a launch: nothing of the run is running
        print("fedscan: interrupted.", file=sys.stderr)
        return 128 + err.signum


if __name__ == "__main__":
    sys.exit(main())
