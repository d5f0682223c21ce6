"""The results of a Ray sweep, read back and aggregated: the data behind the sweep report.

Reads the three files the sweep driver writes into the sweep folder (``sweep.json``,
``trials.jsonl``, ``results.csv``; see :mod:`server.sweep_runner`), checks them (one sentence
naming the file on any problem: :class:`SweepReportError`) and computes the per-trial and
per-cell tables: a **cell** is one combination of the swept values other than the seed; per cell,
the mean and sample standard deviation over the completed seeds of the final Dice and of the
worst-case ε (the maximum over hospitals, never a mean across them). Rendering is
:mod:`server.sweep_report`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from privacy.events import CLIENT_LEVEL
from privacy.report import (
    METRICS_COLUMNS,
    ReportError,
    _bad,
    _cells,
    _parse_count,
    _quoted,
    _read_csv_as_text,
    _worst,
)

SWEEP_JSON = "sweep.json"
TRIALS_JSONL = "trials.jsonl"
RESULTS_CSV = "results.csv"

COMPLETED = "completed"
NOT_REPORTED = "not reported"  # in sweep.json, no line in trials.jsonl yet
CELL_STATS = (
    "strategy", "n_completed", "n_expected", "n_failed", "missing_seeds", "private",
    "dice_test_mean", "dice_test_std", "dice_public_mean", "dice_public_std",
    "epsilon_mean", "epsilon_std", "epsilon_max",
    "client_epsilon_mean", "client_epsilon_std", "client_epsilon_max", "flag",
)  # fmt: skip




class SweepReportError(ValueError):
    """A missing, unreadable or malformed sweep file, explained in one sentence naming the file."""


@dataclass(frozen=True)
class SweepData:
    """The three sweep files, read and checked.

    Attributes
    ----------
    sweep_dir
        The sweep folder.
    info
        ``sweep.json`` as written by the driver.
    swept_keys
        The swept run-config keys, in sweep order.
    seed_key
        The swept key that holds the seed, or ``None`` when seeds are not swept.
    trial_ids
        Every trial of the sweep, in sweep order.
    trials
        ``trials.jsonl``: trial id -> its latest record; a trial with no line yet is absent.
    results
        ``results.csv`` as columns ``trial, round, site, split, metric, value`` (``round`` int,
        ``value`` float, possibly ``inf`` or NaN). Swept values come from :attr:`trials`, typed.
    """

    sweep_dir: Path
    info: dict[str, Any]
    swept_keys: tuple[str, ...]
    seed_key: str | None
    trial_ids: tuple[str, ...]
    trials: dict[str, dict[str, Any]]
    results: pd.DataFrame

    @property
    def cell_keys(self) -> tuple[str, ...]:
        """The swept keys that define a cell: all but the seed."""
        return tuple(k for k in self.swept_keys if k != self.seed_key)


# --------------------------------------------------------------------------------------- loading


def read_sweep_folder(sweep_dir: str | Path) -> SweepData:
    """Read and check ``sweep.json``, ``trials.jsonl`` and ``results.csv`` of a sweep folder.

    Raises
    ------
    SweepReportError
        If the folder or a file is missing, or a file is unreadable or malformed; the message
        names the file (and the line) and what is wrong.
    """
    folder = Path(sweep_dir)
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise SweepReportError(f"Sweep folder {folder} {state}; give the folder that holds {SWEEP_JSON}.")
    info = _load_info(folder / SWEEP_JSON)
    swept, trial_ids = tuple(info["swept_keys"]), tuple(info["trials"])
    trials = _load_trials(folder / TRIALS_JSONL, swept, trial_ids)
    try:
        results = _load_results(folder / RESULTS_CSV, swept, trial_ids)
    except ReportError as err:  # privacy.report's CSV helpers explain the problem already
        raise SweepReportError(str(err)) from None
    return SweepData(folder, info, swept, info["seed_key"], trial_ids, trials, results)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise SweepReportError(f"{path} is missing; the sweep driver writes it into the sweep folder.")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SweepReportError(f"{path} cannot be read ({err}).") from None


def _load_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise SweepReportError(f"{path} is not readable JSON ({err}).") from None

    def bad(key: str, rule: str, value: Any) -> SweepReportError:
        return SweepReportError(f"The '{key}' entry of {path} must be {rule}. Got {value!r} instead.")

    if not isinstance(info, dict):
        raise SweepReportError(f"{path} must hold a JSON object. Got {type(info).__name__} instead.")
    for key in ("swept_keys", "trials"):
        value = info.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad(key, "a list of strings", value)
        if len(set(value)) != len(value):
            raise bad(key, "a list without repeats", value)
    info.setdefault("seed_key", None)
    if info["seed_key"] is not None and info["seed_key"] not in info["swept_keys"]:
        rule = f"null or one of the swept keys {_quoted(info['swept_keys'])}"
        raise bad("seed_key", rule, info["seed_key"])
    info["name"] = str(info.get("name") or path.parent.name)
    return info


def _load_trials(
    path: Path, swept: tuple[str, ...], trial_ids: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    for line, text in enumerate(_read_text(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise SweepReportError(f"{path}, line {line}: not a JSON object ({err.msg}).") from None
        if not isinstance(record, dict):
            raise SweepReportError(f"{path}, line {line} must be a JSON object. Got {record!r} instead.")
        trial, values, status = record.get("trial"), record.get("swept"), record.get("status")
        if trial not in trial_ids:
            raise SweepReportError(
                f"{path}, line {line}: 'trial' must be one of the trial ids in {SWEEP_JSON}. "
                f"Got {trial!r} instead."
            )
        if not isinstance(values, dict) or set(values) != set(swept):
            raise SweepReportError(
                f"{path}, line {line}: 'swept' must be an object with exactly the swept keys "
                f"{_quoted(swept)}. Got {values!r} instead."
            )
        if not isinstance(status, str):
            raise SweepReportError(f"{path}, line {line}: 'status' must be a string. Got {status!r} instead.")
        records[trial] = record  # a later line is a later attempt of the same trial
    return {t: records[t] for t in trial_ids if t in records}


def _load_results(path: Path, swept: tuple[str, ...], trial_ids: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise SweepReportError(f"{path} is missing; the sweep driver writes it into the sweep folder.")
    raw = _read_csv_as_text(path, ("trial", *swept, *METRICS_COLUMNS))
    known = set(trial_ids)
    for line, trial in _cells(raw, "trial"):
        if trial not in known:
            raise _bad(path, "trial", line, f"one of the trial ids in {SWEEP_JSON}", trial)
    values = []
    for line, text in _cells(raw, "value"):
        try:
            values.append(float(text) if text else math.nan)
        except ValueError:
            raise _bad(path, "value", line, "a number, 'inf' or empty", text) from None

    def strings(column: str) -> pd.Series:
        return pd.Series([v for _, v in _cells(raw, column)], dtype=object)

    rounds = [_parse_count(path, "round", line, v) for line, v in _cells(raw, "round")]
    sites = [str(int(v)) if v.isdigit() else v for v in strings("site")]
    # Explicit dtypes: a header-only file (no trial finished yet) must give the same column types.
    frame = pd.DataFrame(
        {
            "trial": strings("trial"),
            "round": pd.Series(rounds, dtype="int64"),
            "site": pd.Series(sites, dtype=object),
            "split": strings("split"),
            "metric": strings("metric"),
            "value": pd.Series(values, dtype="float64"),
        }
    )
    # A retried trial may have rows of both attempts: the later row (the latest attempt) counts.
    return frame.drop_duplicates(["trial", "round", "site", "split", "metric"], keep="last")


# ----------------------------------------------------------------------------------- aggregates


def trial_table(data: SweepData) -> pd.DataFrame:
    """One row per trial of the sweep (index: trial id, sweep order) with its own results.

    Columns: ``status`` (``"not reported"`` for a trial without a ``trials.jsonl`` line),
    ``cell`` (tuple of the cell's swept values; ``None`` when not reported), ``seed``,
    ``strategy``, ``dice_test`` and ``dice_public`` (global ``dice_mean`` at the trial's last round
    on the test and public split), ``private`` (the trial has privacy rows), ``epsilon`` (the
    maximum over hospitals of ``epsilon_rdp`` at each hospital's last privacy round; NaN when it
    has none) and ``client_epsilon`` (``epsilon_rdp`` of the client-level accountant's last round).
    """
    by_trial = dict(tuple(data.results.groupby("trial", sort=False)))
    rows = []
    for trial in data.trial_ids:
        record = data.trials.get(trial)
        results = by_trial.get(trial, data.results.iloc[0:0])
        privacy = results[(results["split"] == "privacy") & (results["metric"] == "epsilon_rdp")]
        privacy = privacy.sort_values("round", kind="stable")
        last = privacy.drop_duplicates("site", keep="last")  # each site's last privacy round
        swept = record["swept"] if record else {}
        config = record.get("config") if record else None
        rows.append(
            {
                "trial": trial,
                "status": record["status"] if record else NOT_REPORTED,
                "cell": tuple(swept[k] for k in data.cell_keys) if record else None,
                "seed": swept.get(data.seed_key) if data.seed_key else None,
                "strategy": str(config.get("strategy", "unknown")) if isinstance(config, dict) else "unknown",
                "dice_test": _final_dice(results, "test"),
                "dice_public": _final_dice(results, "public"),
                "private": bool((results["split"] == "privacy").any()),
                "epsilon": _worst(last.loc[last["site"].str.isdigit(), "value"].tolist()),
                "client_epsilon": _worst(last.loc[last["site"] == CLIENT_LEVEL, "value"].tolist()),
            }
        )
    return pd.DataFrame(rows).set_index("trial")


def cell_table(data: SweepData) -> pd.DataFrame:
    """Per-cell aggregates over the completed seeds, one row per cell in sweep order.

    Columns: one per cell key (typed swept values), then :data:`CELL_STATS` (``strategy``, from the
    run config, only when it is not swept): ``n_completed``; ``n_expected`` (the cell's trials, plus its
    ``missing_seeds``: while trials of ``sweep.json`` have not reported, the seeds swept elsewhere
    that this cell has no trial of); ``n_failed``; ``private`` (a completed trial has
    privacy rows); ``*_mean`` / ``*_std`` (sample std, ddof = 1, NaN for one value) of the final
    global test and public Dice and of the trials' worst-case ε (``inf`` when a seed's is),
    ``epsilon_max`` (max over seeds), the same three for client-level ε; ``flag``: why the cell is
    short of seeds ("" when it is not).
    """
    return aggregate_cells(data, trial_table(data))


def aggregate_cells(data: SweepData, trials: pd.DataFrame) -> pd.DataFrame:
    reported = trials[trials["status"] != NOT_REPORTED]
    # sweep.json gives no swept values, so an unreported trial's cell is unknown. Seeds are mostly
    # swept as a grid: while some trials are unreported, a cell without one of the sweep's seeds is
    # taken to be short of it. Once every trial has reported, nothing is missing.
    unreported = len(trials) > len(reported)
    all_seeds = unique_values(reported["seed"]) if data.seed_key and unreported else []
    seed_word = (lambda s: f"seed {format_value(s)} ") if data.seed_key else (lambda s: "")
    rows = []
    for cell in unique_values(reported["cell"]):
        members = reported[[c == cell for c in reported["cell"]]]
        done = members[members["status"] == COMPLETED]
        failed = members[members["status"] != COMPLETED]
        missing = [s for s in all_seeds if s not in members["seed"].tolist()]
        flags = [seed_word(t.seed) + str(t.status) for t in failed.itertuples()]
        flags += [f"seed {format_value(s)} missing" for s in missing]
        stats: dict[str, Any] = {
            "strategy": members["strategy"].iloc[0],
            "n_completed": len(done),
            "n_expected": len(members) + len(missing),
            "n_failed": len(failed),
            "missing_seeds": tuple(missing),
            "private": bool(done["private"].any()),
            "flag": "; ".join(flags),
        }
        for name in ("dice_test", "dice_public", "epsilon", "client_epsilon"):
            stats[f"{name}_mean"], stats[f"{name}_std"] = _mean_std(done[name])
        stats["epsilon_max"] = _worst(done["epsilon"].tolist())
        stats["client_epsilon_max"] = _worst(done["client_epsilon"].tolist())
        rows.append({**stats, **dict(zip(data.cell_keys, cell, strict=True))})
    # A swept "strategy" is a cell column already (and the same as the config's).
    columns = [*data.cell_keys, *(c for c in CELL_STATS if c not in data.cell_keys)]
    return pd.DataFrame(rows, columns=columns)


def _global_dice(results: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of the global model's ``dice_mean`` on ``split``."""
    chosen = (results["site"] == "global") & (results["split"] == split) & (results["metric"] == "dice_mean")
    return results[chosen]


def _final_dice(results: pd.DataFrame, split: str) -> float:
    """Global ``dice_mean`` on ``split`` at the last round that has it; NaN if none."""
    rows = _global_dice(results, split).sort_values("round", kind="stable")
    return float(rows["value"].iloc[-1]) if len(rows) else math.nan


def _mean_std(values: pd.Series) -> tuple[float, float]:
    """Mean and sample std (ddof = 1) ignoring NaN; ``(inf, nan)`` if any value is infinite."""
    array = values.to_numpy(dtype=float)
    array = array[~np.isnan(array)]
    if array.size == 0:
        return math.nan, math.nan
    if np.isinf(array).any():
        return math.inf, math.nan
    return float(np.mean(array)), (float(np.std(array, ddof=1)) if array.size > 1 else math.nan)


def unique_values(values: pd.Series) -> list[Any]:
    """Distinct values in order of first appearance (``==`` semantics, so 8 and 8.0 are one)."""
    seen: list[Any] = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


def learning_curves(data: SweepData, trials: pd.DataFrame, cells: pd.DataFrame) -> dict[int, pd.Series]:
    """Global test ``dice_mean`` per round, mean over completed seeds, by row position in ``cells``."""
    done = trials[trials["status"] == COMPLETED]
    dice = _global_dice(data.results, "test")
    curves = {}
    for position, cell in enumerate(cells[list(data.cell_keys)].itertuples(index=False, name=None)):
        members = done.index[[c == cell for c in done["cell"]]]
        rows = dice[dice["trial"].isin(members)]
        if len(rows):
            curves[position] = rows.groupby("round")["value"].mean()
    return curves


def format_value(value: Any) -> str:
    """A swept value as written in the sweep file (``true``, ``8``, ``0.5``, ``none``)."""
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, "g")
    return str(value)
