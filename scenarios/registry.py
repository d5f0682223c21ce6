"""Named scenarios: the TOML files in ``scenarios/``, found, read and validated.

A scenario ``NAME`` is up to three files side by side:

- ``NAME.toml`` (required): the single run. Its first line is ``# <one-line description>``;
  the rest is run-config keys only, top-level or in tables (``[shift]``, ``[mitigation]``,
  ``[privacy]``, ...) that flatten to keys declared in ``pyproject.toml``
  ``[tool.flwr.app.config]``, and it sets ``scenario = "NAME"``. Values are scalars. That
  is all Flower accepts: its SuperLink refuses any run-config key the app does not declare
  (``fuse_dicts(..., check_keys=True)``), so the file works as it is with
  ``flwr run . --run-config scenarios/NAME.toml`` as with ``fedscan run --scenario NAME``.
- ``NAME.sweep.toml`` (optional): the comparison, a sweep file (:mod:`server.sweep_spec`)
  whose ``[sweep]`` table says ``scenario = "NAME"``; its ``[federation-config]`` is also the
  federation ``fedscan run --scenario NAME`` uses by default.
- ``NAME.py`` (optional): the pure code the scenario needs.

This module reads files and validates them against :mod:`sims.config`; it starts nothing
and imports no Flower app code. Mistakes raise :class:`ScenarioError`, one sentence naming
the file, the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from common.validation import did_you_mean
from sims.config import ConfigError, check_known_keys, config_from_run_config

__all__ = [
    "COMPARISON_SUFFIX",
    "SCENARIO_FOLDER",
    "SCENARIO_KEY",
    "ScenarioError",
    "ScenarioInfo",
    "list_scenarios",
    "load_scenario",
    "read_scenario",
    "scenario_names",
]

SCENARIO_FOLDER = Path(__file__).resolve().parent
"""The shipped scenarios: this package's folder."""
COMPARISON_SUFFIX = ".sweep.toml"
SCENARIO_KEY = "scenario"
_SCALARS = (bool, int, float, str)  # what a Flower run-config value may be
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # sims.config's rule for the 'scenario' key


class ScenarioError(ValueError):
    """A scenario name or file is wrong (one sentence; the CLI exits with code 2)."""


@dataclasses.dataclass(frozen=True)
class ScenarioInfo:
    """One named scenario, validated.

    Attributes
    ----------
    name : str
        The file's stem, equal to its ``scenario`` key.
    path : Path
        ``NAME.toml`` (absolute).
    description : str
        Its first line, without the ``#``.
    run_config : Mapping
        Its keys flattened as Flower flattens them (``{"shift.unseen-hospitals": 8, ...}``),
        every one declared in ``pyproject.toml``, together a valid config (read-only).
    comparison : Path or None
        ``NAME.sweep.toml`` when it exists.
    federation_config : Mapping
        The comparison's ``[federation-config]``, flattened (``hospitals`` may stand for
        ``num-supernodes``, as in sweep files); empty without a comparison. Read, not
        validated: the launcher checks federation keys.
    """

    name: str
    path: Path
    description: str
    run_config: Mapping[str, Any]
    comparison: Path | None
    federation_config: Mapping[str, Any]


def scenario_names(folder: Path | str = SCENARIO_FOLDER) -> list[str]:
    """The scenario names in ``folder``, sorted: every ``*.toml`` but the ``*.sweep.toml``. Reads nothing."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".toml")] for p in folder.glob("*.toml")
                  if not p.name.endswith(COMPARISON_SUFFIX) and p.is_file())


def list_scenarios(folder: Path | str = SCENARIO_FOLDER) -> list[ScenarioInfo]:
    """Every scenario in ``folder``, sorted by name, each validated.

    Raises
    ------
    ScenarioError
        The first invalid scenario file.
    """
    return [read_scenario(Path(folder) / f"{name}.toml") for name in scenario_names(folder)]


def load_scenario(name: str, folder: Path | str = SCENARIO_FOLDER) -> ScenarioInfo:
    """The scenario ``name`` of ``folder``, validated.

    Raises
    ------
    ScenarioError
        An unknown name (with the nearest known one and the list), or an invalid file.
    """
    known = scenario_names(folder)
    if name not in known:
        listed = ", ".join(known) if known else "none"
        raise ScenarioError(f"Unknown scenario {name!r}.{did_you_mean(name, known)} Known scenarios: {listed} "
                            "(fedscan scenarios lists them).")
    return read_scenario(Path(folder) / f"{name}.toml")


def read_scenario(path: Path | str) -> ScenarioInfo:
    """Read and validate one scenario file ``NAME.toml`` (and its comparison's federation).

    Raises
    ------
    ScenarioError
        Unreadable or invalid TOML (with the line), no description line, a table that is not
        a scenario's (``[sweep]``, ``[grid]``, ...), a list or other non-scalar value, an
        undeclared key (with the nearest declared one), a ``scenario`` key that is not the
        file's name, or an invalid value or combination.
    """
    path = Path(path).resolve()
    name = path.name[: -len(".toml")] if path.name.endswith(".toml") else path.name
    text = _read_text(path, "scenario file")
    first = text.lstrip("\ufeff").split("\n", 1)[0].strip()
    if not first.startswith("#") or not first.lstrip("#").strip():
        raise ScenarioError(f"The scenario file '{path}' must start with a '# <one-line description>' comment "
                            f"(fedscan scenarios shows it). Got {first!r} instead.")
    description = first.lstrip("#").strip()
    data = _parse_toml(text, path, "scenario file")
    run_config = _flatten_scalars(data, path, name)
    try:
        check_known_keys(list(run_config))
    except ConfigError as err:
        raise ScenarioError(f"Scenario file '{path}': {err} A scenario file holds only declared run-config keys "
                            f"(Flower refuses others); lists and sweep settings go in {name}{COMPARISON_SUFFIX}.") \
            from None
    declared = run_config.get(SCENARIO_KEY)
    if declared != name:
        hint = "" if _NAME.fullmatch(name) else (
            " (a scenario name is lower-case letters, digits, '_' or '-': rename the file)")
        raise ScenarioError(f"The '{SCENARIO_KEY}' key of scenario file '{path}' must be the file's name, "
                            f"{name!r}. Got {declared!r} instead{hint}.")
    try:
        config_from_run_config(run_config)
    except ConfigError as err:
        raise ScenarioError(f"Scenario file '{path}': {err}") from None
    comparison = path.with_name(f"{name}{COMPARISON_SUFFIX}")
    federation: dict[str, Any] = {}
    if comparison.is_file():
        federation = _comparison_federation(comparison)
    return ScenarioInfo(name=name, path=path, description=description, run_config=MappingProxyType(run_config),
                        comparison=comparison if comparison.is_file() else None,
                        federation_config=MappingProxyType(federation))


# --------------------------------------------------------------------------- #
# Reading                                                                     #
# --------------------------------------------------------------------------- #


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise ScenarioError(f"The {what} '{path}' does not exist.") from None
    except IsADirectoryError:
        raise ScenarioError(f"The {what} '{path}' is a folder, not a .toml file.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ScenarioError(f"The {what} '{path}' cannot be read ({type(err).__name__}).") from None


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """Read and parse a TOML file; a missing, unreadable or invalid file is one sentence naming
    ``what`` and ``path`` (:class:`ScenarioError`). The sweep loader reads its files with it too."""
    return _parse_toml(_read_text(path, what), path, what)


def _parse_toml(text: str, path: Path, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:  # its message ends "(at line L, column C)"
        raise ScenarioError(f"The {what} '{path}' is not valid TOML: {err}.") from None


def _flatten_scalars(
    table: Mapping[str, Any], path: Path, name: str, prefix: str = "", *, what: str = "scenario file"
) -> dict[str, Any]:
    """Flatten as ``flwr.common.config.flatten_dict`` does, naming the key of a value it would refuse."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten_scalars(value, path, name, f"{dotted}.", what=what))
        elif isinstance(value, _SCALARS):
            flat[dotted] = value
        elif what != "scenario file":
            raise ScenarioError(f"The key '{dotted}' in {what} '{path}' must be a bool, int, float or string. "
                                f"Got {value!r} instead.")
        elif isinstance(value, list) and not prefix and all(isinstance(v, dict) for v in value):
            raise ScenarioError(f"Scenario file '{path}' has [[{dotted}]] entries; a scenario file holds one run, "
                                f"its comparison goes in {name}{COMPARISON_SUFFIX}.")
        else:
            kind = "a list" if isinstance(value, list) else type(value).__name__
            raise ScenarioError(f"The key '{dotted}' in scenario file '{path}' must be a bool, int, float or string "
                                f"(Flower run-config values are scalars). Got {kind} {value!r} instead; values to "
                                f"compare go in {name}{COMPARISON_SUFFIX}.")
    return flat


def _comparison_federation(path: Path) -> dict[str, Any]:
    """The flattened ``[federation-config]`` of a comparison file (``{}`` when it has none)."""
    data = read_toml(path, "comparison file")
    table = data.get("federation-config", {})
    if not isinstance(table, dict):
        raise ScenarioError(f"The [federation-config] part of comparison file '{path}' must be a table. "
                            f"Got {type(table).__name__} instead.")
    return _flatten_scalars(table, path, path.name[: -len(COMPARISON_SUFFIX)], what="comparison file")
