"""The "Out-of-distribution detection" sections of the run report and of the sweep report.

A run whose config enables OOD scores writes ``ood.csv`` (tidy: ``ood_set, kind, method, metric,
value``; per OOD set, ``near`` or ``far``, and per score, AUROC, AUPR, the FPR at the configured TPR
and, for sets with labels, selective-prediction figures) and ``ood_scores.csv`` (per image: ``site,
ood_set, kind, image, method, score, dice``; ``ood_set`` ``in`` for in-distribution test images;
higher score = more out-of-distribution): exactly what left the hospitals.

:func:`run_section` is what :func:`privacy.report.build_report` appends for such a run: AUROC of
every score on every set (the best in bold) with the best score's AUPR and FPR, the selective
prediction table on the near sets, the targets (met or not), ROC curves and Dice against coverage.
:func:`sweep_section` is what :func:`server.sweep_report.build_sweep_report` appends when completed
trials carried ``ood.csv`` (``record["tables"]["ood.csv"]``): per setting (as
:mod:`scenarios.robustness_report` names them) the mean and sample standard deviation over seeds of
each set's AUROC for the best score and of the selective Dice gap, and the sweep's ``ood.csv``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from privacy.report import CONFIG_JSON, _Block, _Bullets, _Figure, _Heading, _Paragraph, _png, _Table
from scenarios.domain_shift_report import _mean_std, _num
from scenarios.domain_shift_tables import over_seeds, read_config
from scenarios.ood import selective_dice
from scenarios.ood_tables import IN, OOD_COLUMNS, OOD_CSV, OOD_SCORES_CSV
from scenarios.ood_tables import NEAR_MIXED as MIXED
from scenarios.ood_tables import SCORES_COLUMNS as SCORE_COLUMNS
from scenarios.robustness_report import (
    load_timings,
    read_table,
    scenario_seconds,
    tidy_frame,
    trial_settings,
    trial_tables,
)

__all__ = [
    "OOD_COLUMNS",
    "OOD_CSV",
    "OOD_SCORES_CSV",
    "RUN_FIGURES",
    "SCORE_COLUMNS",
    "SWEEP_FIGURES",
    "auroc_table",
    "best_methods",
    "run_section",
    "selective_table",
    "sweep_section",
]

ROC_PNG = "ood_roc.png"
COVERAGE_PNG = "ood_selective.png"
RUN_FIGURES = (ROC_PNG, COVERAGE_PNG)
SWEEP_FIGURES: tuple[str, ...] = ()
"""The sweep section draws no figure."""

HEADING = "Out-of-distribution detection"
_METHODS_PER_TABLE = 5
FAR_AUROC, NEAR_AUROC, DICE_GAP = 0.99, 0.90, 0.02
"""Targets: every far set's and every near set's best AUROC at least these; every near set's Dice gap at most."""
_SELECTIVE = ("dice_in", "dice_mixed", "dice_accepted", "coverage", "dice_gap")


# ----------------------------------------------------------------------------------- numbers


def auroc_table(ood: pd.DataFrame) -> pd.DataFrame:
    """OOD sets (file order) x methods (file order): AUROC, plus columns ``kind``; NaN where absent."""
    auroc = ood[ood["metric"] == "auroc"]
    table = auroc.pivot_table(index="ood_set", columns="method", values="value", aggfunc="first", sort=False)
    table = table.reindex(
        index=list(dict.fromkeys(auroc["ood_set"])), columns=list(dict.fromkeys(auroc["method"]))
    )
    kinds = auroc.drop_duplicates("ood_set").set_index("ood_set")["kind"]
    return table.assign(kind=kinds.reindex(table.index))[["kind", *table.columns]]


def best_methods(ood: pd.DataFrame) -> dict[str, str]:
    """Per OOD set, the method with the highest AUROC (the first in file order on a tie)."""
    table = auroc_table(ood).drop(columns="kind")
    return {str(s): str(row.idxmax()) for s, row in table.iterrows() if row.notna().any()}


def _value(ood: pd.DataFrame, ood_set: str, method: str, metric: str) -> float:
    chosen = ood[(ood["ood_set"] == ood_set) & (ood["method"] == method) & (ood["metric"] == metric)]
    return float(chosen["value"].iloc[0]) if len(chosen) else math.nan


def selective_table(ood: pd.DataFrame) -> pd.DataFrame:
    """Near sets with selective-prediction rows: the best method's ``dice_in, dice_mixed,
    dice_accepted, coverage, dice_gap`` (columns ``ood_set, method`` first)."""
    best = best_methods(ood)
    with_dice = ood[(ood["metric"] == "dice_gap") & (ood["kind"] == "near")]
    records = []
    for ood_set in dict.fromkeys(with_dice["ood_set"]):
        method = best.get(ood_set) or str(with_dice.loc[with_dice["ood_set"] == ood_set, "method"].iloc[0])
        records.append({"ood_set": ood_set, "method": method,
                        **{m: _value(ood, ood_set, method, m) for m in _SELECTIVE}})  # fmt: skip
    return pd.DataFrame(records, columns=["ood_set", "method", *_SELECTIVE])


def targets(ood: pd.DataFrame) -> list[tuple[str, float, bool]]:
    """``(target, the figure it judges, met)`` for far AUROC, near AUROC and the Dice gap; a target
    without data is left out. The AUROC figure is the lowest over sets of each set's best AUROC (the
    pooled ``near-mixed`` set is left out when single near sets exist); the gap, the largest."""
    table = auroc_table(ood)
    best = table.drop(columns="kind").max(axis=1, skipna=True)
    out = []
    for kind, target in (("far", FAR_AUROC), ("near", NEAR_AUROC)):
        chosen = best[(table["kind"] == kind) & best.notna()]
        if kind == "near" and len(chosen.drop(MIXED, errors="ignore")):
            chosen = chosen.drop(MIXED, errors="ignore")
        if len(chosen):
            lowest = float(chosen.min())
            out.append(
                (f"{kind} AUROC ≥ {target:g} (lowest set: {chosen.idxmin()})", lowest, lowest >= target)
            )
    gaps = selective_table(ood)["dice_gap"].dropna()
    if len(gaps):
        out.append(
            (
                f"Dice gap ≤ {DICE_GAP:g} (largest over near sets)",
                float(gaps.max()),
                float(gaps.max()) <= DICE_GAP,
            )
        )
    return out


def load_scores(run: Path) -> pd.DataFrame | None:
    path = run / OOD_SCORES_CSV
    if not path.is_file():
        return None
    return tidy_frame(read_table(path), SCORE_COLUMNS, ("score", "dice"), str(path))


# ---------------------------------------------------------------------------------------- a run


def run_section(run_dir: str | Path, metrics: pd.DataFrame) -> list[_Block]:
    """The "Out-of-distribution detection" blocks of a run's report.

    Parameters
    ----------
    run_dir
        The run folder (``ood.csv``, ``ood_scores.csv`` when there, and ``config.json`` are read here).
    metrics
        Its ``metrics.csv`` as :func:`privacy.report._load_metrics` reads it.

    Returns
    -------
    list
        Nothing when the run folder has no ``ood.csv``; else the section's blocks.

    Raises
    ------
    privacy.report.ReportError
        If ``ood.csv``, ``ood_scores.csv`` or ``config.json`` is unreadable or malformed.
    """
    run = Path(run_dir)
    if not (run / OOD_CSV).is_file():
        return []
    ood = tidy_frame(read_table(run / OOD_CSV), OOD_COLUMNS, ("value",), str(run / OOD_CSV))
    scores = load_scores(run)
    metrics = pd.concat([metrics, load_timings(run)], ignore_index=True)
    record = read_config(run) if (run / CONFIG_JSON).is_file() else {}
    config: dict[str, Any] = record["config"] if isinstance(record.get("config"), dict) else {}
    settings: dict[str, Any] = config["ood"] if isinstance(config.get("ood"), dict) else {}
    tpr = _tpr(ood, settings)
    blocks: list[_Block] = [_Heading(2, HEADING)]
    table = auroc_table(ood)
    if table.empty:
        return [*blocks, _Paragraph(f"`{OOD_CSV}` has no AUROC rows yet.")]
    best = best_methods(ood)
    blocks.append(
        _Paragraph(
            "Each score is higher for a more out-of-distribution image; OOD images are the positive class "
            "and the hospitals' own test images the negatives. **near** sets are mild shifts (noise, blur, an "
            "unseen scanner), **far** sets are unlike any training image. AUROC of every score on every set, the "
            f"best per set in bold, with the best score's AUPR and its FPR (share of in-distribution images "
            f"flagged) at {tpr:.0%} TPR. Every figure is in `{OOD_CSV}`."
        )
    )
    methods = [c for c in table.columns if c != "kind"]
    # At most _METHODS_PER_TABLE methods side by side (ten do not fit a page); the last table adds the best.
    groups = [methods[i : i + _METHODS_PER_TABLE] for i in range(0, len(methods), _METHODS_PER_TABLE)]
    for number, group in enumerate(groups):
        last = number == len(groups) - 1
        rows = []
        for ood_set, row in table.iterrows():
            method = best.get(str(ood_set))
            cells = [("**" + _num(row[m]) + "**") if m == method else _num(row[m]) for m in group]
            extra = (method or "n/a",
                     _num(_value(ood, str(ood_set), method, "aupr")) if method else "n/a",
                     _num(_value(ood, str(ood_set), method, "fpr_at_tpr")) if method else "n/a") if last else ()  # fmt: skip
            rows.append((str(ood_set), str(row["kind"]), *cells, *extra))
        header = ("OOD set", "kind", *(m.replace("/", " / ") for m in group),
                  *(("best", "AUPR (best)", f"FPR at {tpr:.0%} TPR (best)") if last else ()))  # fmt: skip
        blocks.append(_Table(header, tuple(rows)))
    mean = table[methods].mean(axis=0, skipna=True)
    if mean.notna().any():
        blocks.append(_Paragraph(
            f"One detector serves every set when deployed: the score with the highest mean AUROC over the sets is "
            f"**{mean.idxmax()}** ({_num(mean.max())})."
        ))  # fmt: skip
    selective = selective_table(ood)
    if len(selective):
        blocks.append(_Paragraph(
            f"**Selective prediction** on the near sets: the model segments the images its best detector accepts "
            f"(threshold: {tpr:.0%} of in-distribution images accepted) of a mixed set of in-distribution and "
            "shifted images. **Dice in**: in-distribution images alone; **mixed**: every image; **accepted**: "
            "the accepted ones; **coverage**: the share accepted; **gap**: Dice in minus accepted."
        ))  # fmt: skip
        blocks.append(_Table(
            ("near set", "method", "Dice in", "Dice mixed", "Dice accepted", "coverage", "Dice gap"),
            tuple((r.ood_set, r.method, _num(r.dice_in), _num(r.dice_mixed), _num(r.dice_accepted),
                   _num(r.coverage), _num(r.dice_gap, "+.3f")) for r in selective.itertuples(index=False)),
        ))  # fmt: skip
    goals = targets(ood)
    if goals:
        blocks.append(_Bullets(tuple(f"**{name}**: {value:.3f}, **{'met' if ok else 'not met'}**"
                                     for name, value, ok in goals)))  # fmt: skip
    blocks.append(_Paragraph(_what_left(scores, methods, scenario_seconds(metrics, "ood_seconds"))))
    if scores is None or scores.empty:
        blocks.append(_Paragraph(f"No `{OOD_SCORES_CSV}` in the run folder: no ROC curves or coverage plot."))
        return blocks
    roc = _roc_figure(scores, best, tpr)
    if roc is not None:
        blocks.append(_Figure(ROC_PNG, roc, "ROC curves per OOD set",
                              "ROC curve of the best score per OOD set (OOD positive), images of every hospital "
                              f"pooled; dotted: {tpr:.0%} TPR."))  # fmt: skip
    coverage = _coverage_figure(scores, best, ood)
    if coverage is not None:
        blocks.append(_Figure(COVERAGE_PNG, coverage[0], "Dice against coverage",
                              f"Mean Dice of the accepted images against the share accepted, in-distribution and "
                              f"{MIXED} images pooled, accepted in order of increasing {coverage[1]} score; dashed: "
                              "accepting in order of the true Dice (the best any score could do); dotted: the "
                              "coverage at the threshold."))  # fmt: skip
    return blocks


def _tpr(ood: pd.DataFrame, settings: Mapping[str, Any]) -> float:
    rows = ood.loc[ood["metric"] == "tpr", "value"].dropna()
    if len(rows):
        return float(rows.iloc[0])
    value = settings.get("tpr")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.95


def _what_left(scores: pd.DataFrame | None, methods: list[str], seconds: float) -> str:
    text = "**What left each hospital**: per test image, each score and the image's Dice, nothing else of it"
    if scores is not None and len(scores):
        images = scores.drop_duplicates(["site", "ood_set", "image"]).groupby("site", sort=False).size()
        counts = ", ".join(f"h{s}: {n}" for s, n in sorted(images.items(), key=lambda i: (len(i[0]), i[0])))
        text += f" ({counts} images, in `{OOD_SCORES_CSV}`)"
    if any(m.startswith("mahalanobis") for m in methods):
        text += ("; for the Mahalanobis scores, only the count, the sum and the sum of outer products (per image "
                 "class) of its training images' features (the bottleneck's mean and the first convolution's "
                 "per-channel mean and standard deviation, one vector per image), never a feature vector")  # fmt: skip
    text += "."
    if not math.isnan(seconds):
        text += f" The OOD phase took {seconds:.1f} s."
    return text


def _roc_figure(scores: pd.DataFrame, best: Mapping[str, str], tpr: float) -> bytes | None:
    sets = [s for s in best if s != IN and ((scores["ood_set"] == s) & (scores["method"] == best[s])).any()]
    if not sets:
        return None
    columns = min(4, len(sets))
    lines = math.ceil(len(sets) / columns)
    figure = Figure(figsize=(2.9 * columns + 0.4, 2.8 * lines + 0.2), layout="constrained")
    axes = figure.subplots(lines, columns, squeeze=False).ravel()
    for ax, ood_set in zip(axes, sets, strict=False):
        method = best[ood_set]
        inside = scores.loc[(scores["ood_set"] == IN) & (scores["method"] == method), "score"].dropna()
        outside = scores.loc[(scores["ood_set"] == ood_set) & (scores["method"] == method), "score"].dropna()
        kind = str(scores.loc[scores["ood_set"] == ood_set, "kind"].iloc[0])
        if len(inside) and len(outside):
            labels = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
            fpr, true, _ = roc_curve(labels, np.r_[inside.to_numpy(), outside.to_numpy()])
            ax.plot(fpr, true, color="C3" if kind == "far" else "C0", linewidth=1.8)
        ax.plot([0, 1], [0, 1], color="0.6", linewidth=0.8, linestyle="--")
        ax.axhline(tpr, color="black", linestyle=":", linewidth=1.0)
        ax.set_title(f"{ood_set} ({kind})\n{method}", fontsize=9)
        ax.set_xlabel("false-positive rate", fontsize=8)
        ax.set_ylabel("true-positive rate", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(sets) :]:
        ax.set_visible(False)
    return _png(figure)


def _coverage_figure(
    scores: pd.DataFrame, best: Mapping[str, str], ood: pd.DataFrame
) -> tuple[bytes, str] | None:
    method = best.get(MIXED)
    if method is None:
        return None
    # The mixed set: in-distribution test images and every near-OOD image with labels (ood_scores.csv
    # holds each near set under its own name; "near-mixed" is their union).
    near = ((scores["kind"] == "near") | (scores["ood_set"] == MIXED)) & scores["dice"].notna()
    chosen = scores[((scores["ood_set"] == IN) | near) & (scores["method"] == method)].dropna(
        subset=["score", "dice"]
    )
    if chosen.empty or not (chosen["ood_set"] != IN).any():
        return None
    dice = chosen["dice"].to_numpy(dtype=float).clip(0.0, 1.0)
    coverages = np.arange(1, len(chosen) + 1) / len(chosen)
    curve = selective_dice(chosen["score"].to_numpy(dtype=float), dice, coverages)
    oracle = selective_dice(-dice, dice, coverages)
    figure = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = figure.subplots()
    ax.plot(coverages, curve, color="C0", linewidth=2, label=f"accepted by {method}")
    ax.plot(coverages, oracle, color="0.4", linestyle="--", linewidth=1.2, label="ordered by true Dice")
    at = _value(ood, MIXED, method, "coverage")
    if not math.isnan(at):
        ax.axvline(at, color="black", linestyle=":", linewidth=1.2, label=f"threshold (coverage {at:.2f})")
    ax.set_xlabel("coverage (share of images accepted)")
    ax.set_ylabel("mean Dice of the accepted images")
    ax.set_xlim(0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize="small")
    return _png(figure), method


# -------------------------------------------------------------------------------------- a sweep


def sweep_section(
    sweep_dir: str | Path,
    trials: Mapping[str, Mapping[str, Any]],
    results: pd.DataFrame,
    seed_key: str | None,
) -> list[_Block]:
    """The "Out-of-distribution detection" blocks of a sweep report, and ``SWEEP_DIR/ood.csv``.

    Parameters are those of :func:`scenarios.domain_shift_report.sweep_section` (``results`` is not
    needed here).

    Returns
    -------
    list
        Nothing when no completed trial carried ``ood.csv``; else the section.

    Raises
    ------
    privacy.report.ReportError
        If a trial's table is malformed (one sentence naming the trial and the table).
    """
    tables = trial_tables(trials, OOD_CSV, OOD_COLUMNS, ("value",))
    if not tables:
        return []
    _, labels, seeds = trial_settings(trials, list(tables), seed_key)
    tidy = pd.concat([rows.assign(trial=t, setting=labels[t], seed=seeds[t]) for t, rows in tables.items()],
                     ignore_index=True)[["trial", "setting", "seed", *OOD_COLUMNS]]  # fmt: skip
    tidy.to_csv(Path(sweep_dir) / OOD_CSV, index=False, lineterminator="\n")
    names = list(dict.fromkeys(labels[t] for t in tables))
    auroc = tidy[tidy["metric"] == "auroc"]
    sets = list(dict.fromkeys(auroc["ood_set"]))
    kinds = auroc.drop_duplicates("ood_set").set_index("ood_set")["kind"]
    rows, gap_rows = [], []
    chosen_methods: dict[tuple[str, str], str] = {}
    for ood_set in sets:
        cells = []
        for name in names:
            part = auroc[(auroc["ood_set"] == ood_set) & (auroc["setting"] == name)]
            stats = over_seeds(part, ("value",), by=("method",))
            if stats.empty or stats["value_mean"].isna().all():
                cells.append("n/a")
                continue
            top = stats.loc[stats["value_mean"].idxmax()]  # the best score over seeds, not per seed
            chosen_methods[name, ood_set] = str(top["method"])
            cells.append(f"{_mean_std(top, 'value')} ({top['method']})")
        rows.append((ood_set, str(kinds.get(ood_set, "")), *cells))
    for name in names:
        method = chosen_methods.get((name, MIXED))
        part = tidy[(tidy["setting"] == name) & (tidy["ood_set"] == MIXED) & (tidy["method"] == method)]
        wide = part.pivot_table(index="trial", columns="metric", values="value", aggfunc="first")
        wide = wide.reindex(columns=["dice_gap", "coverage", "dice_accepted"]).assign(setting=name)
        stats = over_seeds(wide, ("dice_gap", "coverage", "dice_accepted")).to_dict("records")
        if method is None or not stats:
            continue
        gap_rows.append((name, method, str(stats[0]["n_seeds"]), _mean_std(stats[0], "dice_gap", "+.3f"),
                         _mean_std(stats[0], "coverage"), _mean_std(stats[0], "dice_accepted")))  # fmt: skip
    blocks: list[_Block] = [
        _Heading(2, HEADING),
        _Paragraph(
            "AUROC per OOD set (rows) and setting (columns): mean ± sample standard deviation over completed "
            "seeds (– with one seed) of the score with the highest mean AUROC on that set in that setting (named "
            f"in brackets). Every row of every trial is in `{OOD_CSV}` (with `trial`, `setting` and `seed` columns)."
        ),
        _Table(("OOD set", "kind", *names), tuple(rows)),
    ]
    if gap_rows:
        blocks += [
            _Paragraph(
                f"**Selective prediction** on `{MIXED}` (in-distribution and near-shifted images pooled) with that "
                "set's best score: Dice gap (in-distribution minus accepted), coverage and Dice of the accepted "
                f"images; target gap ≤ {DICE_GAP:g}."
            ),
            _Table(("setting", "score", "seeds", "Dice gap", "coverage", "Dice accepted"), tuple(gap_rows)),
        ]
    return blocks
