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
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, MaxNLocator, StrMethodFormatter

from privacy.report import (
    _Block,
    _Bullets,
    _Figure,
    _finite,
    _fmt_eps,
    _Heading,
    _list_words,
    _Paragraph,
    _png,
    _render_html,
    _render_markdown,
    _Table,
)
from scenarios import domain_shift_report, ood_report, robustness_report
from server.sweep_results import (
    COMPLETED,
    NOT_REPORTED,
    SWEEP_JSON,
    TRIALS_JSONL,
    SweepData,
    SweepReportError,
    aggregate_cells,
    cell_table,
    format_value,
    learning_curves,
    read_sweep_folder,
    trial_table,
    unique_values,
)

__all__ = ["SweepReportError", "build_sweep_report", "cell_table", "read_sweep_folder", "trial_table"]

REPORT_MD = "sweep_report.md"
REPORT_HTML = "sweep_report.html"
DICE_EPSILON_PNG = "sweep_dice_epsilon.png"
DICE_ROUNDS_PNG = "sweep_dice_rounds.png"

LOG_LINES = 20

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
        If a sweep file is missing, unreadable or malformed (see :func:`read_sweep_folder`).
    """
    data = read_sweep_folder(sweep_dir)
    blocks = _report_blocks(data)
    scenarios = (domain_shift_report, robustness_report, ood_report)
    scenario_figures = [name for scenario in scenarios for name in scenario.SWEEP_FIGURES]
    for name in (DICE_EPSILON_PNG, DICE_ROUNDS_PNG, *scenario_figures):  # an earlier build's plot may not apply now
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
    cells = aggregate_cells(data, trials)
    counts = sorted(trials["status"].value_counts().items(), key=lambda c: (c[0] != COMPLETED, c[0]))
    strategies = unique_values(trials.loc[trials["status"] != NOT_REPORTED, "strategy"])
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
    for scenario in (domain_shift_report, robustness_report, ood_report):
        blocks += scenario.sweep_section(data.sweep_dir, data.trials, data.results, data.seed_key)
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
                *(format_value(cell[k]) for k in data.cell_keys),
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
    curves = learning_curves(data, trials, cells)
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
                *(format_value(swept[k]) if k in swept else "–" for k in data.swept_keys),
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
        swept = ", ".join(f"{k}={format_value(record['swept'][k])}" for k in data.swept_keys)
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
    colours = {key: f"C{i % 10}" for i, key in enumerate(unique_values(pd.Series(keys, dtype=object)))}
    epsilon = cells["epsilon_mean"].to_numpy(dtype=float)
    finite = epsilon[np.isfinite(epsilon)]
    strategies = unique_values(cells["strategy"])
    figure, axes = _panels(strategies, 3.4)
    for ax, strategy in zip(axes, strategies, strict=True):
        for key, colour in colours.items():
            chosen = cells[[k == key and s == strategy for k, s in zip(keys, cells["strategy"], strict=True)]]
            label = ", ".join(f"{k}={format_value(v)}" for k, v in zip(series, key, strict=True)) or "all cells"
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
    strategies = unique_values(cells["strategy"].iloc[sorted(curves)])
    shown = [k for k in data.cell_keys if k != "strategy"]
    figure, axes = _panels(strategies, 3.2)
    for ax, strategy in zip(axes, strategies, strict=True):
        panel = [p for p in curves if cells.iloc[p]["strategy"] == strategy]
        # Name only what tells this panel's curves apart: a curve's values that differ from the
        # panel's most common ones (a key with one value here, or a curve's usual value, is noise).
        values = {k: [format_value(cells.iloc[p][k]) for p in panel] for k in shown}
        usual = {k: max(set(v), key=v.count) for k, v in values.items() if len(set(v)) > 1}
        for position, curve in curves.items():
            cell = cells.iloc[position]
            if cell["strategy"] == strategy:
                changed = [f"{k}={format_value(cell[k])}" for k in usual if format_value(cell[k]) != usual[k]]
                label = ", ".join(changed) or ("the most common values" if usual else "all trials")
                ax.plot(curve.index.to_numpy(), _finite(curve), color=f"C{position % 10}", marker="o",
                        markersize=2, label=label)
        ax.set_xlabel("round")
        ax.set_ylabel("global test Dice")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        # Below the panel: cell labels are long, and beside it they would squeeze the curves.
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False, fontsize="small")
    return _png(figure)
