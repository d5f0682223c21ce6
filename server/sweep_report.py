"""The report of a Ray sweep: ``sweep_report.md`` and ``sweep_report.html``.

The sweep driver writes three files into the sweep folder as trials finish:

* ``sweep.json``: the sweep (name, swept run-config keys, the seed key, trial ids in sweep order);
* ``trials.jsonl``: one JSON object per trial (its latest attempt): swept values, resolved run
  config, status, node, wall time, peak memory, log tail;
* ``results.csv``: every trial's metric and privacy rows in long format
  (``trial, <swept keys>, round, site, split, metric, value``).

:func:`build_sweep_report` turns them into a Markdown report (plots as PNG files beside it) and
one self-contained HTML page (plots embedded as base64 PNG, no external resources). A **cell** is
one combination of the swept values other than the seed; per cell the report gives the mean and
sample standard deviation over the completed seeds of the final Dice and of the worst-case ε.

A trial's ε is its **worst case over hospitals** (the maximum of each hospital's ε at its last
round), never a mean across hospitals: each hospital's guarantee is its own. Client-level ε
(DP-FedAvg) protects a whole hospital and is reported in its own column, never added to it.
Only trials with status ``"completed"`` enter the aggregates; every other trial is listed with
its error and log tail.

The document model, the renderers and the plot helpers are those of the single-run privacy
report (:mod:`privacy.report`), so both reports look alike. Same inputs give the same bytes.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, MaxNLocator, StrMethodFormatter

from privacy.events import CLIENT_LEVEL
from privacy.report import (
    METRICS_COLUMNS,
    ReportError,
    _bad,
    _Block,
    _Bullets,
    _cells,
    _Figure,
    _finite,
    _fmt_eps,
    _Heading,
    _list_words,
    _Paragraph,
    _parse_count,
    _png,
    _quoted,
    _read_csv_as_text,
    _render_html,
    _render_markdown,
    _Table,
    _worst,
)

SWEEP_JSON = "sweep.json"
TRIALS_JSONL = "trials.jsonl"
RESULTS_CSV = "results.csv"
REPORT_MD = "sweep_report.md"
REPORT_HTML = "sweep_report.html"
DICE_EPSILON_PNG = "sweep_dice_epsilon.png"
DICE_ROUNDS_PNG = "sweep_dice_rounds.png"

COMPLETED = "completed"
NOT_REPORTED = "not reported"  # in sweep.json, no line in trials.jsonl yet
LOG_LINES = 20
CELL_STATS = (
    "strategy", "n_completed", "n_expected", "n_failed", "missing_seeds", "private",
    "dice_test_mean", "dice_test_std", "dice_public_mean", "dice_public_std",
    "epsilon_mean", "epsilon_std", "epsilon_max",
    "client_epsilon_mean", "client_epsilon_std", "client_epsilon_max", "flag",
)  # fmt: skip

# Terminal colour codes and other control characters in captured logs (Flower colours its log).
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x00-\x08\x0b-\x1f\x7f]")
_OFF: dict[str, Any] = {"linestyle": "--", "linewidth": 1.3}
_NO_SAMPLE_DP: dict[str, Any] = {"linestyle": ":", "linewidth": 1.5}
_EXTRA_CSS = """
pre { background: #f6f6f6; padding: 0.5rem; overflow-x: auto; font-size: 0.8rem; line-height: 1.3; }
details { margin: 0.5rem 0 1rem; } summary { cursor: pointer; color: #444; }
body { max-width: 90rem; } td { white-space: nowrap; }
td:last-child, th:last-child { white-space: normal; text-align: left; }
table { display: block; overflow-x: auto; max-width: 100%; }
""".strip()


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


def load_sweep(sweep_dir: str | Path) -> SweepData:
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
    return _aggregate(data, trial_table(data))


def _aggregate(data: SweepData, trials: pd.DataFrame) -> pd.DataFrame:
    reported = trials[trials["status"] != NOT_REPORTED]
    # sweep.json gives no swept values, so an unreported trial's cell is unknown. Seeds are mostly
    # swept as a grid: while some trials are unreported, a cell without one of the sweep's seeds is
    # taken to be short of it. Once every trial has reported, nothing is missing.
    unreported = len(trials) > len(reported)
    all_seeds = _unique(reported["seed"]) if data.seed_key and unreported else []
    seed_word = (lambda s: f"seed {_fmt_value(s)} ") if data.seed_key else (lambda s: "")
    rows = []
    for cell in _unique(reported["cell"]):
        members = reported[[c == cell for c in reported["cell"]]]
        done = members[members["status"] == COMPLETED]
        failed = members[members["status"] != COMPLETED]
        missing = [s for s in all_seeds if s not in members["seed"].tolist()]
        flags = [seed_word(t.seed) + str(t.status) for t in failed.itertuples()]
        flags += [f"seed {_fmt_value(s)} missing" for s in missing]
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


def _unique(values: pd.Series) -> list[Any]:
    """Distinct values in order of first appearance (``==`` semantics, so 8 and 8.0 are one)."""
    seen: list[Any] = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


def _learning_curves(data: SweepData, trials: pd.DataFrame, cells: pd.DataFrame) -> dict[int, pd.Series]:
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


# ------------------------------------------------------------------------------------ rendering


def build_sweep_report(sweep_dir: str | Path) -> tuple[Path, Path]:
    """Write ``sweep_report.md`` (with its PNG plots beside it) and ``sweep_report.html``.

    Returns
    -------
    tuple of pathlib.Path
        ``(markdown_path, html_path)``, both in the sweep folder.

    Raises
    ------
    SweepReportError
        If a sweep file is missing, unreadable or malformed (see :func:`load_sweep`).
    """
    data = load_sweep(sweep_dir)
    blocks = _report_blocks(data)
    for name in (DICE_EPSILON_PNG, DICE_ROUNDS_PNG):  # a plot of an earlier build may not apply now
        (data.sweep_dir / name).unlink(missing_ok=True)
    for block in blocks:
        if isinstance(block, _Figure):
            (data.sweep_dir / block.name).write_bytes(block.png)
    markdown, page = _render(blocks, title=f"Sweep report: {data.info['name']}")
    md_path, html_path = data.sweep_dir / REPORT_MD, data.sweep_dir / REPORT_HTML
    md_path.write_text(markdown, encoding="utf-8")
    html_path.write_text(page, encoding="utf-8")
    return md_path, html_path


@dataclass(frozen=True)
class _LogTail:
    """The last lines of a failed trial's log: a fenced block in Markdown, ``<details>`` in HTML."""

    lines: tuple[str, ...]


def _render(blocks: list[_Block | _LogTail], *, title: str) -> tuple[str, str]:
    """Markdown and HTML of ``blocks``: privacy.report's renderers, plus the log tails of our own."""
    tails: dict[str, _LogTail] = {}
    plain: list[_Block] = []
    for block in blocks:
        if isinstance(block, _LogTail):
            token = f"\x00log-tail-{len(tails)}\x00"  # no log line holds it: control characters are stripped
            tails[token] = block
            block = _Paragraph(token)
        plain.append(block)
    markdown = _render_markdown(plain)
    page = _render_html(plain, title=title).replace("</style>", f"{_EXTRA_CSS}\n</style>", 1)
    for token, tail in tails.items():
        text = "\n".join(tail.lines)
        fence = "`" * max(3, 1 + max(map(len, re.findall(r"`+", text)), default=0))
        markdown = markdown.replace(token, f"{fence}text\n{text}\n{fence}")
        summary = f"last {len(tail.lines)} log line{'' if len(tail.lines) == 1 else 's'}"
        body = html.escape(text, quote=False)
        details = f"<details><summary>{summary}</summary><pre>{body}</pre></details>"
        page = page.replace(f"<p>{token}</p>", details)
    return markdown, page


def _report_blocks(data: SweepData) -> list[_Block | _LogTail]:
    trials = trial_table(data)
    cells = _aggregate(data, trials)
    counts = sorted(trials["status"].value_counts().items(), key=lambda c: (c[0] != COMPLETED, c[0]))
    strategies = _unique(trials.loc[trials["status"] != NOT_REPORTED, "strategy"])
    info = data.info
    blocks: list[_Block | _LogTail] = [
        _Heading(1, f"Sweep report: {info['name']}"),
        _Bullets(
            (
                f"**sweep file**: {info.get('sweep_file', 'not recorded')}",
                f"**swept keys**: {', '.join(data.swept_keys) or 'none'}",
                f"**seed key**: {data.seed_key or 'none (each trial is its own cell)'}",
                f"**strategies**: {', '.join(strategies) or 'none recorded'}",
                f"**trials**: {len(trials)} ({', '.join(f'{n} {s}' for s, n in counts)}); "
                f"**cells**: {len(cells)}",
                f"**Ray address**: {info.get('address', 'not recorded')}",
                f"**code digest**: {info.get('code_digest', 'not recorded')}",
                f"**started at**: {info.get('started_at', 'not recorded')}",
            )
        ),
    ]
    pending = trials.index[trials["status"] == NOT_REPORTED].tolist()
    if pending:
        blocks.append(
            _Paragraph(
                f"{len(pending)} trial(s) of `{SWEEP_JSON}` have no line in `{TRIALS_JSONL}` yet (not run, "
                f"or still running), so their cells are not known: {_list_words(pending)}."
            )
        )
    blocks += _cell_blocks(data, cells)
    blocks += _dice_epsilon_blocks(data, cells)
    blocks += _rounds_blocks(data, trials, cells)
    blocks += _trial_blocks(data, trials)
    blocks += _failure_blocks(data, trials)
    return blocks


def _cell_blocks(data: SweepData, cells: pd.DataFrame) -> list[_Block | _LogTail]:
    blocks: list[_Block | _LogTail] = [_Heading(2, "Final Dice per cell")]
    if cells.empty:
        return [*blocks, _Paragraph("No trial has reported yet.")]
    over = "over completed seeds" if data.seed_key else "of the one trial per cell"
    blocks.append(
        _Paragraph(
            f"Mean ± sample standard deviation {over} (– with one seed). **Dice**: the global model's "
            "`dice_mean` at the trial's last round, on the pooled test patients and on the server's public "
            "set. **ε**: per trial, the worst case over hospitals (the maximum of each hospital's "
            "cumulative RDP ε), never averaged across hospitals; the cell shows its mean ± std and, in "
            "brackets, its maximum over seeds. Client-level ε (DP-FedAvg) protects a whole hospital and is "
            "not added. Highlighted rows are short of completed seeds."
        )
    )
    show_client = bool(cells["client_epsilon_max"].notna().any())
    header = [*data.cell_keys, "seeds done" if data.seed_key else "done", "test Dice", "public Dice"]
    header += ["worst-case ε (max over seeds)", *["client-level ε (max)"] * show_client, "short of seeds"]
    records = cells.to_dict("records")
    rows = []
    for cell in records:
        if not cell["private"] and cell["n_completed"]:
            epsilon = "non-private"
        elif math.isfinite(cell["epsilon_mean"]):
            spread = _fmt_mean_std(cell["epsilon_mean"], cell["epsilon_std"], eps=True)
            epsilon = f"{spread} ({_fmt_eps(cell['epsilon_max'])})"
        else:
            epsilon = _fmt_eps(cell["epsilon_mean"])
        rows.append(
            (
                *(_fmt_value(cell[k]) for k in data.cell_keys),
                f"{cell['n_completed']}/{cell['n_expected']}",
                _fmt_mean_std(cell["dice_test_mean"], cell["dice_test_std"]),
                _fmt_mean_std(cell["dice_public_mean"], cell["dice_public_std"]),
                epsilon,
                *[_fmt_eps(cell["client_epsilon_max"])] * show_client,
                cell["flag"] or "–",
            )
        )
    flagged = frozenset(i for i, cell in enumerate(records) if cell["flag"])
    return [*blocks, _Table(tuple(header), tuple(rows), emphasise=flagged)]


def _dice_epsilon_blocks(data: SweepData, cells: pd.DataFrame) -> list[_Block | _LogTail]:
    blocks: list[_Block | _LogTail] = [_Heading(2, "Dice against worst-case ε")]
    if not (np.isfinite(cells["epsilon_mean"].to_numpy(dtype=float)) & cells["dice_test_mean"].notna()).any():
        sentence = "The sweep has no completed trial with sample-level DP (finite ε): no plot."
        return [*blocks, _Paragraph(sentence)]
    # One line per combination of the other swept keys; privacy keys move along the line.
    series = [k for k in data.cell_keys if k != "strategy" and not k.startswith("privacy.")]
    caption = (
        "Final global test Dice (mean ± std over seeds) against the cell's mean worst-case ε (log scale), "
        "one panel per strategy" + (f", one line per {', '.join(series)}" if series else "")
        + "; dashed: non-private cells; dotted: cells without sample-level DP (ε = ∞)."
    )
    png = _dice_epsilon_figure(cells, series)
    return [*blocks, _Figure(DICE_EPSILON_PNG, png, "final Dice against worst-case epsilon", caption)]


def _rounds_blocks(data: SweepData, trials: pd.DataFrame, cells: pd.DataFrame) -> list[_Block | _LogTail]:
    blocks: list[_Block | _LogTail] = [_Heading(2, "Dice against rounds")]
    curves = _learning_curves(data, trials, cells)
    if not curves:
        return [*blocks, _Paragraph("No completed trial recorded a global test Dice: no learning curves.")]
    caption = "Global test `dice_mean` per round (mean over completed seeds), one panel per strategy."
    png = _rounds_figure(data, cells, curves)
    return [*blocks, _Figure(DICE_ROUNDS_PNG, png, "global test Dice against rounds", caption)]


def _trial_blocks(data: SweepData, trials: pd.DataFrame) -> list[_Block | _LogTail]:
    header = ("trial", *data.swept_keys, "status", "node", "wall s", "peak memory GB", "final test Dice",
              "run folder")  # fmt: skip
    rows = []
    for trial, outcome in trials.iterrows():
        record = data.trials.get(str(trial), {})
        swept = record.get("swept", {})
        wall, peak = _number(record.get("wall_s")), _number(record.get("peak_rss_bytes"))
        rows.append(
            (
                str(trial),
                *(_fmt_value(swept[k]) if k in swept else "–" for k in data.swept_keys),
                str(outcome["status"]),
                _fmt_node(record.get("node")),
                "–" if wall is None else f"{wall:.1f}",
                "–" if peak is None else f"{peak / 1e9:.2f}",
                "–" if math.isnan(outcome["dice_test"]) else f"{outcome['dice_test']:.3f}",
                _fmt_run_dir(data, record.get("run_dir")),
            )
        )
    note = _Paragraph("Run folders inside the sweep folder are shown relative to it.")
    return [_Heading(2, "Trials"), note, _Table(header, tuple(rows))]


def _failure_blocks(data: SweepData, trials: pd.DataFrame) -> list[_Block | _LogTail]:
    blocks: list[_Block | _LogTail] = [_Heading(2, "Failures")]
    # A trial that has not reported may still be running: it is listed above, not here.
    failed = [str(t) for t, s in trials["status"].items() if s not in (COMPLETED, NOT_REPORTED)]
    if not failed:
        return [*blocks, _Paragraph("No trial failed.")]
    for trial in failed:
        record = data.trials[trial]
        swept = ", ".join(f"{k}={_fmt_value(record['swept'][k])}" for k in data.swept_keys)
        code, log = record.get("exit_code"), record.get("log_tail") or []
        lines = [_CONTROL.sub("", str(line)) for line in (log if isinstance(log, list) else [log])]
        blocks += [
            _Heading(3, f"Trial {trial}: {record['status']}"),
            _Bullets(
                (
                    f"**swept**: {swept or 'nothing'}",
                    f"**exit code**: {'none' if code is None else code}",
                    f"**error**: {record.get('error') or 'none recorded'}",
                    f"**node**: {_fmt_node(record.get('node'))}",
                    f"**run folder**: {_fmt_run_dir(data, record.get('run_dir'))}",
                )
            ),
            _LogTail(tuple(lines[-LOG_LINES:])) if lines else _Paragraph("No log lines were recorded."),
        ]
    return blocks


def _number(value: Any) -> float | None:
    """A JSON number as float; ``None`` for null or anything else (the table shows "–")."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _fmt_value(value: Any) -> str:
    """A swept value as written in the sweep file (``true``, ``8``, ``0.5``, ``none``)."""
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def _fmt_mean_std(mean: float, std: float, *, eps: bool = False) -> str:
    if math.isnan(mean):
        return "n/a"
    number = _fmt_eps if eps else (lambda v: f"{v:.3f}")
    return f"{number(mean)} ± {'–' if math.isnan(std) else number(std)}"


def _fmt_run_dir(data: SweepData, run_dir: Any) -> str:
    """The run folder, relative to the sweep folder when inside it (the driver puts it there)."""
    if not run_dir:
        return "–"
    path, sweep = Path(str(run_dir)), data.sweep_dir.absolute()
    return str(path.relative_to(sweep)) if path.is_relative_to(sweep) else str(path)


def _fmt_node(node: Any) -> str:
    if not isinstance(node, dict):
        return "–"
    name, node_id = node.get("hostname") or node.get("ip") or "?", str(node.get("node_id") or "")
    return f"{name} ({node_id[:8]})" if node_id else str(name)


# ---------------------------------------------------------------------------------------- plots


def _panels(strategies: list[str], height: float) -> tuple[Figure, list[Any]]:
    """One panel per strategy, stacked."""
    figure = Figure(figsize=(9.0, 0.6 + height * len(strategies)), layout="constrained")
    axes = figure.subplots(len(strategies), 1, squeeze=False)[:, 0].tolist()
    for ax, strategy in zip(axes, strategies, strict=True):
        ax.set_title(f"strategy: {strategy}")
        ax.grid(True, alpha=0.3)
    return figure, axes


def _dice_epsilon_figure(cells: pd.DataFrame, series: list[str]) -> bytes:
    cells = cells[cells["dice_test_mean"].notna()]
    keys = [tuple(row) for row in cells[series].itertuples(index=False, name=None)]
    colours = {key: f"C{i % 10}" for i, key in enumerate(_unique(pd.Series(keys, dtype=object)))}
    epsilon = cells["epsilon_mean"].to_numpy(dtype=float)
    finite = epsilon[np.isfinite(epsilon)]
    strategies = _unique(cells["strategy"])
    figure, axes = _panels(strategies, 3.4)
    for ax, strategy in zip(axes, strategies, strict=True):
        for key, colour in colours.items():
            chosen = cells[[k == key and s == strategy for k, s in zip(keys, cells["strategy"], strict=True)]]
            label = ", ".join(f"{k}={_fmt_value(v)}" for k, v in zip(series, key, strict=True)) or "all cells"
            points = chosen[np.isfinite(chosen["epsilon_mean"].to_numpy(dtype=float))]
            points = points.sort_values("epsilon_mean", kind="stable")
            if len(points):
                std = points["dice_test_std"].fillna(0.0)  # one seed: no error bar
                ax.errorbar(points["epsilon_mean"], points["dice_test_mean"], yerr=std, color=colour,
                            marker="o", markersize=4, capsize=3, label=label)
            for row in chosen.itertuples():
                if not row.private:
                    ax.axhline(row.dice_test_mean, color=colour, label=f"{label}, non-private", **_OFF)
                elif math.isinf(row.epsilon_mean):
                    ax.axhline(row.dice_test_mean, color=colour, label=f"{label}, ε = ∞", **_NO_SAMPLE_DP)
        ax.set_xscale("log")
        ax.set_xlim(finite.min() / 1.6, finite.max() * 1.6)
        # Plain numbers at 1, 2, 5 x 10^k: ε is read off the axis, and 10^0, 10^1 alone say little.
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.xaxis.set_minor_formatter(StrMethodFormatter(""))
        ax.set_xlabel("worst-case ε over hospitals (per patient, log scale)")
        ax.set_ylabel("final test Dice")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))  # one entry per label, though a line may repeat
        ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _png(figure)


def _rounds_figure(data: SweepData, cells: pd.DataFrame, curves: dict[int, pd.Series]) -> bytes:
    strategies = _unique(cells["strategy"].iloc[sorted(curves)])
    shown = [k for k in data.cell_keys if k != "strategy"]
    figure, axes = _panels(strategies, 3.2)
    for ax, strategy in zip(axes, strategies, strict=True):
        for position, curve in curves.items():
            cell = cells.iloc[position]
            if cell["strategy"] == strategy:
                label = ", ".join(f"{k}={_fmt_value(cell[k])}" for k in shown) or "all trials"
                ax.plot(curve.index.to_numpy(), _finite(curve), color=f"C{position % 10}", marker="o",
                        markersize=2, label=label)
        ax.set_xlabel("round")
        ax.set_ylabel("global test Dice")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        # Below the panel: cell labels are long, and beside it they would squeeze the curves.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False, fontsize="small")
    return _png(figure)
