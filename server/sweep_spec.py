"""A sweep file, read, expanded into trials and validated before anything starts.

A sweep file is TOML::

    [sweep]                      # all optional
    name = "privacy_utility"     # default: the file's stem (less ".sweep"); the folder is <output-dir>/<name>
    scenario = "domain_shift"    # a named scenario (scenarios/NAME.toml): its keys are the base run config
    output-dir = "outputs/sweeps"
    timeout = 1800               # seconds per trial
    max-parallel = 2             # trials at once (default: as many as the cluster's CPUs fit)
    cpus-per-trial = 0           # 0: derived from the federation config
    memory-per-trial-gb = 0      # 0: derived from the federation config

    [run-config]                 # the base run config: any key of [tool.flwr.app.config]
    num-server-rounds = 10

    [federation-config]          # num-supernodes, client-resources-num-cpus, ...
    num-supernodes = 4

    [grid]                       # every combination of these lists
    seed = [0, 1]
    patients-per-hospital = [150, 600]

    [[trials]]                   # an explicit list; each entry is crossed with the grid
    privacy.mode = "off"
    [[trials]]
    privacy.mode = "sample"
    privacy.target-epsilon = 8

With ``scenario = "NAME"`` the base run config is the scenario file's keys, then the
sweep's own ``[run-config]``, then each trial's values; the base federation is the one of
the scenario's comparison (``NAME.sweep.toml``), then the sweep's own ``[federation-config]``.
A scenario's comparison is such a sweep file, ``scenarios/NAME.sweep.toml``; given the
scenario file ``scenarios/NAME.toml`` itself, :func:`load_sweep` runs its comparison.

Grid and list keys may be run-config keys, federation keys, or ``hospitals`` (the
``--hospitals`` shortcut for ``num-supernodes``). Every trial is validated with the run's own
validator (:func:`server.launcher.prepare`, pre-flight included) before anything starts;
a mistake is one sentence (:class:`~server.launcher.UserError`).

A trial's id hashes its resolved run config (defaults included, paths where outputs go
left out), its federation config and the app's code (:func:`server.launcher.code_digest`):
the same trial on the same code has the same id, which is what ``--resume`` relies on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.validation import did_you_mean
from server.launcher import (
    FEDERATION_KEYS,
    LaunchPlan,
    UserError,
    code_digest,
    prepare,
    project_defaults,
    toml_value,
)

SECTIONS = ("sweep", "run-config", "federation-config", "grid", "trials")
SWEEP_KEYS = ("name", "scenario", "output-dir", "timeout", "max-parallel", "cpus-per-trial", "memory-per-trial-gb")
HOSPITALS_ALIAS = "hospitals"
SEED_KEY = "seed"
SWEEP_OWNED = ("output-dir",)
"""Run-config keys the sweep sets itself (each trial writes under the sweep folder)."""
DEFAULT_TIMEOUT_S = 3600.0
DEFAULT_OUTPUT_DIR = "outputs/sweeps"
ID_LENGTH = 12

# Ray scheduling estimates (measured: a 4-hospital default run peaks at ~3.3 GB summed RSS).
BASE_MEMORY_GB = 1.0
MEMORY_PER_HOSPITAL_GB = 0.6


@dataclasses.dataclass(frozen=True)
class TrialSpec:
    """One trial: a validated launch plus what the sweep records about it.

    Attributes
    ----------
    index : int
        Position in the sweep (0-based), in expansion order.
    trial_id : str
        12 hex characters: a hash of the resolved config, the federation config and the code.
    swept : dict
        Each swept key and this trial's value of it (the resolved value when the trial's
        grid point or list entry did not set it).
    plan : LaunchPlan
        What :func:`server.launcher.launch` runs (``output-dir`` is the sweep folder's
        ``trials/<trial_id>``).
    resolved : dict
        The full run config: ``pyproject.toml`` defaults, then the overrides.
    cpus : int
        Ray CPUs the trial reserves: hospitals training at once x CPUs per hospital + 1
        for the ServerApp (or ``cpus-per-trial``).
    memory_bytes : int
        Ray memory the trial reserves.
    gpus : float
        Ray GPUs the trial reserves (hospitals at once x ``client-resources-num-gpus``).
    """

    index: int
    trial_id: str
    swept: dict[str, Any]
    plan: LaunchPlan
    resolved: dict[str, Any]
    cpus: int
    memory_bytes: int
    gpus: float

    def label(self) -> str:
        """``key=value`` pairs of the swept keys, for messages."""
        return " ".join(f"{key}={toml_value(value)}" for key, value in self.swept.items())


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: its settings and every trial."""

    name: str
    file: Path
    project: Path
    output_dir: Path
    timeout_s: float
    max_parallel: int | None
    swept_keys: tuple[str, ...]
    trials: tuple[TrialSpec, ...]
    code_digest: str
    scenario: str | None = None
    """The named scenario the sweep compares (``[sweep] scenario``), or None."""

    @property
    def folder(self) -> Path:
        """``<output-dir>/<name>``: results.csv, trials.jsonl, the report, ``trials/<id>/``."""
        return self.output_dir / self.name

    @property
    def seed_key(self) -> str | None:
        return SEED_KEY if SEED_KEY in self.swept_keys else None


# --------------------------------------------------------------------------- #
# Reading                                                                     #
# --------------------------------------------------------------------------- #


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"privacy": {"mode": "off"}}`` -> ``{"privacy.mode": "off"}`` (TOML dotted keys)."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _load_toml(path: Path) -> dict[str, Any]:
    from scenarios.registry import ScenarioError, read_toml

    try:
        return read_toml(path, "sweep file")
    except ScenarioError as err:
        raise UserError(str(err)) from None


def _is_scenario_file(data: Mapping[str, Any]) -> bool:
    """A scenario's run file (``scenarios/NAME.toml``): a ``scenario`` key and no sweep section."""
    from scenarios.registry import SCENARIO_KEY

    return SCENARIO_KEY in data and not any(section in data for section in SECTIONS)


def _shown(path: Path) -> str:
    """``path`` relative to the current folder when inside it (``scenarios/x.sweep.toml``), for messages."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _comparison_of(path: Path) -> Path:
    """The comparison (``NAME.sweep.toml``) of the scenario file ``path``, validating the scenario."""
    from scenarios.registry import COMPARISON_SUFFIX, ScenarioError, read_scenario

    try:
        info = read_scenario(path)
    except ScenarioError as err:
        raise UserError(str(err)) from None
    if info.comparison is None:
        missing = _shown(info.path.with_name(f"{info.name}{COMPARISON_SUFFIX}"))
        raise UserError(f"Scenario '{info.name}' compares nothing (no {missing}); run it with "
                        f"fedscan run --scenario {info.name}.")
    return info.comparison


def _scenario(name: Any, path: Path, folder: Path | None, project: Path) -> Any:
    """The scenario ``[sweep] scenario`` names (a :class:`scenarios.registry.ScenarioInfo`).

    Looked up in ``folder``; by default beside ``path`` when ``path`` is that scenario's
    comparison (``NAME.sweep.toml`` next to ``NAME.toml``), else in ``project/scenarios``.
    """
    from scenarios.registry import COMPARISON_SUFFIX, ScenarioError, load_scenario

    if not isinstance(name, str):
        raise UserError(f"The 'scenario' parameter of [sweep] must be a scenario name (fedscan scenarios lists "
                        f"them). Got {name!r} instead.")
    if folder is None:
        beside = path.name == f"{name}{COMPARISON_SUFFIX}" and path.with_name(f"{name}.toml").is_file()
        folder = path.parent if beside else project / "scenarios"
    try:
        return load_scenario(name, folder=folder)
    except ScenarioError as err:
        raise UserError(f"Sweep file '{path}': {err}") from None


def _read(path: Path, data: dict[str, Any] | None = None) -> dict[str, Any]:
    data = _load_toml(path) if data is None else data
    for section in data:
        if section not in SECTIONS:
            raise UserError(
                f"Unknown section [{section}] in sweep file '{path}'.{did_you_mean(section, SECTIONS)} "
                f"Allowed: {', '.join(f'[{s}]' for s in SECTIONS)}."
            )
    for section in ("sweep", "run-config", "federation-config", "grid"):
        if not isinstance(data.get(section, {}), dict):
            raise UserError(f"The [{section}] part of sweep file '{path}' must be a table. "
                            f"Got {type(data[section]).__name__} instead.")
    trials = data.get("trials", [])
    if not isinstance(trials, list) or not all(isinstance(t, dict) for t in trials):
        raise UserError(f"The 'trials' part of sweep file '{path}' must be a list of tables ([[trials]]). "
                        f"Got {trials!r} instead.")
    return data


def _known_key(key: str, where: str, path: Path) -> None:
    """A grid or list key must be a run-config key, a federation key or ``hospitals``."""
    from sims.config import KEYS

    if key in KEYS or key in FEDERATION_KEYS or key == HOSPITALS_ALIAS:
        if key in SWEEP_OWNED:
            raise UserError(f"The key '{key}' in {where} of sweep file '{path}' cannot be swept: each trial "
                            "writes under the sweep folder (set [sweep] output-dir instead).")
        return
    options = [*KEYS, *FEDERATION_KEYS, HOSPITALS_ALIAS]
    raise UserError(f"Unknown key {key!r} in {where} of sweep file '{path}'.{did_you_mean(key, options)} "
                    "Allowed: run-config keys (pyproject.toml [tool.flwr.app.config]), federation keys "
                    f"({', '.join(FEDERATION_KEYS)}) and '{HOSPITALS_ALIAS}'.")


def _sweep_settings(table: Mapping[str, Any], path: Path) -> dict[str, Any]:
    from common.validation import InvalidParameterError, check_float, check_int

    for key in table:
        if key not in SWEEP_KEYS:
            raise UserError(f"Unknown key {key!r} in [sweep] of sweep file '{path}'.{did_you_mean(key, SWEEP_KEYS)} "
                            f"Allowed: {', '.join(SWEEP_KEYS)}.")
    name = table.get("name", path.name.removesuffix(".toml").removesuffix(".sweep"))
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name) or name[0] == ".":
        raise UserError(f"The 'name' parameter of [sweep] must be a folder name (letters, digits, '-', '_', '.'). "
                        f"Got {name!r} instead.")
    output_dir = table.get("output-dir", DEFAULT_OUTPUT_DIR)
    if not isinstance(output_dir, str) or not output_dir:
        raise UserError(f"The 'output-dir' parameter of [sweep] must be a folder path. Got {output_dir!r} instead.")
    try:
        timeout = check_float("timeout", table.get("timeout", DEFAULT_TIMEOUT_S), owner="[sweep]",
                              low=0.0, low_open=True)
        parallel = check_int("max-parallel", table.get("max-parallel", 0), owner="[sweep]", low=0)
        cpus = check_int("cpus-per-trial", table.get("cpus-per-trial", 0), owner="[sweep]", low=0)
        memory = check_float("memory-per-trial-gb", table.get("memory-per-trial-gb", 0.0), owner="[sweep]",
                             low=0.0)
    except InvalidParameterError as err:
        raise UserError(str(err)) from None
    return {"name": name, "scenario": table.get("scenario"), "output-dir": output_dir, "timeout": timeout, "max-parallel": parallel or None,
            "cpus-per-trial": cpus, "memory-per-trial-gb": memory}


def _grid_points(grid: Mapping[str, Any], path: Path) -> list[dict[str, Any]]:
    for key, values in grid.items():
        _known_key(key, "[grid]", path)
        if not isinstance(values, list):
            raise UserError(f"The [grid] key '{key}' of sweep file '{path}' must be a list of values. "
                            f"Got {values!r} instead (write [{toml_value(values)}] for one value).")
        if not values:
            raise UserError(f"The [grid] key '{key}' of sweep file '{path}' is an empty list: the grid would "
                            "have no trial. Give at least one value.")
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def _split(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run-config overrides and federation overrides (``hospitals`` -> ``num-supernodes``)."""
    run: dict[str, Any] = {}
    federation: dict[str, Any] = {}
    for key, value in overrides.items():
        if key == HOSPITALS_ALIAS:
            federation["num-supernodes"] = value
        elif key in FEDERATION_KEYS:
            federation[key] = value
        else:
            run[key] = value
    return run, federation


# --------------------------------------------------------------------------- #
# Resources and ids                                                           #
# --------------------------------------------------------------------------- #


def hospitals_at_once(resolved: Mapping[str, Any], federation: Mapping[str, Any]) -> int:
    """How many hospitals train at the same time: the clients sampled per round, at most all."""
    from sims.config import clients_per_round

    n = int(federation["num-supernodes"])
    requested = int(resolved.get("clients-per-round", 0) or 0) or int(resolved.get("privacy.clients-per-round", 0) or 0)
    return clients_per_round(requested, n)


def trial_resources(
    resolved: Mapping[str, Any], federation: Mapping[str, Any], *, cpus_per_trial: int = 0,
    memory_per_trial_gb: float = 0.0,
) -> tuple[dict[str, Any], int, int, float]:
    """The federation config a trial runs with, and the CPUs, memory and GPUs it reserves.

    Flower's simulation sizes its actor pool from ``init-args-num-cpus`` (default: every
    CPU of the machine), so each trial gets an explicit one: the hospitals training at once
    times ``client-resources-num-cpus``. The trial reserves that plus one CPU for the
    ServerApp; ``cpus_per_trial`` overrides the reservation (and caps Flower's pool at one
    CPU fewer, at least one hospital's).

    Returns
    -------
    federation : dict
        With ``init-args-num-cpus`` (and ``init-args-num-gpus``) set unless given.
    cpus : int
    memory_bytes : int
    gpus : float
    """
    federation = dict(federation)
    at_once = hospitals_at_once(resolved, federation)
    per_hospital = int(federation["client-resources-num-cpus"])
    gpus_per_hospital = float(federation.get("client-resources-num-gpus", 0.0) or 0.0)
    if "init-args-num-cpus" in federation:
        pool = int(federation["init-args-num-cpus"])
    elif cpus_per_trial:
        pool = max(per_hospital, cpus_per_trial - 1)
    else:
        pool = at_once * per_hospital
    federation.setdefault("init-args-num-cpus", pool)
    cpus = cpus_per_trial or pool + 1
    gpus = gpus_per_hospital * at_once
    if gpus:
        federation.setdefault("init-args-num-gpus", math.ceil(gpus))
    memory_gb = memory_per_trial_gb or BASE_MEMORY_GB + MEMORY_PER_HOSPITAL_GB * at_once
    return federation, cpus, int(memory_gb * 1024**3), gpus


def trial_id(resolved: Mapping[str, Any], federation: Mapping[str, Any], digest: str) -> str:
    """A hash of what decides a trial's results: its config, its federation, the code."""
    config = {k: v for k, v in resolved.items() if k not in ("output-dir", "cache-dir")}
    payload = json.dumps({"run": config, "federation": dict(federation), "code": digest}, sort_keys=True,
                         default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:ID_LENGTH]


# --------------------------------------------------------------------------- #
# The whole sweep                                                             #
# --------------------------------------------------------------------------- #


def load_sweep(
    path: Path | str, *, project: Path | str = ".", timeout_s: float | None = None,
    max_parallel: int | None = None, scenarios: Path | str | None = None,
) -> SweepSpec:
    """Read, expand and validate a sweep file; start nothing, write nothing.

    Parameters
    ----------
    path : Path
        The sweep file, or a scenario file ``NAME.toml`` (then its comparison
        ``NAME.sweep.toml`` is the sweep).
    project : Path
        The fedscan project folder (its ``pyproject.toml`` holds the defaults).
    timeout_s, max_parallel : optional
        Command-line values that replace the file's ``[sweep]`` ones.
    scenarios : Path, optional
        Where ``[sweep] scenario`` is looked up; default: beside a comparison file
        (``NAME.sweep.toml`` next to ``NAME.toml``), else ``project/scenarios``.

    Raises
    ------
    UserError
        One sentence: the file, the section or trial, the key, the value, what is allowed.
    """
    path = Path(path)
    project = Path(project).resolve()
    data = _load_toml(path)
    if _is_scenario_file(data):  # `fedscan sweep scenarios/NAME.toml`: run the scenario's comparison
        path = _comparison_of(path)
        data = _load_toml(path)
    data = _read(path, data)
    settings = _sweep_settings(data.get("sweep", {}), path)
    companion = path.name.removesuffix(".sweep.toml")
    if path.name.endswith(".sweep.toml") and path.with_name(f"{companion}.toml").is_file() \
            and settings["scenario"] != companion:
        raise UserError(f"The 'scenario' parameter of [sweep] in comparison file '{path}' must be {companion!r}, "
                        f"the scenario beside it. Got {settings['scenario']!r} instead.")
    scenario = None if settings["scenario"] is None else _scenario(settings["scenario"], path, (
        Path(scenarios) if scenarios is not None else None), project)
    base = _flatten(data.get("run-config", {}))
    for key in base:
        _known_key(key, "[run-config]", path)
    base_federation = _flatten(data.get("federation-config", {}))
    federations: list[tuple[Mapping[str, Any], Path | None]] = [(base_federation, path)]
    if scenario is not None:
        federations.append((scenario.federation_config, scenario.comparison))
    for table, source in federations:
        for key in table:
            if key not in FEDERATION_KEYS and key != HOSPITALS_ALIAS:
                raise UserError(f"Unknown key {key!r} in [federation-config] of sweep file '{source}'."
                                f"{did_you_mean(key, FEDERATION_KEYS)} Allowed: {', '.join(FEDERATION_KEYS)}.")
    if scenario is not None:  # the scenario's keys and federation, then the sweep's own on top
        base = {**scenario.run_config, **base}
        base_federation = {**scenario.federation_config, **base_federation}
    points = _grid_points(_flatten(data.get("grid", {})), path)
    variants = [_flatten(entry) for entry in data.get("trials", [])] or [{}]
    for number, variant in enumerate(variants, start=1):
        for key in variant:
            _known_key(key, f"[[trials]] entry {number}", path)
    swept = list(dict.fromkeys([*(k for v in variants for k in v), *(points[0] if points else {})]))

    output_dir = (Path.cwd() / settings["output-dir"]).resolve()
    folder = output_dir / settings["name"]
    digest = code_digest(project)
    defaults = project_defaults(project)
    trials: list[TrialSpec] = []
    seen: dict[str, int] = {}
    for variant, point in itertools.product(variants, points):
        index = len(trials)
        overrides = {**base, **base_federation, **variant, **point}
        run, federation = _split(overrides)
        where = " ".join(f"{k}={toml_value(v)}" for k, v in {**variant, **point}.items()) or "the base config"
        try:
            plan = prepare({**run, "output-dir": str(folder)}, federation, project=project)
        except UserError as err:
            raise UserError(f"Trial {index + 1} ({where}) of sweep file '{path}': {err}") from None
        resolved = {**defaults, **{k: v for k, v in plan.run_config.items()}}
        federation, cpus, memory, gpus = trial_resources(
            resolved, plan.federation_config, cpus_per_trial=settings["cpus-per-trial"],
            memory_per_trial_gb=settings["memory-per-trial-gb"],
        )
        tid = trial_id(resolved, federation, digest)
        if tid in seen:
            raise UserError(f"Trials {seen[tid] + 1} and {index + 1} ({where}) of sweep file '{path}' resolve to "
                            "the same config; every trial must differ.")
        seen[tid] = index
        run_config = {**plan.run_config, "output-dir": str(folder / "trials" / tid)}
        plan = LaunchPlan(plan.project, run_config, federation, plan.warnings)
        values = {key: _swept_value(key, resolved, federation) for key in swept}
        trials.append(TrialSpec(index, tid, values, plan, {**resolved, "output-dir": run_config["output-dir"]},
                                cpus, memory, gpus))
    if timeout_s is not None and not (isinstance(timeout_s, int | float) and timeout_s > 0):
        raise UserError(f"The '--timeout' option must be a number of seconds > 0. Got {timeout_s!r} instead.")
    if max_parallel is not None and (isinstance(max_parallel, bool) or max_parallel < 1):
        raise UserError(f"The '--max-parallel' option must be an int >= 1. Got {max_parallel!r} instead.")
    return SweepSpec(
        name=settings["name"], file=path.resolve(), project=project, output_dir=output_dir,
        timeout_s=float(timeout_s if timeout_s is not None else settings["timeout"]),
        max_parallel=max_parallel if max_parallel is not None else settings["max-parallel"],
        swept_keys=tuple(swept), trials=tuple(trials), code_digest=digest, scenario=settings["scenario"],
    )


def count_trials(path: Path | str) -> int:
    """How many trials a sweep file expands to, read cheaply: no trial is validated (:func:`load_sweep` does).

    Raises
    ------
    UserError
        An unreadable file, an unknown section or key, a grid value that is not a list.
    """
    path = Path(path)
    data = _read(path)
    points = _grid_points(_flatten(data.get("grid", {})), path)
    return len(points) * max(1, len(data.get("trials", [])))


def _swept_value(key: str, resolved: Mapping[str, Any], federation: Mapping[str, Any]) -> Any:
    if key == HOSPITALS_ALIAS:
        return federation["num-supernodes"]
    if key in FEDERATION_KEYS:
        return federation.get(key)
    return resolved.get(key)


def trial_table(spec: SweepSpec) -> str:
    """The trials as a plain-text table (``--dry-run``)."""
    head = ["#", "trial", *spec.swept_keys, "hospitals", "cpus", "memory GB"]
    rows = [[str(t.index + 1), t.trial_id, *(toml_value(t.swept[k]) for k in spec.swept_keys),
             str(t.plan.num_hospitals), str(t.cpus), f"{t.memory_bytes / 1024**3:.1f}"] for t in spec.trials]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [head, *rows]]
    return "\n".join(lines)
