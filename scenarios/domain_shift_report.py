"""The "Domain shift" sections of the run report and of the sweep report, and their plots.

:func:`run_section` is what :func:`privacy.report.build_report` appends for a domain-shift run
(config ``scenario = "domain_shift"``, or ``unseen``/``model-*``/``shift`` rows in ``metrics.csv``):
training against unseen hospitals' final Dice (one row per scanner severity when the unseen hospitals
come at several; AdaBN and fine-tuned rows when the run has them) with the gap and the fairness
figures, a per-site
table, Dice drop against histogram distance, the late joiner's curve and the local models'
site-by-site matrix; it writes ``domain_shift.csv`` into the run folder. :func:`sweep_section` is
what :func:`server.sweep_report.build_sweep_report` appends when a trial ran the scenario: the same
figures per setting (unseen Dice, gap and worst hospital per severity, AdaBN Dice and gain,
fine-tuned Dice), as means and sample standard deviations over seeds, and the sweep's
``domain_shift.csv`` (with a ``trial`` column).

The numbers come from :mod:`scenarios.domain_shift_tables`; the blocks are those of
:mod:`privacy.report` (so both reports render them, to Markdown and to one self-contained HTML
page). Every mean here is over hospitals, each counting once (fairness is about hospitals, not
patients). Plots use :class:`matplotlib.figure.Figure` with the Agg canvas, never pyplot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from privacy.report import CONFIG_JSON, _Block, _Bullets, _Figure, _Heading, _Paragraph, _png, _Table
from scenarios.domain_shift_tables import (
    DICE,
    DOMAIN_SHIFT_CSV,
    MODEL_PREFIX,
    VIEWS,
    RunInfo,
    applies,
    class_names,
    fairness,
    late_join,
    local_matrix,
    over_seeds,
    read_config,
    run_info,
    severity_gaps,
    shift_drop,
    site_values,
    sweep_rows,
    tidy_rows,
    trial_scenario,
)

__all__ = ["RUN_FIGURES", "SWEEP_FIGURES", "run_section", "sweep_section"]

DROP_PNG = "domain_shift_drop.png"
LATE_PNG = "domain_shift_late_join.png"
MATRIX_PNG = "domain_shift_local_matrix.png"
RUN_FIGURES = (DROP_PNG, LATE_PNG, MATRIX_PNG)
SWEEP_HEATMAP_PNG = "sweep_domain_shift_heatmap.png"
SWEEP_BARS_PNG = "sweep_domain_shift_bars.png"
SWEEP_LATE_PNG = "sweep_domain_shift_late_join.png"
SWEEP_DROP_PNG = "sweep_domain_shift_drop.png"
SWEEP_FIGURES = (SWEEP_HEATMAP_PNG, SWEEP_BARS_PNG, SWEEP_LATE_PNG, SWEEP_DROP_PNG)
"""PNG files the sweep section may write; a rebuild removes the ones that no longer apply."""

HEADING = "Domain shift"
_ROLE_STYLE: dict[str, dict[str, Any]] = {
    "train": {"marker": "o", "color": "C0"},
    "late": {"marker": "^", "color": "C2"},
    "noisy": {"marker": "s", "color": "C1"},
    "unseen": {"marker": "D", "color": "C3"},
}
_MEANS = (
    "Means are over hospitals, each counting once (the `global` rows of `metrics.csv` weight hospitals "
    "by patients); **worst** is the lowest hospital's Dice, **spread** the best minus the worst."
)


# ---------------------------------------------------------------------------------------- a run


def run_section(run_dir: str | Path, metrics: pd.DataFrame) -> list[_Block]:
    """The "Domain shift" blocks of a run's report, and ``RUN_DIR/domain_shift.csv``.

    Parameters
    ----------
    run_dir
        The run folder (its ``config.json`` is read here).
    metrics
        Its ``metrics.csv`` as :func:`privacy.report._load_metrics` reads it.

    Returns
    -------
    list
        Nothing when the run is not a domain-shift run; else the section's blocks (a run without
        ``config.json`` gets one paragraph saying the roles are unknown, and no CSV).

    Raises
    ------
    privacy.report.ReportError
        If ``config.json`` is unreadable or its ``roles`` are malformed.
    """
    run = Path(run_dir)
    record = read_config(run) if (run / CONFIG_JSON).is_file() else None
    config = record.get("config") if isinstance(record, dict) else None
    config = config if isinstance(config, dict) else {}
    scenario, shift = config.get("scenario"), config.get("shift")
    if not applies(scenario if isinstance(scenario, str) else None, metrics, shift if isinstance(shift, dict) else None):
        return []
    if record is None:
        return [
            _Heading(2, HEADING),
            _Paragraph(
                f"`metrics.csv` has domain-shift rows, but `{CONFIG_JSON}` is not in the run folder, so the "
                f"hospitals' roles and the setting are unknown: no `{DOMAIN_SHIFT_CSV}` and no tables."
            ),
        ]
    info = run_info(record, metrics, where=str(run / CONFIG_JSON))
    rows = tidy_rows(metrics, info)
    rows.to_csv(run / DOMAIN_SHIFT_CSV, index=False, lineterminator="\n")
    return run_blocks(rows, info)


def run_blocks(rows: pd.DataFrame, info: RunInfo) -> list[_Block]:
    """The section's blocks from the run's tidy rows (:func:`scenarios.domain_shift_tables.tidy_rows`)."""
    training = [r.site for r in info.roles if r.role != "unseen"]
    unseen = [r.site for r in info.roles if r.role == "unseen"]
    intro = (
        f"Setting **{info.setting}**: strategy {info.strategy}, mitigation {info.mitigation}; "
        f"{_count(training, 'training hospital')} ({_ids(training)}) and {_count(unseen, 'unseen hospital')} "
        f"({_ids(unseen) or 'none'}), which never train and only evaluate the model at their own node. "
        f"Final round. {_MEANS} Every row is in `{DOMAIN_SHIFT_CSV}`."
    )
    if info.roles_source != CONFIG_JSON:
        intro += f" The roles are {info.roles_source}: archetypes and severities are unknown."
    blocks: list[_Block] = [_Heading(2, HEADING), _Paragraph(intro)]
    fair = fairness(rows, by_severity=True)
    if fair.empty:
        return [*blocks, _Paragraph("No hospital's test or unseen Dice was recorded yet.")]
    blocks += _fairness_tables(fair)
    blocks += _adabn_gain(severity_gaps(rows))
    if fair["derived"].any():
        blocks.append(_Paragraph(
            "Strategy local trains no shared model: an unseen hospital's Dice is the mean over the local "
            "models of their Dice at it (what it gets from one hospital's model picked at random)."
        ))  # fmt: skip
    blocks.append(_site_table(rows, info))
    drop = shift_drop(rows)
    if len(drop):
        blocks.append(
            _Figure(
                DROP_PNG,
                _drop_figure(drop, by_setting=False),
                "Dice drop against histogram distance",
                "Each hospital's Dice drop (the training hospitals' mean Dice minus its own) against the "
                "1-Wasserstein distance of its intensity histogram to the training hospitals' mean histogram"
                + _rank_correlation(drop) + ".",
            )
        )
    blocks += _late_blocks(rows, info)
    matrix = local_matrix(rows)
    if not matrix.empty:
        roles = {r.site: r.test_role for r in info.roles}
        blocks.append(
            _Figure(
                MATRIX_PNG,
                _heatmap(_matrix_labels(matrix), roles, title="Local models, site by site"),
                "local models' Dice at every hospital",
                "Strategy local: row i is hospital i's own model, column j the hospital it is tested at; the "
                "diagonal is each model on its own hospital's test split.",
            )
        )
    return blocks


def _fairness_tables(fair: pd.DataFrame) -> list[_Block]:
    """Per view (the unseen ones per severity when there are several): mean, worst hospital, spread
    and gap; then per class the mean and the worst hospital."""
    train = fair.loc[fair["view"] == "test", "dice_mean"]
    reference = float(train.iloc[0]) if len(train) else math.nan
    several = _several_severities(fair)
    header = ("hospitals", "n", "mean Dice", "worst (hospital)", "spread", "gap to training")
    rows = []
    for row in fair.to_dict("records"):
        gap = "–" if row["view"] in ("test", "finetuned") else _num(reference - row["dice_mean"])
        rows.append((_view(row, several), str(row["n_hospitals"]), _num(row["dice_mean"]),
                     _worst(row["dice_worst"], row["worst_hospital"]), _num(row["dice_spread"]), gap))  # fmt: skip
    blocks: list[_Block] = [_Table(header, tuple(rows))]
    classes = [c.removesuffix("_worst") for c in fair.columns if c.endswith("_worst") and c != "dice_worst"]
    with_classes = [r for r in fair.to_dict("records") if any(not math.isnan(r[f"{c}_mean"]) for c in classes)]
    if classes and with_classes:
        blocks.append(_Paragraph("Per class: the mean over hospitals / the worst hospital's Dice."))
        per_class = [(_view(r, several), *(f"{_num(r[f'{c}_mean'])} / {_num(r[f'{c}_worst'])}" for c in classes))
                     for r in with_classes]  # fmt: skip
        blocks.append(_Table(("hospitals", *(c.replace("_", " ") for c in classes)), tuple(per_class)))
    return blocks


def _adabn_gain(gaps: pd.DataFrame) -> list[_Block]:
    """One sentence with the AdaBN gain per severity, when the run has ``unseen-tta`` rows."""
    gaps = gaps[gaps["tta_gain"].notna()]
    if gaps.empty:
        return []
    several = len(gaps) > 1
    parts = [(f"severity {_severity(r['severity'])} " if several else "") + _num(r["tta_gain"], "+.3f")
             for r in gaps.to_dict("records")]  # fmt: skip
    return [_Paragraph(
        "**TTA gain** (each unseen hospital's Dice after test-time adaptation, AdaBN or TENT, minus "
        "before, mean over the hospitals): "
        + ", ".join(parts) + "."
    )]  # fmt: skip


def _several_severities(fair: pd.DataFrame) -> bool:
    """Whether the unseen hospitals come at more than one severity (then their rows are split)."""
    unseen = fair[fair["view"].isin(("unseen", "unseen-tta"))]
    return bool(unseen.groupby(["trial", "view"], sort=False).size().gt(1).any())


def _view(row: Mapping[str, Any], several: bool = False) -> str:
    label = VIEWS[row["view"]]
    if several and row["view"] in ("unseen", "unseen-tta"):
        label += f", severity {_severity(row['severity'])}"
    return label + (" (mean over local models)" if row["derived"] else "")


def _severity(value: Any) -> str:
    return "unknown" if value is None or math.isnan(float(value)) else format(float(value), "g")


def _site_table(rows: pd.DataFrame, info: RunInfo) -> _Table:
    values = site_values(rows)
    dice = values[values["metric"] == DICE]
    main = dice[(dice["view"] == "test") | ((dice["view"] == "unseen") & (dice["test_role"] == "unseen"))]
    main_by_site = dict(zip(main["test_hospital"], main["value"], strict=True))
    extra = [v for v in ("unseen-tta", "finetuned") if (dice["view"] == v).any()]
    extra_by_site = {v: dict(zip(dice.loc[dice["view"] == v, "test_hospital"],
                                 dice.loc[dice["view"] == v, "value"], strict=True)) for v in extra}  # fmt: skip
    distance = shift_drop(rows).set_index("test_hospital")["distance"]
    reference = float(main.loc[main["view"] == "test", "value"].mean())
    header = ("site", "role", "archetype", "severity", "joins in round", "final Dice",
              *(VIEWS[v].replace("training hospitals ", "").replace("unseen hospitals ", "") for v in extra),
              "histogram distance", "Dice drop")  # fmt: skip
    sites = sorted({r.site for r in info.roles} | set(main_by_site))
    table = []
    for site in sites:
        role = info.role_of(site)
        table.append(
            (
                f"h{site}",
                role.test_role if role else "unseen",
                role.archetype if role else "unknown",
                _num(role.severity, ".2g") if role else "n/a",
                ("never" if role.join_round == 0 else str(role.join_round)) if role else "n/a",
                _num(main_by_site.get(site, math.nan)),
                *(_num(extra_by_site[v].get(site, math.nan)) for v in extra),
                _num(distance.get(site, math.nan), ".4f"),
                _num(reference - main_by_site.get(site, math.nan), "+.3f"),
            )
        )
    return _Table(header, tuple(table))


def _late_blocks(rows: pd.DataFrame, info: RunInfo) -> list[_Block]:
    blocks: list[_Block] = []
    for role in info.late_joiners:
        late = late_join(rows, role.site, role.join_round)
        if late.late.empty:
            continue
        blocks.append(
            _Bullets(
                (
                    f"**Late joiner**: hospital {role.site} trains from round {role.join_round}. Its Dice: "
                    f"{_num(late.late_before)} in round {role.join_round - 1} (before it trained), "
                    f"{_num(late.late_final)} at the end.",
                    f"**Forgetting**: the original hospitals' mean Dice in round {role.join_round - 1} minus at "
                    f"the final round = {_num(late.forgetting, '+.3f')} (positive: they lost Dice once the "
                    "newcomer trained).",
                )
            )
        )
        blocks.append(
            _Figure(
                LATE_PNG if len(info.late_joiners) == 1 else f"domain_shift_late_join_h{role.site}.png",
                _late_figure([(f"hospital {role.site}", late.late, late.originals, role.join_round)]),
                f"late joiner hospital {role.site}: Dice against rounds",
                f"Test Dice per round of the late joiner (hospital {role.site}) and the mean of the hospitals "
                f"that trained from round 1; dotted: round {role.join_round}, when it joined.",
            )
        )
    return blocks


# -------------------------------------------------------------------------------------- a sweep


def sweep_section(
    sweep_dir: str | Path,
    trials: Mapping[str, Mapping[str, Any]],
    results: pd.DataFrame,
    seed_key: str | None,
) -> list[_Block]:
    """The "Domain shift" blocks of a sweep report, and ``SWEEP_DIR/domain_shift.csv``.

    Parameters
    ----------
    sweep_dir
        The sweep folder (the CSV is written into it).
    trials
        ``trials.jsonl`` by trial id (:attr:`server.sweep_results.SweepData.trials`).
    results
        ``results.csv`` (:attr:`server.sweep_results.SweepData.results`).
    seed_key
        The swept seed key, or ``None``.

    Returns
    -------
    list
        Nothing when no trial ran the domain-shift scenario; else the section (completed trials only).
    """
    if not any(trial_scenario(record) == "domain_shift" for record in trials.values()):
        return []
    rows, infos = sweep_rows(trials, results, seed_key)
    rows.to_csv(Path(sweep_dir) / DOMAIN_SHIFT_CSV, index=False, lineterminator="\n")
    blocks: list[_Block] = [_Heading(2, HEADING)]
    if rows.empty:
        return [*blocks, _Paragraph("No domain-shift trial has completed yet.")]
    fair = fairness(rows, by_severity=True)
    gaps = severity_gaps(rows)
    several = _several_severities(fair)
    blocks.append(
        _Paragraph(
            "One row per setting (strategy, normalisation, mitigation and shift settings; the other swept "
            "values when they tell settings apart): mean ± sample standard deviation over completed seeds (– "
            f"with one seed) of the final round's figures. {_MEANS} "
            + ("The unseen hospitals come at several scanner severities (**sev**), each its own group. "
               if several else "")
            + "**Gap**: training minus unseen mean; **worst**: the lowest unseen hospital's Dice, with the "
            "hospital most often lowest (in how many seeds). "
            + ("**TTA**: the same hospitals after test-time adaptation (AdaBN or TENT, as the setting says; "
               "split `unseen-tta`); **gain**: after "
               "minus before, per trial, then over seeds. " if gaps["tta_dice"].notna().any() else "")
            + ("**Fine-tuned**: the training hospitals after local fine-tuning (split `finetuned`). "
               if gaps["finetuned_dice"].notna().any() else "")
            + f"Every row of every trial is in `{DOMAIN_SHIFT_CSV}` (with a `trial` column)."
        )
    )  # fmt: skip
    blocks += _setting_tables(gaps)
    if fair["derived"].any():
        blocks.append(_Paragraph(
            "Strategy local has no shared model: its unseen Dice is the mean over the local models of their "
            "Dice at each unseen hospital."
        ))  # fmt: skip
    heat, roles = _sweep_heatmap(rows)
    if not heat.empty:
        blocks.append(
            _Figure(
                SWEEP_HEATMAP_PNG,
                _heatmap(heat, roles, title="Final Dice per test hospital (mean over seeds)"),
                "Dice per test hospital and setting",
                "Final `dice_mean` at each test hospital (columns; role below the id when all settings agree) "
                "for each setting (rows; training hospitals on their test split, unseen hospitals under the "
                "global model), mean over seeds. Rows \"local: model of h<i>\": hospital i's own model at every "
                "hospital (strategy local).",
            )
        )
    if gaps[["train_dice", "unseen_dice"]].notna().any().any():
        blocks.append(
            _Figure(
                SWEEP_BARS_PNG,
                _bars_figure(gaps),
                "training and unseen Dice per setting",
                "Mean final Dice of the training and the unseen hospitals"
                + (" (one bar per scanner severity)" if several else "")
                + " per setting, grouped by strategy; error bars: sample standard deviation over seeds.",
            )
        )
    blocks += _sweep_late_blocks(rows, infos)
    drop = shift_drop(rows)
    drop = drop[drop["test_role"] == "unseen"]
    if len(drop):
        blocks.append(
            _Figure(
                SWEEP_DROP_PNG,
                _drop_figure(drop, by_setting=True),
                "unseen hospitals' Dice drop against histogram distance",
                "Every completed trial's unseen hospitals: Dice drop (training hospitals' mean minus the "
                "hospital's) against the histogram distance to the training hospitals, by setting"
                + _rank_correlation(drop) + ".",
            )
        )
    blocks += [_Heading(3, "Fairness"), _sweep_fairness_table(fair)]
    return blocks


_MAX_WIDTH = 130
"""Characters: a setting table wider than this (its widest cell per column, the longest header
word, and 3 for the cell's padding and border) is split in two rather than scrolled or shrunk;
the sweep page's tables get about 1300 px, some 8.5 px per character."""


def _setting_tables(gaps: pd.DataFrame) -> list[_Table]:
    """Per setting: training Dice, per unseen severity the Dice, gap and worst hospital, then AdaBN
    and fine-tuning when the data has them; one table, or two (training and gaps / worst, AdaBN and
    fine-tuning) when one would be wider than :data:`_MAX_WIDTH`. The setting label names the
    strategy and the mitigation, so they get no columns of their own."""
    keys = ("setting", "strategy", "mitigation")
    overall = over_seeds(gaps.drop_duplicates("trial"), ("train_dice", "finetuned_dice"), by=keys)
    per_severity = over_seeds(gaps, ("unseen_dice", "gap", "unseen_worst", "tta_dice", "tta_gain"),
                              by=("setting", "severity"))  # fmt: skip
    severities = _severities(gaps)
    several = len(severities) > 1
    tta, finetuned = gaps["tta_dice"].notna().any(), gaps["finetuned_dice"].notna().any()

    def tag(severity: float, before: str, after: str = "") -> str:
        return f"{before} sev {_severity(severity)}{after}" if several else f"{before}{after}"

    settings = overall.to_dict("records")
    stats = {(r["setting"], i): _lookup(per_severity, r["setting"], s) for r in settings
             for i, s in enumerate(severities)}  # fmt: skip
    # Column groups, each a header and one cell per setting; they are packed into tables below.
    main: list[tuple[str, list[str]]] = [("seeds", [str(r["n_seeds"]) for r in settings]),
                                         ("training Dice", [_mean_std(r, "train_dice") for r in settings])]
    worst: list[tuple[str, list[str]]] = []
    adabn: list[tuple[str, list[str]]] = []
    for i, severity in enumerate(severities):
        main.append((tag(severity, "unseen", " Dice"), [_mean_std(stats[r["setting"], i], "unseen_dice")
                                                          for r in settings]))
        main.append((tag(severity, "gap"), [_mean_std(stats[r["setting"], i], "gap") for r in settings]))
        cells = []
        for r in settings:
            chosen = gaps[(gaps["setting"] == r["setting"]) & _same(gaps["severity"], severity)]
            value = _mean_std(stats[r["setting"], i], "unseen_worst")
            cells.append(value if value == "n/a" else f"{value}, {_most_often(chosen['unseen_worst_hospital'])}")
        worst.append((tag(severity, "worst") if several else "worst unseen", cells))
        if tta:
            adabn.append((tag(severity, "TTA", " Dice"), [_mean_std(stats[r["setting"], i], "tta_dice")
                                                            for r in settings]))
            adabn.append((tag(severity, "TTA gain"), [_mean_std(stats[r["setting"], i], "tta_gain", "+.3f")
                                                         for r in settings]))
    tail = [("fine-tuned training Dice", [_mean_std(r, "finetuned_dice") for r in settings])] if finetuned else []
    first = ("setting", [str(r["setting"]) for r in settings])
    tables: list[list[tuple[str, list[str]]]] = []
    for group in (main, worst, adabn, tail):
        if not group:
            continue
        if tables and _width(_as_table([*tables[-1], *group])) <= _MAX_WIDTH:
            tables[-1] += group
        else:
            tables.append([first, *group])
    return [_as_table(columns) for columns in tables]


def _as_table(columns: Sequence[tuple[str, Sequence[str]]]) -> _Table:
    return _Table(tuple(h for h, _ in columns), tuple(zip(*(cells for _, cells in columns), strict=True)))


def _width(table: _Table) -> int:
    """The table's width in characters as a browser lays it out (header words may wrap, cells not)."""
    columns = zip(table.header, *table.rows, strict=True)
    return sum(3 + max(max(len(w) for w in head.split()), *(len(c) for c in cells)) for head, *cells in columns)


def _severities(gaps: pd.DataFrame) -> list[float]:
    """The unseen hospitals' severities in increasing order, unknown (NaN) last; ``[nan]`` if none."""
    known = gaps.loc[gaps["n_unseen"] > 0, "severity"].astype(float)
    found = [float(s) for s in sorted(known.dropna().unique())]
    return found + [math.nan] if known.isna().any() or not found else found


def _same(column: pd.Series, severity: float) -> pd.Series:
    return column.isna() if math.isnan(severity) else column == severity


def _lookup(stats: pd.DataFrame, setting: str, severity: float) -> dict[str, Any]:
    """The ``over_seeds`` row of a setting and severity; NaN values when it has none."""
    chosen = stats[(stats["setting"] == setting) & _same(stats["severity"], severity)]
    if chosen.empty:
        return {c: math.nan for c in stats.columns if c.endswith(("_mean", "_std"))}
    return dict(chosen.iloc[0])


def _sweep_fairness_table(fair: pd.DataFrame) -> _Table:
    classes = class_names(pd.DataFrame({"metric": [f"dice_{c.removesuffix('_worst')}" for c in fair.columns
                                                   if c.endswith("_worst") and c != "dice_worst"]}))  # fmt: skip
    values = ("dice_mean", "dice_worst", "dice_spread", *(f"{c}_worst" for c in classes))
    stats = over_seeds(fair, values, by=("setting", "view", "severity"))
    several = _several_severities(fair)
    header = ("setting", "hospitals", "seeds", "mean Dice", "worst Dice", "worst hospital", "spread",
              *(f"worst {c}" for c in classes))  # fmt: skip
    rows = []
    for row in stats.to_dict("records"):
        chosen = fair[(fair["setting"] == row["setting"]) & (fair["view"] == row["view"])
                      & _same(fair["severity"], row["severity"])]  # fmt: skip
        derived = {"derived": bool(chosen["derived"].any())}
        rows.append(
            (
                row["setting"], _view({**row, **derived}, several), str(row["n_seeds"]), _mean_std(row, "dice_mean"),
                _mean_std(row, "dice_worst"), _most_often(chosen["worst_hospital"]), _mean_std(row, "dice_spread"),
                *(_mean_std(row, f"{c}_worst") for c in classes),
            )
        )  # fmt: skip
    return _Table(header, tuple(rows))


def _sweep_heatmap(rows: pd.DataFrame) -> tuple[pd.DataFrame, dict[int, str]]:
    """Settings (and local models) x test hospitals, final Dice, mean over seeds; and the test
    hospitals' roles where every trial agrees on them."""
    values = site_values(rows)
    dice = values[values["metric"] == DICE]
    main = dice[(dice["view"] == "test") | ((dice["view"] == "unseen") & (dice["test_role"] == "unseen"))]
    table = main.groupby(["setting", "test_hospital"], sort=False)["value"].mean().unstack("test_hospital")
    parts = [table]
    local = rows[rows["split"].str.startswith(MODEL_PREFIX)]
    local_settings = list(dict.fromkeys(local["setting"]))
    for setting in local_settings:
        matrix = local_matrix(rows[rows["setting"] == setting])
        suffix = f" ({setting})" if len(local_settings) > 1 else ""
        matrix.index = [f"local: model of h{i}{suffix}" for i in matrix.index]
        parts.append(matrix)
    heat = pd.concat(parts)
    heat = heat[sorted(heat.columns)]
    roles = rows.groupby("test_hospital")["test_role"].unique()
    agreed = {int(site): str(r[0]) for site, r in roles.items() if len(r) == 1}
    return heat, agreed


def _sweep_late_blocks(rows: pd.DataFrame, infos: Mapping[str, RunInfo]) -> list[_Block]:
    curves: dict[str, list[tuple[int, int, Any]]] = {}
    for trial, info in infos.items():
        for role in info.late_joiners:
            late = late_join(rows[rows["trial"] == trial], role.site, role.join_round)
            if len(late.late):
                curves.setdefault(info.setting, []).append((role.site, role.join_round, late))
    if not curves:
        return []
    panels, notes = [], []
    for setting, members in curves.items():
        late_mean = pd.concat([m[2].late for m in members], axis=1).mean(axis=1)
        originals = pd.concat([m[2].originals for m in members], axis=1).mean(axis=1)
        join = members[0][1]
        forgetting = pd.DataFrame({"forgetting": [m[2].forgetting for m in members], "setting": setting})
        stats = over_seeds(forgetting, ("forgetting",)).iloc[0].to_dict()
        sites = sorted({m[0] for m in members})
        panels.append((f"{setting}: hospital {_ids(sites)}", late_mean, originals, join))
        notes.append(
            f"**{setting}**: hospital {_ids(sites)} joins in round {join}; forgetting (originals' mean Dice in "
            f"round {join - 1} minus at the end) {_mean_std(stats, 'forgetting', '+.3f')} over "
            f"{_count(list(range(len(members))), 'seed')}."
        )
    caption = ("Test Dice per round of the late joiner and the mean of the hospitals that trained from round 1, "
               "mean over seeds; dotted: the round it joined.")  # fmt: skip
    figure = _Figure(SWEEP_LATE_PNG, _late_figure(panels), "late joiner: Dice against rounds", caption)
    return [_Heading(3, "Late joiner"), _Bullets(tuple(notes)), figure]


# ---------------------------------------------------------------------------------------- plots


def _drop_figure(drop: pd.DataFrame, *, by_setting: bool) -> bytes:
    figure = Figure(figsize=(8.0, 4.6), layout="constrained")
    ax = figure.subplots()
    if by_setting:
        for index, (setting, group) in enumerate(drop.groupby("setting", sort=False)):
            ax.scatter(group["distance"], group["drop"], color=f"C{index % 10}", marker="D", s=28, label=setting)
    else:
        for role, group in drop.groupby("test_role", sort=False):
            style = _ROLE_STYLE.get(str(role), {"marker": "o", "color": "0.4"})
            ax.scatter(group["distance"], group["drop"], s=36, label=f"{role} hospitals", **style)
            for point in group.itertuples(index=False):
                ax.annotate(f"h{point.test_hospital}", (point.distance, point.drop), textcoords="offset points",
                            xytext=(5, 4), fontsize=8)  # fmt: skip
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_xlabel("histogram distance to the training hospitals (1-Wasserstein, intensity units)")
    ax.set_ylabel("Dice drop (training mean − hospital)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    return _png(figure)


def _late_figure(panels: Sequence[tuple[str, pd.Series, pd.Series, int]]) -> bytes:
    figure = Figure(figsize=(8.0, 0.6 + 3.0 * len(panels)), layout="constrained")
    axes = figure.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (title, late, originals, join) in zip(axes, panels, strict=True):
        ax.plot(originals.index.to_numpy(), originals.to_numpy(dtype=float), color="C0", marker="o", markersize=3,
                label="original hospitals (mean)")  # fmt: skip
        ax.plot(late.index.to_numpy(), late.to_numpy(dtype=float), color="C2", marker="^", markersize=4,
                label="late joiner")  # fmt: skip
        ax.axvline(join, color="black", linestyle=":", linewidth=1.5, label=f"joins in round {join}")
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylabel("test Dice")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", framealpha=0.9, fontsize="small")
    return _png(figure)


def _heatmap(matrix: pd.DataFrame, roles: Mapping[int, str], *, title: str) -> bytes:
    values = matrix.to_numpy(dtype=float)
    n_rows, n_cols = values.shape
    label_width = max((len(str(i)) for i in matrix.index), default=10)
    figure = Figure(figsize=(1.5 + 0.07 * label_width + 0.75 * n_cols, 1.4 + 0.42 * n_rows), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(n_rows):
        for j in range(n_cols):
            if not math.isnan(values[i, j]):
                colour = "black" if values[i, j] > 0.6 else "white"
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", color=colour, fontsize=8)
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels([f"h{c}" + (f"\n{roles[c]}" if c in roles else "") for c in matrix.columns], fontsize=8)
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels([str(i) for i in matrix.index], fontsize=8)
    ax.set_xlabel("test hospital")
    ax.set_title(title)
    figure.colorbar(image, ax=ax, label="Dice", shrink=0.9)
    return _png(figure)


def _bars_figure(gaps: pd.DataFrame) -> bytes:
    """Per setting (grouped by strategy): a bar for the training hospitals and one per unseen
    severity, mean over seeds with the sample standard deviation as error bar."""
    overall = _by_strategy(over_seeds(gaps.drop_duplicates("trial"), ("train_dice",), by=("strategy", "setting")))
    per_severity = over_seeds(gaps, ("unseen_dice",), by=("setting", "severity"))
    severities = _severities(gaps)
    several = len(severities) > 1
    n, groups = len(overall), 1 + len(severities)
    width = 0.8 / groups
    figure = Figure(figsize=(max(6.0, 1.2 + (0.7 + 0.35 * groups) * n), 4.8), layout="constrained")
    ax = figure.subplots()
    x = np.arange(n)
    # Unseen bars in reds, darker for a more severe scanner.
    reds: list[Any] = ["C3"] if not several else [
        colormaps["Reds"](0.45 + 0.45 * i / (len(severities) - 1)) for i in range(len(severities))
    ]  # fmt: skip
    bars: list[tuple[str, Any, pd.Series, pd.Series]] = [
        ("training hospitals", "C0", overall["train_dice_mean"], overall["train_dice_std"])
    ]
    for severity, colour in zip(severities, reds, strict=True):
        stats = [_lookup(per_severity, setting, severity) for setting in overall["setting"]]
        label = f"unseen, severity {_severity(severity)}" if several else "unseen hospitals"
        bars.append((label, colour, pd.Series([s["unseen_dice_mean"] for s in stats]),
                     pd.Series([s["unseen_dice_std"] for s in stats])))  # fmt: skip
    for index, (label, colour, mean, std) in enumerate(bars):
        offset = (index - (groups - 1) / 2) * width
        ax.bar(x + offset, mean.fillna(0.0).to_numpy(dtype=float), width=width, color=colour, label=label,
               yerr=std.to_numpy(dtype=float), capsize=3)  # NaN std (one seed): no error bar  # fmt: skip
    ax.set_xticks(x)
    ax.set_xticklabels([str(s).replace(" · ", "\n") for s in overall["setting"]], fontsize=8)
    ax.set_ylabel("final Dice (mean over hospitals)")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _png(figure)


# ----------------------------------------------------------------------------------- formatting


def _num(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(float(value), spec)


def _mean_std(row: Mapping[str, Any], name: str, spec: str = ".3f") -> str:
    mean, std = row[f"{name}_mean"], row[f"{name}_std"]
    if math.isnan(mean):
        return "n/a"
    return f"{format(mean, spec)} ± {'–' if math.isnan(std) else format(std, spec.lstrip('+'))}"


def _worst(value: float, hospital: Any) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f} (h{hospital})"


def _most_often(hospitals: pd.Series) -> str:
    """The hospital most often worst over seeds, with how often (``"h4 (3/3)"``)."""
    known = [int(h) for h in hospitals if h is not None and not (isinstance(h, float) and math.isnan(h))]
    if not known:
        return "n/a"
    counts = pd.Series(known).value_counts()
    best = int(min(counts.index[counts == counts.max()]))
    return f"h{best} ({counts[best]}/{len(known)})"


def _by_strategy(stats: pd.DataFrame) -> pd.DataFrame:
    """Settings grouped by strategy, strategies in order of first appearance."""
    order = {s: i for i, s in enumerate(dict.fromkeys(stats["strategy"]))}
    return stats.assign(_o=stats["strategy"].map(order)).sort_values("_o", kind="stable").drop(columns="_o")


def _matrix_labels(matrix: pd.DataFrame) -> pd.DataFrame:
    return matrix.set_axis([f"model of h{i}" for i in matrix.index], axis=0)


def _rank_correlation(drop: pd.DataFrame) -> str:
    """``"; Spearman's ρ = 0.62 over 12 points"`` (rank correlation of distance and drop), or ``""``
    with fewer than 3 points or a constant column."""
    if len(drop) < 3 or drop["distance"].nunique() < 2 or drop["drop"].nunique() < 2:
        return ""
    rho = drop["distance"].rank().corr(drop["drop"].rank())  # Spearman = Pearson on ranks
    return f"; Spearman's ρ = {rho:.2f} over {len(drop)} points"


def _count(items: Sequence[Any], noun: str) -> str:
    return f"{len(items)} {noun}" + ("" if len(items) == 1 else "s")


def _ids(sites: Sequence[int]) -> str:
    return ", ".join(str(s) for s in sites)
