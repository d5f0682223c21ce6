"""The ``fedscan`` command line.

``fedscan run [flwr run options]`` validates the run, then runs it through
:func:`server.launcher.launch` (a private SuperLink, the Flower 1.42 traps handled, every
process stopped at the end) and prints the per-hospital result table; ``--dry-run``
validates and prints the resolved configs without starting anything; ``--scenario NAME``
starts from a named scenario (``scenarios/NAME.toml``, :mod:`scenarios.registry`), which
``fedscan scenarios`` lists. ``fedscan sweep SWEEP.toml`` runs a grid of such runs as Ray
tasks (:mod:`server.sweep_runner`); ``fedscan sweep scenarios/NAME.toml`` runs a scenario's
comparison. ``fedscan keygen``
and ``fedscan checkpoint verify|inspect|export`` manage keys and encrypted checkpoints.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from server.launcher import (
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_TIMEOUT,
    EXIT_USER_ERROR,
    LaunchPlan,
    UserError,
    launch,
    parse_pairs,
    resolve_federation,
    resolve_run_config,
    stop_signals,
    toml_value,
)

__all__ = ["EXIT_OK", "EXIT_RUN_FAILED", "EXIT_USER_ERROR", "UserError", "build_parser", "main"]

_parse_pairs = parse_pairs  # older name, kept for callers
_ERROR_START = re.compile(r"(ERROR|Traceback|Exception|Error:)")


class _ArgumentError(Exception):
    """argparse's complaint, turned into our one-line error."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        # argparse prints the usage and exits; a one-line error and exit code 2 instead,
        # also when main() is called in-process.
        raise _ArgumentError(f"{message} (see {self.prog} --help).")


# --------------------------------------------------------------------------- #
# fedscan run                                                                 #
# --------------------------------------------------------------------------- #


def _load_scenario(project: Path, name: str) -> Any:
    """The named scenario of ``project/scenarios`` (a :class:`scenarios.registry.ScenarioInfo`)."""
    from scenarios.registry import ScenarioError, load_scenario

    try:
        return load_scenario(name, folder=project / "scenarios")
    except ScenarioError as err:
        raise UserError(str(err)) from None


def _scenario_federation(scenario: Any) -> dict[str, Any]:
    """The federation of a scenario's comparison (``hospitals`` -> ``num-supernodes``), checked on its own."""
    federation = {("num-supernodes" if key == "hospitals" else key): value
                  for key, value in scenario.federation_config.items()}
    try:
        resolve_federation(federation)
    except UserError as err:
        raise UserError(f"Comparison file '{scenario.comparison}' [federation-config]: {err}") from None
    return federation


def _plan(args: argparse.Namespace) -> LaunchPlan:
    project = Path(args.app).resolve()
    overrides = parse_pairs(args.run_config, "run config")
    federation_overrides = parse_pairs(args.federation_config, "federation config")
    if args.scenario is not None:
        # The scenario's keys and federation first; -c and --federation-config win, key by key.
        scenario = _load_scenario(project, args.scenario)
        overrides = {**scenario.run_config, **overrides}
        federation_overrides = {**_scenario_federation(scenario), **federation_overrides}
    federation = resolve_federation(federation_overrides, args.hospitals)
    run_config, warnings = resolve_run_config(project, overrides, federation["num-supernodes"])
    return LaunchPlan(project, run_config, federation, tuple(warnings))


def _print_dry_run(plan: LaunchPlan, scenario: str | None = None) -> None:
    from server.launcher import project_defaults

    merged = {**project_defaults(plan.project), **plan.run_config}
    source = f"scenario '{scenario}' (scenarios/{scenario}.toml), then -c" if scenario else "the overrides"
    lines = [
        "# fedscan run --dry-run: valid; nothing was started.",
        f"# run-config: pyproject.toml defaults, then {source} (paths absolute)",
        "[run-config]",
        *(f"{key} = {toml_value(value)}" for key, value in merged.items()),
        "",
        "[federation-config]",
        *(f"{key} = {toml_value(value)}" for key, value in plan.federation_config.items()),
    ]
    print("\n".join(lines))


def command_run(
    args: argparse.Namespace, passthrough: list[str], cancel: threading.Event | None = None,
    received: Sequence[int] = (),
) -> int:
    plan = _plan(args)
    if received:  # a stop signal during validation: nothing was started
        print("fedscan: interrupted; nothing was started.", file=sys.stderr)
        return 128 + received[0]
    for note in plan.warnings:
        print(f"fedscan: warning: {note}", file=sys.stderr)
    if args.dry_run:
        _print_dry_run(plan, args.scenario)
        return EXIT_OK
    if args.timeout is not None and not args.timeout > 0:
        raise UserError(f"The '--timeout' option must be a number of seconds > 0. Got {args.timeout!r} instead.")

    print(f"fedscan: {plan.num_hospitals} hospitals; starting a private SuperLink", flush=True)
    result = launch(
        plan, project=plan.project, stream=sys.stdout, timeout=args.timeout, extra_args=passthrough, cancel=cancel
    )

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


def command_sweep(args: argparse.Namespace, cancel: threading.Event, received: Sequence[int]) -> int:
    """Validate a sweep file (``--dry-run``: print its trials) or run it on Ray."""
    from server.sweep_spec import load_sweep, trial_table

    address = str(args.address)
    if not (address in ("local", "auto") or address.startswith("ray://") or re.fullmatch(r"[\w.-]+:\d+", address)):
        raise UserError(f"The '--address' option must be 'local', 'auto', 'ray://HOST:PORT' or HOST:PORT. "
                        f"Got {address!r} instead.")
    spec = load_sweep(args.file, project=args.project, timeout_s=args.timeout, max_parallel=args.max_parallel)
    if received:
        print("fedscan: interrupted; nothing was started.", file=sys.stderr)
        return 128 + received[0]
    if args.dry_run:
        print(f"# fedscan sweep --dry-run: {len(spec.trials)} valid trials; nothing was started.")
        print(f"# sweep folder: {spec.folder}; timeout {spec.timeout_s:g} s per trial")
        print(trial_table(spec))
        return EXIT_OK
    from server.sweep_runner import run_sweep

    return run_sweep(spec, address=address, resume=args.resume, cancel=cancel)


def command_scenarios(args: argparse.Namespace) -> int:
    """List the named scenarios: name, description, and the commands that run them."""
    from scenarios.registry import ScenarioError, list_scenarios
    from server.sweep_spec import count_trials

    folder = Path(args.project) / "scenarios"
    if not folder.is_dir():
        raise UserError(f"No scenarios folder in '{Path(args.project).resolve()}': run fedscan from the fedscan "
                        "project folder (or pass --project DIR).")
    try:
        scenarios = list_scenarios(folder)
    except ScenarioError as err:
        raise UserError(str(err)) from None
    if not scenarios:
        print(f"fedscan: no scenarios in {folder}")
        return EXIT_OK
    width = max(len(s.name) for s in scenarios)
    for scenario in scenarios:
        commands = f"fedscan run --scenario {scenario.name}"
        if scenario.comparison is not None:
            trials = count_trials(scenario.comparison)
            commands += f"  |  fedscan sweep scenarios/{scenario.name}.toml ({trials} trials)"
        print(f"{scenario.name.ljust(width)}  {scenario.description}\n{' ' * width}  {commands}")
    return EXIT_OK


def command_report(args: argparse.Namespace) -> int:
    """Rebuild a run's ``privacy_report.md``/``.html``, or a sweep folder's ``sweep_report.md``/``.html``."""
    from privacy.report import ReportError, build_report
    from server.sweep_report import SweepReportError, build_sweep_report
    from server.sweep_runner import SWEEP_JSON

    try:
        if (Path(args.run_dir) / SWEEP_JSON).is_file():
            md, html = build_sweep_report(Path(args.run_dir))
        else:
            md, html = build_report(args.run_dir)
    except (ReportError, SweepReportError) as err:
        raise UserError(str(err)) from None
    print(f"fedscan: wrote {md} and {html}")
    return 0


def command_keygen(args: argparse.Namespace) -> int:
    """Create a keyring folder (AES-256 encryption key, Ed25519 signing pair; files 0600).

    With ``--hospitals N`` also ``FOLDER/hospital-0000`` ... ``hospital-{N-1:04d}``, one
    keyring per hospital, as a configured ``checkpoint.keyring`` needs them.
    """
    from privacy.keys import (
        ENCRYPTION_KEY_FILE,
        SIGNING_KEY_FILE,
        VERIFY_KEY_FILE,
        KeyringError,
        generate_keyring,
    )

    folder = Path(args.folder)
    if not 0 <= args.hospitals <= 100_000:
        raise UserError(f"The '--hospitals' option must be an int in [0, 100000]. Got {args.hospitals} instead.")
    folders = [folder, *(folder / f"hospital-{site:04d}" for site in range(args.hospitals))]
    if not args.overwrite:  # check all before writing any, so a refusal leaves nothing half-made
        for one in folders:
            held = [n for n in (ENCRYPTION_KEY_FILE, SIGNING_KEY_FILE, VERIFY_KEY_FILE) if (one / n).exists()]
            if held:
                raise UserError(
                    f"Keyring folder '{one}' already holds {', '.join(held)}; refusing to overwrite keys "
                    "(checkpoints written with them would become unreadable). Pass --overwrite to replace them."
                )
    try:
        keyrings = [generate_keyring(one, overwrite=args.overwrite) for one in folders]
    except KeyringError as err:
        raise UserError(str(err).replace("Pass overwrite=True", "Pass --overwrite")) from None
    print(f"fedscan: keyring {keyrings[0].key_id} written to {folder.resolve()} "
          "(encryption.key, signing.key: 0600; verify.pub)")
    if args.hospitals:
        print(f"fedscan: {args.hospitals} hospital keyrings written to {folder.resolve()}/hospital-NNNN "
              f"(hospital-0000 ... hospital-{args.hospitals - 1:04d}); in a real federation each stays at its hospital")
    return 0


# --------------------------------------------------------------------------- #
# fedscan checkpoint                                                          #
# --------------------------------------------------------------------------- #

_HOSPITAL_RUN_ID = re.compile(r"hospital-(\d+)")


def _hospital_folder(header: Any) -> str | None:
    """``hospital-NNNN`` for a hospital-state checkpoint (its keys' sub-folder), else None."""
    match = _HOSPITAL_RUN_ID.fullmatch(str(header.run_id))
    return f"hospital-{int(match.group(1)):04d}" if header.kind == "hospital" and match else None


def _run_folder(file: Path) -> Path | None:
    """The run folder holding ``file``, if it sits where fedscan writes checkpoints.

    Server: ``<run>/checkpoints/round-NNNN.ckpt``; hospital state:
    ``<run>/hospitals/hospital-NNNN/round-RRRR.ckpt``.
    """
    file = file.resolve()
    if file.parent.name == "checkpoints":
        return file.parent.parent
    if file.parent.name.startswith("hospital-") and file.parent.parent.name == "hospitals":
        return file.parent.parent.parent
    return None


def _run_config(run: Path | None) -> dict[str, Any]:
    """The resolved config in ``<run>/config.json`` (empty if missing or unreadable)."""
    if run is None:
        return {}
    try:
        config = json.loads((run / "config.json").read_text()).get("config", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return config if isinstance(config, dict) else {}


def _run_keys(file: Path, header: Any) -> Path | None:
    """The keyring folder of the run ``file`` belongs to: ``<run>/keys`` or its configured keyring.

    For a hospital-state file, that keyring's ``hospital-NNNN`` sub-folder.
    """
    run = _run_folder(file)
    if run is None:
        return None
    roots = [run / "keys"]
    configured = (_run_config(run).get("checkpoint") or {}).get("keyring")
    if configured:
        roots.append(Path(str(configured)))
    sub = _hospital_folder(header)
    for root in roots:
        folder = root / sub if sub else root
        if (folder / "verify.pub").is_file():
            return folder
    return None


def _load_verify_key(path: Path) -> Any:
    """The Ed25519 public key in a ``verify.pub`` file; one sentence if it is not one."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if path.is_dir():
        raise UserError(f"The '--verify-key' option must be a verify.pub file. Got '{path}', a folder: "
                        f"pass --verify-key {path / 'verify.pub'} or --keyring {path}.")
    try:
        if path.stat().st_size > 64 * 1024:
            raise UserError(f"The '--verify-key' file '{path}' is not a verify.pub file (too large).")
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"The '--verify-key' file '{path}' does not exist; `fedscan keygen DIR` writes DIR/verify.pub.") from None
    except (OSError, ValueError) as err:
        raise UserError(f"The '--verify-key' file '{path}' cannot be read ({type(err).__name__}).") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise UserError(f"The '--verify-key' file '{path}' is not a PEM public key (a verify.pub written by "
                        "`fedscan keygen DIR`).") from None
    if not isinstance(key, Ed25519PublicKey):
        raise UserError(f"The '--verify-key' file '{path}' must hold an Ed25519 public key. "
                        f"Got {type(key).__name__} instead.")
    return key


def _has_secret_keys(folder: Path) -> bool:
    return (folder / "encryption.key").is_file() and (folder / "signing.key").is_file()


def _keyring_for(file: Path, header: Any, keyring: str | None) -> tuple[Path | None, str]:
    """The keyring folder to use and how it was found (for the message)."""
    sub = _hospital_folder(header)
    if keyring is not None:
        folder = Path(keyring)
        # `--keyring KEYS` for a hospital's file: its keys are KEYS/hospital-NNNN.
        if sub and (folder / sub).is_dir():
            return folder / sub, f"keyring {folder / sub}"
        return folder, f"keyring {folder}"
    found = _run_keys(file, header)
    return found, f"the run's keyring {found}"


def _rebuild_hint(file: Path, header: Any) -> str:
    """How to rebuild the model the exported weights fit, from the header or the run's config.json."""
    meta = header.meta if isinstance(header.meta, dict) else {}
    classes, channels = meta.get("num_classes"), meta.get("unet_channels")
    if classes is None or channels is None:
        config = _run_config(_run_folder(file))
        world, train = config.get("world") or {}, config.get("train") or {}
        if "lesions" in world and train.get("unet_channels"):
            from sims.anatomy import class_names

            classes = classes if classes is not None else len(class_names(bool(world["lesions"])))
            channels = channels if channels is not None else train["unet_channels"]
    if classes is None or channels is None:
        return ("rebuild the model with sims.model.make_model(num_classes, channels) using the run's "
                "config.json (its checkpoint header and run folder did not say)")
    channels = tuple(int(c) for c in channels)
    return (f"rebuild the model with `model = sims.model.make_model({int(classes)}, {channels})`, then "
            "`model.load_state_dict(torch.load(OUT, weights_only=True))`")


def _export(file: Path, out: Path, keyring_arg: str | None) -> None:
    import os
    import tempfile

    from privacy.checkpoint import read_checkpoint, read_header
    from privacy.keys import load_keyring

    if out.is_dir():
        raise UserError(f"Refusing to write into '{out}': OUT must be a new file name, and it is a folder.")
    if out.exists() or out.is_symlink():
        raise UserError(f"Refusing to overwrite '{out}': choose a new file name.")
    if not out.parent.is_dir():
        raise UserError(f"Cannot write '{out}': the folder '{out.parent}' does not exist.")
    header = read_header(file)
    if _hospital_folder(header) or header.kind == "hospital":
        raise UserError(
            f"'{file}' is a hospital-state checkpoint (privacy ledger and round bookkeeping) and holds no model; "
            "export a server checkpoint: `fedscan checkpoint export RUN/checkpoints/round-NNNN.ckpt OUT`."
        )
    folder, _ = _keyring_for(file, header, keyring_arg)
    if folder is None or not _has_secret_keys(folder):
        where = f"'{folder}' holds only verify.pub" if folder is not None else "no run keyring was found beside it"
        raise UserError(
            f"Exporting '{file}' needs the keyring that wrote it and {where}: "
            f"run `fedscan checkpoint export {file} {out} --keyring DIR`."
        )
    checkpoint = read_checkpoint(file, keyring=load_keyring(folder))
    weights = {k[len("arrays/") :]: v.clone() for k, v in checkpoint.tensors.items() if k.startswith("arrays/")}
    if not weights:
        raise UserError(f"'{file}' holds no model weights (no 'arrays/' tensors); nothing to export.")
    import torch

    # A temp file in OUT's folder, then a hard link: never overwrites OUT, even one made meanwhile.
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        torch.save(weights, tmp)
        try:
            os.link(tmp, out)
        except FileExistsError:
            raise UserError(f"Refusing to overwrite '{out}': choose a new file name.") from None
    finally:
        os.unlink(tmp)
    print(f"fedscan: exported the model ({len(weights)} tensors, round {header.round}) to {out}: a plain "
          "state dict, torch.load(OUT, weights_only=True)")
    print(f"fedscan: {_rebuild_hint(file, header)}")


def command_checkpoint(args: argparse.Namespace) -> int:
    """``verify`` (signature, and the GCM tag given the keyring), ``inspect`` (header only), ``export``."""
    import dataclasses

    from privacy.checkpoint import CheckpointError, WrongKey, read_checkpoint, read_header, verify_checkpoint
    from privacy.keys import KeyringError, load_keyring

    file = Path(args.file)
    key_hint = "KEYS/verify.pub"
    try:
        if args.action == "inspect":
            header = read_header(file)
            print(json.dumps(dataclasses.asdict(header), indent=2, sort_keys=True, default=str))
            return EXIT_OK
        if args.action == "export":
            _export(file, Path(args.out), args.keyring)
            return EXIT_OK
        header = read_header(file)  # which keys to look for; verified below
        if sub := _hospital_folder(header):
            key_hint = f"KEYS/{sub}/verify.pub"  # a hospital signs with its own keys
        if args.verify_key is not None:
            header = verify_checkpoint(file, verify_key=_load_verify_key(Path(args.verify_key)))
            print(f"fedscan: {file}: signature valid (key {header.key_id}, {header.kind}, run {header.run_id}, "
                  f"round {header.round}); the GCM tag needs the encryption key: add --keyring DIR to check it too")
            return EXIT_OK
        folder, source = _keyring_for(file, header, args.keyring)
        if folder is None:
            raise UserError(
                f"No key to verify '{file}' with, and no run keyring beside it: run "
                f"`fedscan checkpoint verify {file} --verify-key KEYS/verify.pub` (or --keyring KEYS)."
            )
        if args.keyring is None and not _has_secret_keys(folder):
            header = verify_checkpoint(file, verify_key=_load_verify_key(folder / "verify.pub"))
            print(f"fedscan: {file}: signature valid (key {header.key_id}, {header.kind}, run {header.run_id}, "
                  f"round {header.round}; {source}/verify.pub)")
            return EXIT_OK
        # read_checkpoint checks the signature, then the GCM tag; nothing is shown.
        header = read_checkpoint(file, keyring=load_keyring(folder)).header
        print(f"fedscan: {file}: signature and GCM tag valid (key {header.key_id}, {header.kind}, "
              f"run {header.run_id}, round {header.round}; {source})")
        return EXIT_OK
    except WrongKey as err:
        raise UserError(f"{err} Try `fedscan checkpoint verify {file} --verify-key {key_hint}` with the "
                        "writer's key.") from None
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
    run.add_argument("--scenario", default=None, metavar="NAME",
                     help="start from the named scenario scenarios/NAME.toml (its federation: the one of "
                     "scenarios/NAME.sweep.toml); -c, --federation-config and --hospitals override it "
                     "(fedscan scenarios lists them)")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="validate everything (keys, values, federation, pre-flight), print the resolved "
        "run-config and federation-config, start nothing",
    )
    run.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                     help="stop the run (and every process it started) after this many seconds; exit code 124")
    sweep = sub.add_parser(
        "sweep",
        help="run a grid of fedscan runs as Ray tasks, each a process-isolated run; one combined report",
        description="Expand and validate SWEEP.toml, then run every trial as a Ray task (each one a "
        "process-isolated fedscan run) and write results.csv, trials.jsonl and sweep_report.md/.html "
        "into the sweep folder.",
    )
    sweep.add_argument("file", metavar="SWEEP.toml",
                       help="the sweep file (see sweeps/), or a scenario file scenarios/NAME.toml: its comparison")
    sweep.add_argument("--address", default="local",
                       help="'local' (default: a private Ray on this machine), 'auto', HOST:PORT or "
                       "ray://HOST:PORT (an existing cluster)")
    sweep.add_argument("--max-parallel", type=int, default=None, metavar="N",
                       help="at most N trials at once (default: [sweep] max-parallel, else as many as fit)")
    sweep.add_argument("--resume", action="store_true",
                       help="keep the trials that completed, rerun the rest")
    sweep.add_argument("--dry-run", action="store_true", help="validate every trial and print the trial table")
    sweep.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                       help="wall-clock limit per trial (default: [sweep] timeout, else 3600)")
    sweep.add_argument("--project", default=".", help="the fedscan project folder (default: .)")
    scenarios = sub.add_parser(
        "scenarios",
        help="list the named scenarios and the commands that run them",
        description="List scenarios/*.toml: each scenario's name, description, `fedscan run --scenario NAME` "
        "and, when it has a comparison (scenarios/NAME.sweep.toml), `fedscan sweep scenarios/NAME.toml` "
        "with its trial count. Every scenario file is validated.",
    )
    scenarios.add_argument("--project", default=".", help="the fedscan project folder (default: .)")
    report = sub.add_parser(
        "report",
        help="rebuild a run's privacy-budget report, or a sweep's report",
        description="Rebuild privacy_report.md and privacy_report.html from RUN_DIR's privacy.csv, "
        "metrics.csv and config.json; for a sweep folder (it holds sweep.json), sweep_report.md and "
        "sweep_report.html from its results.csv and trials.jsonl (also mid-sweep).",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (e.g. outputs/latest) or a sweep folder")
    keygen = sub.add_parser("keygen", help="create a keyring folder for encrypted, signed checkpoints")
    keygen.add_argument("folder", nargs="?", default="keys", help="the keyring folder (default: keys)")
    keygen.add_argument("--hospitals", type=int, default=0, metavar="N",
                        help="also create FOLDER/hospital-0000 ... one keyring per hospital (default: 0)")
    keygen.add_argument("--overwrite", action="store_true", help="replace existing keys")
    ckpt = sub.add_parser("checkpoint", help="verify, inspect or export an encrypted checkpoint")
    ckpt_sub = ckpt.add_subparsers(dest="action", required=True)
    verify = ckpt_sub.add_parser(
        "verify",
        help="check the signature (and, given the keyring, the GCM tag); decrypts nothing it shows",
        description="Check a checkpoint's Ed25519 signature; with the keyring also its AES-GCM tag. "
        "Without an option, the keys of the run the file belongs to (<run>/keys, or "
        "<run>/keys/hospital-NNNN for a hospital's state file) are used.",
    )
    verify.add_argument("file", metavar="FILE")
    keys = verify.add_mutually_exclusive_group()
    keys.add_argument("--verify-key", metavar="PATH", default=None,
                      help="the writer's public key, e.g. keys/verify.pub (checks the signature)")
    keys.add_argument("--keyring", metavar="DIR", default=None,
                      help="the writer's keyring folder (checks the signature and the GCM tag)")
    inspect = ckpt_sub.add_parser("inspect", help="print the public header, never weights; no key needed")
    inspect.add_argument("file", metavar="FILE")
    export = ckpt_sub.add_parser(
        "export",
        help="decrypt a server checkpoint's model to a plain state dict (torch.load(OUT, weights_only=True))",
        description="Write the model of a server checkpoint as a plain state dict that "
        "sims.model.make_model(num_classes, channels).load_state_dict() accepts; prints how to "
        "rebuild that model. Never overwrites OUT.",
    )
    export.add_argument("file", metavar="FILE")
    export.add_argument("out", metavar="OUT")
    export.add_argument("--keyring", metavar="DIR", default=None,
                        help="the writer's keyring folder (default: the run's own keyring beside FILE)")
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
            # SIGINT/SIGTERM/SIGHUP during validation, too, end with 128 + the signal number.
            cancel = threading.Event()
            with stop_signals(cancel) as received:
                return command_run(args, passthrough, cancel, received)
        if args.command == "sweep":
            cancel = threading.Event()
            with stop_signals(cancel) as received:
                return command_sweep(args, cancel, received)
        if args.command == "report":
            return command_report(args)
        if args.command == "scenarios":
            return command_scenarios(args)
        if args.command == "keygen":
            return command_keygen(args)
        return command_checkpoint(args)
    except (UserError, _ArgumentError) as err:
        print(f"fedscan: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR



if __name__ == "__main__":
    sys.exit(main())
