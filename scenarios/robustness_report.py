"""The "Robustness" sections of the run report and of the sweep report, and their plots.

A run whose config enables the robustness scenario writes ``robustness.csv`` (tidy: ``site,
perturbation, family, strength, unit, metric, value, n``): each hospital evaluates the final global
model on its own test patients under input corruptions (family ``corruption``: noise, salt-pepper,
contrast, blur, rotation) and adversarial attacks (family ``attack``: FGSM, PGD-L∞, PGD-L2) at
several strengths (0 = clean), and site ``all`` is the patient-weighted mean over hospitals.

:func:`run_section` is what :func:`privacy.report.build_report` appends for such a run: a table per
family (Dice of ``all`` and the worst hospital at every strength), the clean Dice, the cost of a
training round, and a "Dice against strength" figure. :func:`sweep_section` is what
:func:`server.sweep_report.build_sweep_report` appends when a completed trial carried the table
(``record["tables"]["robustness.csv"]``): per setting (adversarial training, privacy mode, scanner
augmentation) the mean and sample standard deviation over seeds of the clean Dice, the noise drop
and the attacked Dice, the effect of adversarial training and of scanner augmentation, and the
sweep's ``robustness.csv``.

The helpers that read a tidy scenario table (from a run folder's file or from a trial record) and
name a setting are shared with :mod:`scenarios.ood_report`. Plots use
:class:`matplotlib.figure.Figure` with the Agg canvas, never pyplot.
"""

from __future__ import annotations

import csv
import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from privacy.report import (
    CONFIG_JSON,
    ReportError,
    _Block,
    _Bullets,
    _Figure,
    _Heading,
    _Paragraph,
    _png,
    _Table,
)
from scenarios.domain_shift_report import _mean_std, _num
from scenarios.domain_shift_tables import over_seeds, read_config, trial_config
from scenarios.robustness_tables import ALL, ROBUSTNESS_COLUMNS, ROBUSTNESS_CSV

__all__ = [
    "ROBUSTNESS_COLUMNS",
    "ROBUSTNESS_CSV",
    "RUN_FIGURES",
    "SWEEP_FIGURES",
    "Setting",
    "read_table",
    "run_section",
    "setting_of",
    "sweep_section",
    "tidy_frame",
    "trial_tables",
]

_NUMERIC = ("strength", "value", "n")
STRENGTH_PNG = "robustness_strength.png"
RUN_FIGURES = (STRENGTH_PNG,)
SWEEP_PNG = "sweep_robustness.png"
SWEEP_FIGURES = (SWEEP_PNG,)
"""PNG files the sweep section may write; a rebuild removes the ones that no longer apply."""

HEADING = "Robustness"
DICE = "dice_mean"
ATTACK = "attack"
NOISE, FGSM, PGD_LINF = "noise", "fgsm", "pgd-linf"
NOISE_STD, ATTACK_EPS = 0.05, 4.0
"""The sweep table's noise std and attack eps (in 1/255): the run's nearest configured strengths."""
_STRATEGIES = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedbn": "FedBN", "scaffold": "SCAFFOLD"}
_PRIVACY = {"sample": "DP-SGD", "client": "DP-FedAvg", "both": "DP-SGD + DP-FedAvg"}


# ---------------------------------------------------------------------------- reading tables


def read_table(path: Path) -> list[list[str]]:
    """A CSV file as rows of cells (header first).

    Raises
    ------
    privacy.report.ReportError
        If the file cannot be read or is not CSV.
    """
    try:
        text = path.read_text(encoding="utf-8")
        return [row for row in csv.reader(io.StringIO(text))]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ReportError(f"{path} cannot be read as a CSV file ({err}).") from None


def tidy_frame(rows: Any, columns: Sequence[str], numeric: Sequence[str], where: str) -> pd.DataFrame:
    """Check a tidy table given as rows of cells (header first) and type its columns.

    Parameters
    ----------
    rows
        The rows, as :func:`read_table` gives them or as a trial record carries them (a JSON list of
        lists; cells are turned into text).
    columns
        The columns the table must have (any order; further columns are kept as text).
    numeric
        The columns read as float (empty, ``nan``, ``inf`` allowed); the others stay text.
    where
        How the messages name the table (a path, or ``"trials.jsonl, trial t1, robustness.csv"``).

    Returns
    -------
    pandas.DataFrame
        The columns of ``columns`` first, then any others; hospital ids normalised (``"007"`` -> ``"7"``)
        in a ``site`` column.

    Raises
    ------
    privacy.report.ReportError
        One sentence naming ``where`` (and the line): not a list of rows, empty, a column missing, a row
        of the wrong length or a non-numeric value in a numeric column.
    """
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise ReportError(
            f"{where} must be a list of CSV rows (lists of cells). Got {type(rows).__name__} instead."
        )
    if not rows or not any(str(c).strip() for c in rows[0]):
        raise ReportError(f"{where} is empty; it must start with the header line {','.join(columns)}.")
    header = [str(c).strip() for c in rows[0]]
    missing = [c for c in columns if c not in header]
    if missing:
        names = ", ".join(f"'{c}'" for c in missing)
        raise ReportError(f"{where} has no column(s) {names}; it must have the columns {', '.join(columns)}.")
    body: list[tuple[int, list[str]]] = []
    for line, row in enumerate(rows[1:], start=2):
        cells = [str(c).strip() for c in row]
        if not any(cells):
            continue  # a blank line
        if len(cells) != len(header):
            raise ReportError(f"{where}, line {line}: {len(cells)} cells where the header has {len(header)}.")
        body.append((line, cells))
    data: dict[str, list[Any]] = {c: [] for c in header}
    for line, cells in body:
        for name, text in zip(header, cells, strict=True):
            data[name].append(_number(text, name, line, where) if name in numeric else text)
    frame = pd.DataFrame({c: pd.Series(data[c], dtype="float64" if c in numeric else object) for c in header})
    if "site" in frame.columns:
        frame["site"] = [str(int(s)) if s.isdigit() else s for s in frame["site"]]
    return frame[[*columns, *(c for c in header if c not in columns)]]


def _number(text: str, column: str, line: int, where: str) -> float:
    if text == "" or text.lower() in ("nan", "na", "n/a", "none", "null"):
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise ReportError(
            f"{where}, line {line}: column '{column}' must be a number. Got '{text}' instead."
        ) from None


def trial_tables(
    trials: Mapping[str, Mapping[str, Any]], name: str, columns: Sequence[str], numeric: Sequence[str]
) -> dict[str, pd.DataFrame]:
    """The table ``name`` of each completed trial that carried it (``record["tables"][name]``), typed."""
    out = {}
    for trial, record in trials.items():
        tables = record.get("tables")
        if record.get("status") != "completed" or not isinstance(tables, Mapping) or name not in tables:
            continue
        out[trial] = tidy_frame(tables[name], columns, numeric, f"trials.jsonl, trial {trial}, {name}")
    return out


TIMINGS_CSV = "timings.csv"
_TIMING_COLUMNS = ("round", "site", "split", "metric", "value")


def load_timings(run: Path) -> pd.DataFrame:
    """``RUN/timings.csv`` (wall-clock seconds, columns of ``metrics.csv``; kept apart from it so
    that ``metrics.csv`` repeats to the byte), or an empty frame when the run has none."""
    path = run / TIMINGS_CSV
    if not path.is_file():
        return pd.DataFrame(columns=list(_TIMING_COLUMNS))
    return tidy_frame(read_table(path), _TIMING_COLUMNS, ("round", "value"), str(path))


def trial_timings(trials: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Every completed trial's ``timings.csv`` (``record["tables"]``), with a ``trial`` column."""
    parts = [
        frame.assign(trial=trial)
        for trial, frame in trial_tables(trials, TIMINGS_CSV, _TIMING_COLUMNS, ("round", "value")).items()
    ]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["trial", *_TIMING_COLUMNS])


def load_robustness(run: Path) -> pd.DataFrame:
    """``RUN/robustness.csv``, checked and typed (:func:`tidy_frame`)."""
    path = run / ROBUSTNESS_CSV
    return tidy_frame(read_table(path), ROBUSTNESS_COLUMNS, _NUMERIC, str(path))


# ---------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """What tells the robustness and OOD settings of a sweep apart.

    ``adv_ratio``: the share of each batch trained on adversarial examples (0: no adversarial
    training); ``adv_eps`` in 1/255; ``privacy``: ``config.privacy.mode``.
    """

    strategy: str = "fedavg"
    adv_ratio: float = 0.0
    adv_eps: float = 0.0
    adv_steps: int = 0
    privacy: str = "off"
    augment: bool = False

    @property
    def adversarial(self) -> bool:
        return self.adv_ratio > 0

    @property
    def label(self) -> str:
        """E.g. ``"FedAvg + adv. training (50%, 4/255, 3 steps) + DP-SGD + scanner augment"``."""
        parts = [_STRATEGIES.get(self.strategy, self.strategy)]
        if self.adversarial:
            steps = f"{self.adv_steps} step" + ("" if self.adv_steps == 1 else "s")
            parts.append(f"adv. training ({self.adv_ratio:.0%}, {self.adv_eps:g}/255, {steps})")
        if self.privacy in _PRIVACY:
            parts.append(_PRIVACY[self.privacy])
        elif self.privacy not in ("off", ""):
            parts.append(f"privacy {self.privacy}")
        if self.augment:
            parts.append("scanner augment")
        return " + ".join(parts)

    def without(self, *, adversarial: bool = False, augment: bool = False) -> Setting:
        """The same setting without adversarial training and/or scanner augmentation (the reference)."""
        return Setting(
            self.strategy,
            0.0 if adversarial else self.adv_ratio,
            0.0 if adversarial else self.adv_eps,
            0 if adversarial else self.adv_steps,
            self.privacy,
            False if augment else self.augment,
        )


def setting_of(config: Mapping[str, Any]) -> Setting:
    """The :class:`Setting` of a run from its ``FedscanConfig.to_dict()`` (missing keys: defaults)."""
    adv, privacy = _section(config, "adv_train"), _section(config, "privacy")
    ratio = _float(adv.get("ratio"), 0.0)
    return Setting(
        strategy=str(_section(config, "train").get("strategy", "fedavg")),
        adv_ratio=ratio,
        adv_eps=_float(adv.get("eps"), 0.0) if ratio > 0 else 0.0,
        adv_steps=int(_float(adv.get("steps"), 0.0)) if ratio > 0 else 0,
        privacy=str(privacy.get("mode", "off")),
        augment=_section(config, "mitigation").get("scanner_augment") is True,
    )


def trial_settings(
    trials: Mapping[str, Mapping[str, Any]], chosen: Sequence[str], seed_key: str | None
) -> tuple[dict[str, Setting], dict[str, str], dict[str, Any]]:
    """Each chosen trial's :class:`Setting`, its label (with the swept values that tell apart trials
    whose labels agree, e.g. a swept learning rate) and its seed (the swept seed, else the run's)."""
    settings, seeds = {}, {}
    for trial in chosen:
        record = trials[trial]
        own = trial_config(record)
        settings[trial] = setting_of(_section(own, "config"))
        swept = _section(record, "swept")
        seeds[trial] = swept[seed_key] if seed_key and seed_key in swept else own.get("seed")
    labels = {t: s.label for t, s in settings.items()}
    for label in dict.fromkeys(labels.values()):
        members = [t for t in chosen if labels[t] == label]
        cells = [{k: v for k, v in _section(trials[t], "swept").items() if k != seed_key} for t in members]
        keys = sorted({k for c in cells for k in c if any(d.get(k) != c.get(k) for d in cells)})
        for trial, values in zip(members, cells, strict=True):
            if keys:
                labels[trial] = f"{label} · " + ", ".join(f"{k}={values.get(k)}" for k in keys)
    return settings, labels, seeds


# ----------------------------------------------------------------------------------- numbers


def clean_dice(rows: pd.DataFrame, site: str = ALL) -> float:
    """The Dice without perturbation: the mean of ``site``'s strength-0 Dice rows (every perturbation
    has one, all the same model on the same images); NaN without any."""
    chosen = rows[(rows["site"] == site) & (rows["metric"] == DICE) & (rows["strength"] == 0)]
    return float(chosen["value"].mean()) if len(chosen) else math.nan


def strength_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per perturbation and strength (file order, strengths increasing): the Dice of ``all``, its drop
    from the clean Dice, and the worst hospital's Dice and id.

    Columns ``perturbation, family, unit, strength, dice, drop, worst, worst_site``.
    """
    dice = rows[rows["metric"] == DICE]
    clean = clean_dice(rows)
    records = []
    for perturbation in dict.fromkeys(dice["perturbation"]):
        chosen = dice[dice["perturbation"] == perturbation]
        for strength in sorted(chosen["strength"].dropna().unique()):
            at = chosen[chosen["strength"] == strength]
            everyone = at.loc[at["site"] == ALL, "value"]
            hospitals = at[at["site"] != ALL].dropna(subset=["value"])
            worst = hospitals.loc[hospitals["value"].idxmin()] if len(hospitals) else None
            value = float(everyone.iloc[0]) if len(everyone) else math.nan
            records.append({
                "perturbation": perturbation, "family": str(at["family"].iloc[0]), "unit": str(at["unit"].iloc[0]),
                "strength": float(strength), "dice": value, "drop": clean - value,
                "worst": math.nan if worst is None else float(worst["value"]),
                "worst_site": None if worst is None else str(worst["site"]),
            })  # fmt: skip
    columns = ["perturbation", "family", "unit", "strength", "dice", "drop", "worst", "worst_site"]
    return pd.DataFrame(records, columns=columns)


def at_strength(rows: pd.DataFrame, perturbation: str, target: float) -> tuple[float, float]:
    """``(strength, Dice of all)`` at the configured strength of ``perturbation`` nearest to ``target``
    (above 0); NaNs when the run has no such perturbation."""
    chosen = rows[(rows["site"] == ALL) & (rows["metric"] == DICE) & (rows["perturbation"] == perturbation)
                  & (rows["strength"] > 0)]  # fmt: skip
    if chosen.empty:
        return math.nan, math.nan
    best = chosen.iloc[int(np.argmin(np.abs(chosen["strength"].to_numpy(dtype=float) - target)))]
    return float(best["strength"]), float(best["value"])


def train_seconds(metrics: pd.DataFrame) -> float:
    """Mean over hospitals and rounds of a hospital's training time in a round (split ``train``,
    metric ``train_seconds``); NaN when not recorded."""
    chosen = metrics[(metrics["split"] == "train") & (metrics["metric"] == "train_seconds")]
    chosen = chosen[chosen["site"].astype(str).str.isdigit()]
    return float(chosen["value"].mean()) if len(chosen) else math.nan


def scenario_seconds(metrics: pd.DataFrame, metric: str) -> float:
    """The server's ``scenario`` row ``metric`` (e.g. ``robustness_seconds``), summed; NaN if absent."""
    chosen = metrics[
        (metrics["site"] == "server") & (metrics["split"] == "scenario") & (metrics["metric"] == metric)
    ]
    return float(chosen["value"].sum()) if len(chosen) else math.nan


# ---------------------------------------------------------------------------------------- a run


def run_section(run_dir: str | Path, metrics: pd.DataFrame) -> list[_Block]:
    """The "Robustness" blocks of a run's report.

    Parameters
    ----------
    run_dir
        The run folder (its ``robustness.csv`` and, when there, ``config.json`` are read here).
    metrics
        Its ``metrics.csv`` as :func:`privacy.report._load_metrics` reads it.

    Returns
    -------
    list
        Nothing when the run folder has no ``robustness.csv``; else the section's blocks.

    Raises
    ------
    privacy.report.ReportError
        If ``robustness.csv`` or ``config.json`` is unreadable or malformed (one sentence naming it).
    """
    run = Path(run_dir)
    if not (run / ROBUSTNESS_CSV).is_file():
        return []
    rows = load_robustness(run)
    metrics = pd.concat([metrics, load_timings(run)], ignore_index=True)
    record = read_config(run) if (run / CONFIG_JSON).is_file() else {}
    setting = setting_of(_section(record, "config"))
    blocks: list[_Block] = [_Heading(2, HEADING)]
    table = strength_table(rows)
    if table.empty:
        return [*blocks, _Paragraph(f"`{ROBUSTNESS_CSV}` has no `{DICE}` rows yet.")]
    blocks.append(
        _Paragraph(
            "Each hospital evaluated the final global model on its own test patients, perturbed at each "
            "strength (0 = clean): input corruptions, and adversarial attacks on the segmentation loss (FGSM, "
            "PGD; L∞ budgets in units of 1/255 of the intensity range, L2 budgets as the raw norm). **Dice**: "
            "`dice_mean`, the patient-weighted mean over hospitals; **drop**: clean Dice minus it; **worst "
            f"hospital**: the lowest hospital's Dice. Every row is in `{ROBUSTNESS_CSV}`."
        )
    )
    seconds, phase = train_seconds(metrics), scenario_seconds(metrics, "robustness_seconds")
    clean_sites = [(s, clean_dice(rows, s)) for s in sorted(set(rows["site"]) - {ALL}, key=_site_key)]
    worst_clean = min(((v, s) for s, v in clean_sites if not math.isnan(v)), default=None)
    bullets = [
        f"**clean Dice**: {_num(clean_dice(rows))}"
        + ("" if worst_clean is None else f" (worst hospital h{worst_clean[1]}: {_num(worst_clean[0])})"),
        f"**setting**: {setting.label}" + ("" if setting.adversarial else " (no adversarial training)"),
        "**cost of a round**: "
        + (
            "not recorded"
            if math.isnan(seconds)
            else f"{seconds:.2f} s of training per hospital per round (mean)"
        )
        + ("" if math.isnan(phase) else f"; the robustness evaluation took {phase:.1f} s"),
    ]
    blocks.append(_Bullets(tuple(bullets)))
    for family in dict.fromkeys(table["family"]):
        part = table[table["family"] == family]
        blocks.append(_Paragraph(f"**{'Attacks' if family == ATTACK else str(family).capitalize() + 's'}**"))
        blocks.append(
            _Table(
                ("perturbation", "strength", "unit", "Dice", "drop", "worst hospital"),
                tuple(
                    (str(r.perturbation), format(r.strength, "g"), str(r.unit), _num(r.dice), _num(r.drop, "+.3f"),
                     "n/a" if r.worst_site is None else f"{_num(r.worst)} (h{r.worst_site})")
                    for r in part.itertuples(index=False)
                ),
            )
        )  # fmt: skip
    blocks.append(
        _Figure(
            STRENGTH_PNG,
            _strength_figure(rows),
            "Dice against perturbation strength",
            "Dice against strength, one panel per perturbation (corruptions, then attacks): thick, all "
            "hospitals (patient-weighted); thin, each hospital.",
        )
    )
    return blocks


# -------------------------------------------------------------------------------------- a sweep


_SWEEP_VALUES = ("clean", "noise", "noise_drop", "pgd", "fgsm", "train_s")


def sweep_section(
    sweep_dir: str | Path,
    trials: Mapping[str, Mapping[str, Any]],
    results: pd.DataFrame,
    seed_key: str | None,
) -> list[_Block]:
    """The "Robustness" blocks of a sweep report, and ``SWEEP_DIR/robustness.csv``.

    Parameters are those of :func:`scenarios.domain_shift_report.sweep_section`.

    Returns
    -------
    list
        Nothing when no completed trial carried ``robustness.csv``; else the section.

    Raises
    ------
    privacy.report.ReportError
        If a trial's table is malformed (one sentence naming the trial and the table).
    """
    tables = trial_tables(trials, ROBUSTNESS_CSV, ROBUSTNESS_COLUMNS, _NUMERIC)
    if not tables:
        return []
    settings, labels, seeds = trial_settings(trials, list(tables), seed_key)
    parts = [
        rows[rows["site"] == ALL].assign(trial=trial, setting=labels[trial], seed=seeds[trial])
        for trial, rows in tables.items()
    ]
    tidy = pd.concat(parts, ignore_index=True)[["trial", "setting", "seed", *ROBUSTNESS_COLUMNS]]
    tidy.to_csv(Path(sweep_dir) / ROBUSTNESS_CSV, index=False, lineterminator="\n")
    per_trial = sweep_values(tables, labels, pd.concat([results, trial_timings(trials)], ignore_index=True))
    stats = over_seeds(per_trial, _SWEEP_VALUES).set_index("setting", drop=False)
    noise_std = _shared(per_trial["noise_strength"])
    eps = _shared(pd.concat([per_trial["pgd_strength"], per_trial["fgsm_strength"]]))
    header = ("setting", "seeds", "clean Dice", f"noise {_g(noise_std)} Dice", "noise drop",
              f"PGD-L∞ {_g(eps)}/255 Dice", f"FGSM {_g(eps)}/255 Dice", "train s / round")  # fmt: skip
    rows = tuple(
        (str(r["setting"]), str(r["n_seeds"]), *(_mean_std(r, v, ".2f" if v == "train_s" else ".3f")
                                                 for v in _SWEEP_VALUES))
        for r in stats.to_dict("records")
    )  # fmt: skip
    blocks: list[_Block] = [
        _Heading(2, HEADING),
        _Paragraph(
            "One row per setting (strategy, adversarial training with its share of each batch, budget and PGD "
            "steps, privacy mode, scanner augmentation): mean ± sample standard deviation over completed seeds "
            "(– with one seed) of the final model's Dice over all hospitals (patient-weighted). **Noise drop**: "
            "clean minus noisy Dice, per trial; **train s / round**: a hospital's training time in a round, "
            f"mean over hospitals and rounds. Every `all` row of every trial is in `{ROBUSTNESS_CSV}` (with "
            "`trial`, `setting` and `seed` columns)."
        ),
        _Table(header, rows),
    ]
    effects = _effects(settings, labels, stats, eps)
    if effects:
        blocks.append(_Bullets(tuple(effects)))
    curves = pgd_curves(tidy)
    if not curves.empty:
        blocks.append(
            _Figure(
                SWEEP_PNG,
                _sweep_figure(curves, stats, settings, labels, eps),
                "PGD Dice against budget per setting; clean and attacked Dice",
                "Left: Dice under PGD-L∞ against its budget (1/255), mean over seeds with the sample standard "
                f"deviation as error bar, one line per setting. Right: clean and PGD-L∞ {_g(eps)}/255 Dice per "
                "setting; hatched bars: settings with adversarial training.",
            )
        )
    return blocks


def sweep_values(
    tables: Mapping[str, pd.DataFrame], labels: Mapping[str, str], results: pd.DataFrame
) -> pd.DataFrame:
    """One row per trial: ``trial, setting``, the clean Dice, the noisy Dice (std nearest
    :data:`NOISE_STD`) and its drop, the PGD-L∞ and FGSM Dice (eps nearest :data:`ATTACK_EPS`), with
    the strengths used, and the mean training seconds per hospital per round (from ``results``)."""
    records = []
    for trial, rows in tables.items():
        clean = clean_dice(rows)
        noise_strength, noise = at_strength(rows, NOISE, NOISE_STD)
        pgd_strength, pgd = at_strength(rows, PGD_LINF, ATTACK_EPS)
        fgsm_strength, fgsm = at_strength(rows, FGSM, ATTACK_EPS)
        metrics = results[results["trial"] == trial] if len(results) else results
        records.append({
            "trial": trial, "setting": labels[trial], "clean": clean, "noise": noise, "noise_drop": clean - noise,
            "pgd": pgd, "fgsm": fgsm, "train_s": train_seconds(metrics) if len(metrics) else math.nan,
            "noise_strength": noise_strength, "pgd_strength": pgd_strength, "fgsm_strength": fgsm_strength,
        })  # fmt: skip
    return pd.DataFrame(records)


def _effects(
    settings: Mapping[str, Setting], labels: Mapping[str, str], stats: pd.DataFrame, eps: float
) -> list[str]:
    """Sentences comparing settings that differ only by adversarial training, or only by scanner
    augmentation: differences of the means over seeds."""
    by_setting = {
        s: labels[t] for t, s in settings.items() if labels[t] == s.label
    }  # only unambiguous labels
    out = []
    for setting, label in by_setting.items():
        if setting.adversarial and setting.without(adversarial=True) in by_setting:
            with_, without = stats.loc[label], stats.loc[by_setting[setting.without(adversarial=True)]]
            gain = with_["pgd_mean"] - without["pgd_mean"]
            cost = without["clean_mean"] - with_["clean_mean"]
            slower = with_["train_s_mean"] / without["train_s_mean"]
            out.append(
                f"**Adversarial training** ({label} against {without['setting']}) raised the PGD-L∞ {_g(eps)}/255 "
                f"Dice by {_num(gain, '+.3f')} for a clean-Dice cost of {_num(cost, '+.3f')}"
                + ("" if math.isnan(slower) else f", at {slower:.2f}× the training time per round")
                + "."
            )
        if setting.augment and setting.without(augment=True) in by_setting:
            with_, without = stats.loc[label], stats.loc[by_setting[setting.without(augment=True)]]
            out.append(
                f"**Scanner augmentation** ({label} against {without['setting']}) changed the noise drop from "
                f"{_num(without['noise_drop_mean'])} to {_num(with_['noise_drop_mean'])}."
            )
    return out


def pgd_curves(tidy: pd.DataFrame) -> pd.DataFrame:
    """Per setting and PGD-L∞ eps (0 = clean): mean and sample std over trials of the Dice of ``all``."""
    chosen = tidy[(tidy["perturbation"] == PGD_LINF) & (tidy["metric"] == DICE)]
    return over_seeds(chosen, ("value",), by=("setting", "strength")).sort_values(
        ["setting", "strength"], kind="stable"
    )


# ---------------------------------------------------------------------------------------- plots


def _strength_figure(rows: pd.DataFrame) -> bytes:
    dice = rows[rows["metric"] == DICE]
    order = sorted(dict.fromkeys(dice["perturbation"]), key=lambda p: dice.loc[dice["perturbation"] == p,
                                                                                    "family"].iloc[0] == ATTACK)  # fmt: skip
    columns = min(4, len(order))
    lines = math.ceil(len(order) / columns)
    figure = Figure(figsize=(3.1 * columns + 0.6, 2.7 * lines + 0.4), layout="constrained")
    axes = figure.subplots(lines, columns, squeeze=False).ravel()
    sites = sorted(set(dice["site"]) - {ALL}, key=_site_key)
    for ax, perturbation in zip(axes, order, strict=False):
        chosen = dice[dice["perturbation"] == perturbation]
        for index, site in enumerate(sites):
            curve = chosen[chosen["site"] == site].sort_values("strength")
            ax.plot(curve["strength"], curve["value"], color=f"C{(index + 1) % 10}", linewidth=0.9, alpha=0.8,
                    marker=".", markersize=3, label=f"h{site}")  # fmt: skip
        curve = chosen[chosen["site"] == ALL].sort_values("strength")
        ax.plot(curve["strength"], curve["value"], color="black", linewidth=2.4, marker="o", markersize=4,
                label="all hospitals")  # fmt: skip
        family = str(chosen["family"].iloc[0])
        ax.set_title(f"{'attack: ' if family == ATTACK else ''}{perturbation}", fontsize=10)
        ax.set_xlabel(str(chosen["unit"].iloc[0]), fontsize=8)
        ax.set_ylabel("Dice", fontsize=8)
        ax.set_ylim(0.0, 1.0)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(order) :]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(8, len(labels)), frameon=False,
                  fontsize="small")  # fmt: skip
    return _png(figure)


def _sweep_figure(
    curves: pd.DataFrame,
    stats: pd.DataFrame,
    settings: Mapping[str, Setting],
    labels: Mapping[str, str],
    eps: float,
) -> bytes:
    adversarial = {labels[t]: s.adversarial for t, s in settings.items()}
    names = list(stats["setting"])
    figure = Figure(figsize=(12.0, 4.8), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=(1.0, max(1.0, 0.25 * len(names) + 0.4)))
    for index, name in enumerate(names):
        curve = curves[curves["setting"] == name]
        left.errorbar(curve["strength"], curve["value_mean"], yerr=curve["value_std"].fillna(0.0), capsize=3,
                      marker="o", markersize=4, color=f"C{index % 10}", label=name,
                      linestyle="-" if adversarial.get(name) else "--")  # fmt: skip
    left.set_xlabel("PGD-L∞ budget ε (1/255)")
    left.set_ylabel("Dice (all hospitals)")
    left.set_ylim(0.0, 1.0)
    left.grid(True, alpha=0.3)
    left.legend(loc="upper right", fontsize="x-small", framealpha=0.9)
    x = np.arange(len(names))
    for offset, (value, title, colour) in zip((-0.2, 0.2), (("clean", "clean", "C0"),
                                                            ("pgd", f"PGD-L∞ {_g(eps)}/255", "C3")), strict=True):  # fmt: skip
        bars = right.bar(x + offset, stats[f"{value}_mean"].fillna(0.0), width=0.4, color=colour, label=title,
                         yerr=stats[f"{value}_std"].to_numpy(dtype=float), capsize=3)  # fmt: skip
        for bar, name in zip(bars, names, strict=True):
            if adversarial.get(name):
                bar.set_hatch("//")
    right.set_xticks(x)
    # One line per "+ part", each wrapped at ~22 characters: five settings side by side stay apart.
    right.set_xticklabels(
        ["\n".join(textwrap.fill(p, 22) for p in n.replace(" + ", "\n+ ").split("\n")) for n in names], fontsize=7
    )
    right.set_ylabel("Dice (all hospitals)")
    right.set_ylim(0.0, 1.0)
    right.grid(True, axis="y", alpha=0.3)
    right.legend(loc="upper right", fontsize="small")
    return _png(figure)


# -------------------------------------------------------------------------------------- helpers


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = config.get(name)
    return value if isinstance(value, Mapping) else {}


def _float(value: Any, default: float) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def _site_key(site: str) -> tuple[int, int, str]:
    return (0, int(site), "") if site.isdigit() else (1, 0, site)


def _shared(values: pd.Series) -> float:
    """The value every trial used (the most common one when they differ); NaN if none."""
    known = values.dropna()
    return float(known.mode().iloc[0]) if len(known) else math.nan


def _g(value: float) -> str:
    return "?" if math.isnan(value) else format(value, "g")
