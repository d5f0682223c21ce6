"""The domain-shift scenario's numbers: the tidy ``domain_shift.csv`` and the fairness tables.

A run of the domain-shift scenario writes, in ``metrics.csv`` (``round, site, split, metric,
value``; ``site`` a hospital id or ``global``):

* split ``test``: each training hospital's own test split, every round (under strategy
  ``local`` its own local model; under ``fedbn`` the global model with its own normalisation
  layers; otherwise the global model);
* split ``unseen``: each evaluate-only hospital, every round, global model (not under ``local``);
* split ``unseen-tta``: the same after AdaBN test-time adaptation;
* split ``finetuned``: final round, training hospitals after local fine-tuning;
* split ``model-<i>``: final round, strategy ``local``: hospital ``i``'s model at another hospital;
* split ``shift``: round 0, every hospital, ``histogram_distance`` (1-Wasserstein distance of its
  test images' intensity histogram to the training hospitals' mean histogram).

:func:`tidy_rows` turns them into one long table with the columns of :data:`COLUMNS` (one row per
``(test hospital, split, round, metric)``; ``global`` rows are left out: every mean here is
recomputed over hospitals, each hospital counting once, which is what fairness asks). The other
functions compute, from such a table, each hospital's final Dice, the fairness statistics (mean,
worst hospital, spread, per-class worst), the train-unseen gap, the late joiner's curve and
forgetting, the local models' site-by-site matrix, and means and sample standard deviations over
seeds. Pure pandas, no plotting: :mod:`scenarios.domain_shift_report` draws and renders them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from privacy.report import CONFIG_JSON, METRICS_CSV, ReportError, _load_metrics
from sims.config import MitigationSpec, ShiftSpec

__all__ = [
    "COLUMNS",
    "DOMAIN_SHIFT_CSV",
    "SEVERITY_GAP_COLUMNS",
    "LateJoin",
    "Role",
    "RunInfo",
    "applies",
    "domain_shift_rows",
    "fairness",
    "gap_table",
    "late_join",
    "load_run",
    "local_matrix",
    "over_seeds",
    "run_info",
    "setting_label",
    "severity_gaps",
    "shift_drop",
    "site_values",
    "tidy_rows",
    "write_domain_shift",
]

DOMAIN_SHIFT_CSV = "domain_shift.csv"
COLUMNS = (
    "setting", "strategy", "mitigation", "train_hospital", "test_hospital", "test_role", "test_archetype",
    "test_severity", "split", "round", "metric", "value", "seed",
)  # fmt: skip
SCENARIO = "domain_shift"
CURVE_SPLITS = ("test", "unseen", "unseen-tta", "finetuned")
"""Splits kept at every round (the late joiner's curve needs them all)."""
SHIFT_SPLIT = "shift"
DISTANCE = "histogram_distance"
MODEL_PREFIX = "model-"
DICE = "dice_mean"
TRAINING_ROLES = ("train", "late", "noisy")
"""``test_role`` values of hospitals that train (``late``: joins after round 1; ``noisy``: noisy labels)."""
VIEWS = {
    "test": "training hospitals",
    "unseen": "unseen hospitals",
    "unseen-tta": "unseen hospitals after TTA",
    "finetuned": "training hospitals after fine-tuning",
}
"""The evaluation views of the fairness tables, by split, in display order."""


# ------------------------------------------------------------------------------------ run facts


@dataclass(frozen=True)
class Role:
    """One hospital's part in the run, as ``config.json``'s ``roles`` records it.

    ``join_round``: 1 trains from the start, ``R > 1`` joins late, 0 never trains.
    """

    site: int
    role: str
    archetype: str = "unknown"
    severity: float = math.nan
    join_round: int = 1
    label_noise_rate: float = 0.0

    @property
    def test_role(self) -> str:
        """``"unseen"``, ``"late"``, ``"noisy"`` or ``"train"`` (the CSV's ``test_role``)."""
        if self.role == "unseen":
            return "unseen"
        if self.join_round > 1:
            return "late"
        return "noisy" if self.label_noise_rate > 0 else "train"


@dataclass(frozen=True)
class RunInfo:
    """What a run's config says about the domain-shift scenario.

    ``roles_source`` says where the roles came from: ``"config.json"``, ``"derived from the run
    config"`` (:func:`scenarios.domain_shift.site_roles`) or ``"derived from metrics.csv"`` (then
    archetypes and severities are unknown and late joiners and noisy hospitals are not marked).
    """

    setting: str
    strategy: str
    mitigation: str
    seed: int | None
    scenario: str
    roles: tuple[Role, ...]
    roles_source: str

    def role_of(self, site: int) -> Role | None:
        return next((r for r in self.roles if r.site == site), None)

    @property
    def late_joiners(self) -> tuple[Role, ...]:
        return tuple(r for r in self.roles if r.role != "unseen" and r.join_round > 1)


def setting_label(config: Mapping[str, Any]) -> str:
    """A short name of a run's setting from ``FedscanConfig.to_dict()``.

    The strategy (with its norm when not ``instance``), the mitigation when there is one, local
    fine-tuning, and the shift settings that are not at their default: ``late@R`` (late joiner),
    ``noise h0 50%`` (label noise), ``loso:<archetype>`` (held-out scanner), ``unseen sev 2/3``
    (no commas: the label is a CSV cell). Parts are joined with ``" · "``, e.g. ``"fedbn(batch) · histogram+augment · late@5"``.
    """
    train = _section(config, "train")
    shift = _section(config, "shift")
    norm = str(train.get("norm", "instance"))
    strategy = str(train.get("strategy", "fedavg"))
    parts = [strategy if norm == "instance" else f"{strategy}({norm})"]
    mitigation = mitigation_label(config)
    if mitigation != "none":
        parts.append(mitigation)
    if train.get("finetune_epochs"):
        parts.append(f"finetune {train['finetune_epochs']}")
    if shift.get("late_join_round"):
        parts.append(f"late@{shift['late_join_round']}")
    noisy, rate = shift.get("label_noise_hospital", -1), shift.get("label_noise_rate", 0.0)
    if isinstance(noisy, int) and noisy >= 0 and rate:
        parts.append(f"noise h{noisy} {float(rate):.0%}")
    if shift.get("holdout_archetype", "none") not in ("none", None):
        parts.append(f"loso:{shift['holdout_archetype']}")
    severities = shift.get("unseen_severities") or ()
    if severities:
        parts.append("unseen sev " + "/".join(f"{float(s):g}" for s in severities))
    return " · ".join(parts)


def mitigation_label(config: Mapping[str, Any]) -> str:
    """``MitigationSpec(**config["mitigation"]).label()``: ``"none"``, ``"zscore"``, ``"histogram+augment"``..."""
    section = _section(config, "mitigation")
    try:
        return MitigationSpec(**section).label()
    except TypeError:  # a config.json from another version: name the switches we know
        known = {k: v for k, v in section.items() if k in MitigationSpec.__dataclass_fields__}
        return MitigationSpec(**known).label()


def run_info(record: Mapping[str, Any], metrics: pd.DataFrame, *, where: str = CONFIG_JSON) -> RunInfo:
    """The scenario facts of a run from its ``config.json`` object (``record``) and metrics.

    Roles come from ``record["roles"]`` when present, else from the metrics (see :class:`RunInfo`).

    Raises
    ------
    ReportError
        If ``record["roles"]`` is not a list of role objects (naming ``where`` and the entry).
    """
    config = _section(record, "config")
    world = _section(config, "world")
    seed = record.get("seed", world.get("seed"))
    raw_roles = record.get("roles")
    if raw_roles is None:
        roles, source = roles_from_metrics(metrics), "derived from metrics.csv"
    else:
        roles, source = parse_roles(raw_roles, where), CONFIG_JSON
    return RunInfo(
        setting=setting_label(config),
        strategy=str(_section(config, "train").get("strategy", "unknown")),
        mitigation=mitigation_label(config),
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        scenario=str(config.get("scenario", "none")),
        roles=roles,
        roles_source=source,
    )


def parse_roles(raw: Any, where: str) -> tuple[Role, ...]:
    """``config.json``'s ``roles`` list as :class:`Role` objects, checked.

    Raises
    ------
    ReportError
        Naming the entry and what is wrong with it.
    """
    if not isinstance(raw, list):
        raise ReportError(f"{where}: 'roles' must be a list of objects. Got {type(raw).__name__} instead.")
    roles = []
    for index, given in enumerate(raw):
        entry: Mapping[str, Any] = given if isinstance(given, Mapping) else {}
        site, role = entry.get("site"), entry.get("role")
        if not isinstance(site, int) or isinstance(site, bool) or site < 0 or role not in ("train", "unseen"):
            raise ReportError(
                f"{where}: roles[{index}] must be an object with an integer 'site' >= 0 and a 'role' of "
                f"'train' or 'unseen'. Got {given!r} instead."
            )
        roles.append(
            Role(
                site=site,
                role=str(role),
                archetype=str(entry.get("archetype", "unknown")),
                severity=_float(entry.get("severity")),
                join_round=_int(entry.get("join_round"), 0 if role == "unseen" else 1),
                label_noise_rate=_float(entry.get("label_noise_rate"), 0.0),
            )
        )
    return tuple(sorted(roles, key=lambda r: r.site))


def roles_from_metrics(metrics: pd.DataFrame) -> tuple[Role, ...]:
    """Roles when the config does not record them: hospitals with ``test`` rows train, the others
    (``unseen``, ``shift`` or ``model-*`` rows only) are unseen."""
    hospitals = metrics[metrics["site"].astype(str).str.isdigit()]
    training = {int(s) for s in hospitals.loc[hospitals["split"] == "test", "site"]}
    every = {int(s) for s in hospitals["site"]}
    return tuple(Role(s, "train" if s in training else "unseen", join_round=1 if s in training else 0)
                 for s in sorted(every))  # fmt: skip


def roles_from_run_config(flat: Mapping[str, Any], num_nodes: int) -> tuple[Role, ...] | None:
    """Roles from a flat run config (``{"shift.unseen-hospitals": 2, ...}``) via the scenario's own
    :func:`scenarios.domain_shift.site_roles`; ``None`` when that is not possible."""
    try:
        from scenarios.domain_shift import site_roles
        from sims.config import KEYS, ConfigError, config_from_run_config

        config = config_from_run_config({k: v for k, v in flat.items() if k in KEYS})
        records = site_roles(config, num_nodes)
    except (ImportError, ConfigError, ValueError, TypeError):
        return None
    return tuple(
        Role(r.site, r.role, r.archetype, float(r.severity), int(r.join_round), float(r.label_noise_rate))
        for r in records
    )


def load_run(run_dir: str | Path) -> tuple[pd.DataFrame, RunInfo]:
    """Read a run folder's ``metrics.csv`` and ``config.json``.

    Raises
    ------
    ReportError
        If the folder, ``metrics.csv`` or ``config.json`` is missing, or a file is unreadable or
        malformed; one sentence naming the file.
    """
    run = Path(run_dir)
    if not run.is_dir():
        state = "is not a folder" if run.exists() else "does not exist"
        raise ReportError(f"Run folder {run} {state}; give the folder of a run (it holds {METRICS_CSV}).")
    if not (run / METRICS_CSV).is_file():
        raise ReportError(f"Run folder {run} has no {METRICS_CSV}; is it the folder of a run that has started?")
    metrics = _load_metrics(run)
    return metrics, run_info(read_config(run), metrics, where=str(run / CONFIG_JSON))


def read_config(run: Path) -> dict[str, Any]:
    """``RUN/config.json`` as a dict.

    Raises
    ------
    ReportError
        If it is missing, not JSON, or not an object.
    """
    path = run / CONFIG_JSON
    if not path.is_file():
        raise ReportError(
            f"Run folder {run} has no {CONFIG_JSON}; the domain-shift tables need the run's strategy and the "
            "hospitals' roles from it."
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path} is not readable JSON ({err}).") from None
    if not isinstance(record, dict):
        raise ReportError(f"{path} must hold a JSON object at the top level. Got {type(record).__name__} instead.")
    return record


def applies(scenario: str | None, metrics: pd.DataFrame, shift: Mapping[str, Any] | None = None) -> bool:
    """Whether a run is a domain-shift run: its config says so (``scenario``), sets a ``shift`` key
    away from its default (a late joiner, label noise...), or it wrote ``unseen``, ``unseen-tta``,
    ``model-*`` or ``shift`` rows."""
    if scenario == SCENARIO:
        return True
    defaults = asdict(ShiftSpec())
    if shift and any(k in defaults and _plain(v) != _plain(defaults[k]) for k, v in shift.items()):
        return True
    splits = metrics["split"].astype(str)
    return bool((splits.isin(("unseen", "unseen-tta", SHIFT_SPLIT)) | splits.str.startswith(MODEL_PREFIX)).any())


# ----------------------------------------------------------------------------------- tidy table


def tidy_rows(metrics: pd.DataFrame, info: RunInfo) -> pd.DataFrame:
    """The run's rows of ``domain_shift.csv`` (columns :data:`COLUMNS`).

    Every round of the splits in :data:`CURVE_SPLITS`, the final round of ``model-<i>``, the first
    round (0) of ``shift``; hospital rows only. ``train_hospital`` names the model: ``"hospital-<i>"``
    for a local model (``test`` under strategy ``local``, and ``model-<i>``), ``"pooled"`` under
    strategy ``pooled``, else ``"federation"``. ``test_role`` is the test hospital's role (an id
    without a role is ``"unseen"``); ``test_archetype`` and ``test_severity`` are its scanner's
    archetype and severity (``"unknown"`` and NaN, an empty CSV cell, when the roles are derived from
    the metrics). Sorted by split, round, hospital, metric as written.
    """
    frame = metrics[metrics["site"].astype(str).str.isdigit()]
    split = frame["split"].astype(str)
    model = split.str.fullmatch(rf"{MODEL_PREFIX}\d+")
    keep = split.isin(CURVE_SPLITS)
    if model.any():
        keep |= model & (frame["round"] == frame.loc[model, "round"].max())
    shift = split == SHIFT_SPLIT
    if shift.any():
        keep |= shift & (frame["round"] == frame.loc[shift, "round"].min())
    frame = frame[keep]
    sites = frame["site"].astype(int)
    splits = frame["split"].astype(str)
    local = info.strategy == "local"
    default = "pooled" if info.strategy == "pooled" else "federation"
    owners = [
        f"hospital-{s[len(MODEL_PREFIX):]}" if s.startswith(MODEL_PREFIX)
        else f"hospital-{site}" if local and s == "test" else default
        for s, site in zip(splits, sites, strict=True)
    ]  # fmt: skip
    roles = {r.site: r for r in info.roles}
    rows = pd.DataFrame(
        {
            "setting": info.setting,
            "strategy": info.strategy,
            "mitigation": info.mitigation,
            "train_hospital": pd.Series(owners, index=frame.index, dtype=object),
            "test_hospital": sites.astype("int64"),
            "test_role": [roles[s].test_role if s in roles else "unseen" for s in sites],
            "test_archetype": pd.Series([roles[s].archetype if s in roles else "unknown" for s in sites],
                                        index=frame.index, dtype=object),
            "test_severity": pd.Series([roles[s].severity if s in roles else math.nan for s in sites],
                                       index=frame.index, dtype="float64"),
            "split": splits,
            "round": frame["round"].astype("int64"),
            "metric": frame["metric"].astype(str),
            "value": frame["value"].astype("float64"),
            "seed": pd.Series([info.seed] * len(frame), index=frame.index, dtype="Int64"),
        },
        index=frame.index,
    )
    rows = rows.assign(_order=rows["split"].map(_split_order))
    rows = rows.sort_values(["_order", "round", "test_hospital"], kind="stable")
    return rows.drop(columns="_order").reset_index(drop=True)[list(COLUMNS)]


def _split_order(split: str) -> int:
    """test, unseen, unseen-tta, finetuned, model-0, model-1, ..., shift."""
    if split in CURVE_SPLITS:
        return CURVE_SPLITS.index(split)
    if split.startswith(MODEL_PREFIX):
        return len(CURVE_SPLITS) + int(split.removeprefix(MODEL_PREFIX))
    return 10**9


def domain_shift_rows(run_dir: str | Path) -> pd.DataFrame:
    """The tidy table of a run folder (see :func:`tidy_rows`).

    Raises
    ------
    ReportError
        If the folder, ``metrics.csv`` or ``config.json`` is missing, unreadable or malformed.
    """
    metrics, info = load_run(run_dir)
    return tidy_rows(metrics, info)


def write_domain_shift(run_dir: str | Path, rows: pd.DataFrame | None = None) -> Path:
    """Write ``RUN_DIR/domain_shift.csv`` (``rows``, or :func:`domain_shift_rows`) and return its path."""
    path = Path(run_dir) / DOMAIN_SHIFT_CSV
    table = domain_shift_rows(run_dir) if rows is None else rows
    table.to_csv(path, index=False, lineterminator="\n")
    return path


# ------------------------------------------------------------------------------------- a sweep


def trial_config(record: Mapping[str, Any]) -> dict[str, Any]:
    """A sweep trial's ``config.json`` object: the run's own (``run_config_json``) when the trial
    recorded it, else one rebuilt from the trial's flat resolved run config (``config``)."""
    own = record.get("run_config_json")
    if isinstance(own, Mapping) and isinstance(own.get("config"), Mapping):
        return dict(own)
    flat = _section(record, "config")
    try:
        from sims.config import KEYS, ConfigError, config_from_run_config

        config = config_from_run_config({k: v for k, v in flat.items() if k in KEYS}).to_dict()
    except (ConfigError, ValueError, TypeError):
        config = {"train": {"strategy": flat.get("strategy", "unknown")}, "scenario": flat.get("scenario", "none")}
    return {"config": config, "seed": flat.get("seed")}


def trial_scenario(record: Mapping[str, Any]) -> str:
    """The ``scenario`` a sweep trial ran (``"none"`` when not recorded)."""
    own = _section(_section(record, "run_config_json"), "config")
    return str(own.get("scenario") or _section(record, "config").get("scenario") or "none")


def sweep_rows(
    trials: Mapping[str, Mapping[str, Any]], results: pd.DataFrame, seed_key: str | None
) -> tuple[pd.DataFrame, dict[str, RunInfo]]:
    """The sweep's ``domain_shift.csv`` rows (``trial`` first, then :data:`COLUMNS`) and each
    trial's :class:`RunInfo`, for the trials whose status is ``"completed"``.

    ``trials`` is ``trials.jsonl`` by trial id; ``results`` is ``results.csv`` (columns ``trial,
    round, site, split, metric, value``). Roles come from the run's ``config.json`` as the trial
    recorded it, else from the trial's run config (:func:`scenarios.domain_shift.site_roles` with the
    trial's ``num-supernodes``), else from its metrics. The seed is the swept seed when seeds are
    swept.
    """
    by_trial = dict(tuple(results.groupby("trial", sort=False)))
    parts, infos = [], {}
    for trial, record in trials.items():
        if record.get("status") != "completed":
            continue
        metrics = by_trial.get(trial, results.iloc[0:0])[["round", "site", "split", "metric", "value"]]
        info = run_info(trial_config(record), metrics, where=f"trials.jsonl, trial {trial}")
        if info.roles_source != CONFIG_JSON:
            nodes = _int(_section(record, "federation").get("num-supernodes"), 0) or len(info.roles)
            derived = roles_from_run_config(_section(record, "config"), nodes) if nodes else None
            if derived is not None:
                info = replace(info, roles=derived, roles_source="derived from the run config")
        swept = _section(record, "swept")
        if seed_key and isinstance(swept.get(seed_key), int):
            info = replace(info, seed=int(swept[seed_key]))
        infos[trial] = info
    infos = _distinct_settings(infos, trials, seed_key)
    for trial, info in infos.items():
        metrics = by_trial.get(trial, results.iloc[0:0])[["round", "site", "split", "metric", "value"]]
        parts.append(tidy_rows(metrics, info).assign(trial=trial))
    columns = ["trial", *COLUMNS]
    if not parts:
        return pd.DataFrame(columns=columns), infos
    return pd.concat(parts, ignore_index=True)[columns], infos


def _distinct_settings(
    infos: dict[str, RunInfo], trials: Mapping[str, Mapping[str, Any]], seed_key: str | None
) -> dict[str, RunInfo]:
    """Append ``key=value`` of the swept keys that tell apart trials whose setting labels agree
    (e.g. a swept learning rate), so each setting is one cell of the sweep."""
    def cell(trial: str) -> dict[str, Any]:
        return {k: v for k, v in _section(trials[trial], "swept").items() if k != seed_key}

    out = dict(infos)
    for label in dict.fromkeys(i.setting for i in infos.values()):
        members = [t for t, i in infos.items() if i.setting == label]
        cells = [cell(t) for t in members]
        keys = sorted({k for c in cells for k in c if any(d.get(k) != c.get(k) for d in cells)})
        for trial, values in zip(members, cells, strict=True):
            if keys:
                extra = ", ".join(f"{k}={values.get(k)}" for k in keys)
                out[trial] = replace(infos[trial], setting=f"{label} · {extra}")
    return out


# ------------------------------------------------------------------------------------- analysis


def _trials(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with a ``trial`` column (one run: ``"run"``), so run and sweep share the code."""
    return rows if "trial" in rows.columns else rows.assign(trial="run")


_ID = ["trial", "setting", "strategy", "mitigation", "seed"]


def site_values(rows: pd.DataFrame) -> pd.DataFrame:
    """Each hospital's final-round values per evaluation view.

    Columns ``trial, setting, strategy, mitigation, seed, view, test_hospital, test_role,
    test_archetype, test_severity, metric, value, derived``; ``view`` is a split of :data:`VIEWS`, taken at its last round in the trial. Under
    strategy ``local`` there is no ``unseen`` split: an unseen hospital's ``unseen`` value is then
    the mean over the local models of their values at it (``model-<i>`` rows; what it gets from a
    hospital's model picked at random), marked ``derived`` = True.
    """
    rows = _trials(rows)
    out = []
    for _, trial in rows.groupby("trial", sort=False):
        for split in VIEWS:
            chosen = trial[trial["split"] == split]
            if split == "test":
                chosen = chosen[chosen["test_role"].isin(TRAINING_ROLES)]
            if chosen.empty:
                continue
            final = chosen[chosen["round"] == chosen["round"].max()]
            out.append(final.assign(view=split, derived=False))
        if (trial["strategy"] == "local").all() and not (trial["split"] == "unseen").any():
            models = trial[trial["split"].str.startswith(MODEL_PREFIX) & (trial["test_role"] == "unseen")]
            if len(models):
                keys = [*_ID, "test_hospital", "test_role", "test_archetype", "test_severity", "metric"]
                mean = models.groupby(keys, sort=False, dropna=False)["value"].mean().reset_index()
                out.append(mean.assign(view="unseen", derived=True))
    columns = [*_ID, "view", "test_hospital", "test_role", "test_archetype", "test_severity", "metric", "value",
               "derived"]  # fmt: skip
    if not out:
        return pd.DataFrame(columns=columns)
    return pd.concat(out, ignore_index=True)[columns]


def class_names(rows: pd.DataFrame) -> list[str]:
    """The per-class Dice metrics' classes (``dice_<class>``), in order of first appearance."""
    metrics = dict.fromkeys(rows["metric"].astype(str))
    return [m.removeprefix("dice_") for m in metrics if m.startswith("dice_") and m != DICE]


def fairness(rows: pd.DataFrame, *, by_severity: bool = False) -> pd.DataFrame:
    """Fairness statistics of each trial and view at the final round.

    One row per ``(trial, view)`` (views in :data:`VIEWS` order) with ``trial, setting, strategy,
    mitigation, seed, view, severity, derived, n_hospitals``; ``dice_mean`` (mean over hospitals of
    ``dice_mean``, each hospital counting once), ``dice_worst`` (the minimum), ``worst_hospital``
    (its id; the lowest id on a tie), ``dice_best``, ``dice_spread`` (max - min); and per class
    ``<class>_mean`` and ``<class>_worst`` (mean and minimum over hospitals of ``dice_<class>``).
    ``severity`` is the scanner severity the row's hospitals share (NaN when they differ or it is
    unknown). With ``by_severity`` the unseen views (``unseen``, ``unseen-tta``) get one row per
    severity of their hospitals, in increasing order (unknown last).
    """
    values = site_values(rows)
    classes = class_names(values)
    records = []
    for (_, view), group in values.groupby(["trial", "view"], sort=False):
        split = by_severity and view in ("unseen", "unseen-tta")
        for severity, members in _by_severity(group) if split else [(_shared(group["test_severity"]), group)]:
            dice = members[members["metric"] == DICE].sort_values("test_hospital", kind="stable")
            first = members.iloc[0]
            record: dict[str, Any] = {
                **{k: first[k] for k in _ID},
                "view": view,
                "severity": severity,
                "derived": bool(members["derived"].any()),
                "n_hospitals": int(dice["test_hospital"].nunique()),
            }
            record.update(_spread(dice))
            for name in classes:
                per_class = members.loc[members["metric"] == f"dice_{name}", "value"].to_numpy(dtype=float)
                record[f"{name}_mean"] = float(np.mean(per_class)) if per_class.size else math.nan
                record[f"{name}_worst"] = float(np.min(per_class)) if per_class.size else math.nan
            records.append(record)
    head = [*_ID, "view", "severity", "derived", "n_hospitals", "dice_mean", "dice_worst", "worst_hospital",
            "dice_best", "dice_spread"]  # fmt: skip
    columns = head + [f"{c}_{s}" for c in classes for s in ("mean", "worst")]
    return pd.DataFrame(records, columns=columns)  # site_values keeps trials and views in order


def _by_severity(values: pd.DataFrame) -> list[tuple[float, pd.DataFrame]]:
    """``values`` split by ``test_severity``: increasing severities, then the unknown (NaN) ones."""
    severity = values["test_severity"].astype(float)
    parts = [(float(s), values[severity == s]) for s in sorted(severity.dropna().unique())]
    if severity.isna().any():
        parts.append((math.nan, values[severity.isna()]))
    return parts


def _shared(severities: pd.Series) -> float:
    """The one severity of ``severities``; NaN when they differ or one is unknown."""
    known = severities.astype(float)
    return float(known.iloc[0]) if len(known) and known.notna().all() and known.nunique() == 1 else math.nan


def _spread(dice: pd.DataFrame) -> dict[str, Any]:
    if dice.empty:
        return {"dice_mean": math.nan, "dice_worst": math.nan, "worst_hospital": None, "dice_best": math.nan,
                "dice_spread": math.nan}  # fmt: skip
    values = dice["value"].to_numpy(dtype=float)
    worst = int(np.argmin(values))
    return {
        "dice_mean": float(values.mean()),
        "dice_worst": float(values[worst]),
        "worst_hospital": int(dice["test_hospital"].iloc[worst]),
        "dice_best": float(values.max()),
        "dice_spread": float(values.max() - values.min()),
    }


def gap_table(fair: pd.DataFrame) -> pd.DataFrame:
    """Per trial, training vs unseen hospitals (from :func:`fairness`).

    Columns ``trial, setting, strategy, mitigation, seed, train_dice, unseen_dice, gap`` (= train -
    unseen mean), ``train_worst, train_worst_hospital, train_spread, unseen_worst,
    unseen_worst_hospital, unseen_spread``; NaN / None where a view is missing.
    """
    records = []
    for _, group in fair.groupby("trial", sort=False):
        views = {str(v): row for v, row in zip(group["view"], group.to_dict("records"), strict=True)}
        first = group.iloc[0]
        record: dict[str, Any] = {k: first[k] for k in _ID}
        for name, view in (("train", "test"), ("unseen", "unseen")):
            row = views.get(view, {})
            record[f"{name}_dice"] = row.get("dice_mean", math.nan)
            record[f"{name}_worst"] = row.get("dice_worst", math.nan)
            record[f"{name}_worst_hospital"] = row.get("worst_hospital")
            record[f"{name}_spread"] = row.get("dice_spread", math.nan)
        record["gap"] = record["train_dice"] - record["unseen_dice"]
        records.append(record)
    columns = [*_ID, "train_dice", "unseen_dice", "gap", "train_worst", "train_worst_hospital", "train_spread",
               "unseen_worst", "unseen_worst_hospital", "unseen_spread"]  # fmt: skip
    return pd.DataFrame(records, columns=columns)


SEVERITY_GAP_COLUMNS = (
    *_ID, "severity", "n_unseen", "train_dice", "finetuned_dice", "unseen_dice", "gap", "unseen_worst",
    "unseen_worst_hospital", "unseen_spread", "tta_dice", "tta_worst", "tta_worst_hospital", "tta_gain",
)  # fmt: skip


def severity_gaps(rows: pd.DataFrame) -> pd.DataFrame:
    """Per trial and severity of the unseen hospitals, their final ``dice_mean`` against training.

    One row per ``(trial, severity)`` (severities increasing, unknown last; one row with severity
    NaN for a trial without unseen hospitals), columns :data:`SEVERITY_GAP_COLUMNS`:
    ``n_unseen`` (unseen hospitals at that severity); ``train_dice`` and ``finetuned_dice``, the
    training hospitals' mean (``test``, ``finetuned``; the same on every row of a trial);
    ``unseen_dice`` (mean over that severity's unseen hospitals), ``gap`` = ``train_dice -
    unseen_dice``, ``unseen_worst`` and ``unseen_worst_hospital`` (lowest hospital, lowest id on a
    tie), ``unseen_spread``; the same hospitals after AdaBN (split ``unseen-tta``): ``tta_dice``,
    ``tta_worst``, ``tta_worst_hospital`` and ``tta_gain``, the mean over the hospitals that have both
    numbers of ``unseen-tta`` minus ``unseen``. NaN / None where a split is missing.
    """
    values = site_values(rows)
    dice = values[values["metric"] == DICE]
    records = []
    for _, group in dice.groupby("trial", sort=False):
        first = group.iloc[0]
        base: dict[str, Any] = {k: first[k] for k in _ID}
        base["train_dice"] = _mean(group.loc[group["view"] == "test", "value"])
        base["finetuned_dice"] = _mean(group.loc[group["view"] == "finetuned", "value"])
        unseen = group[group["view"].isin(("unseen", "unseen-tta")) & (group["test_role"] == "unseen")]
        for severity, members in _by_severity(unseen) or [(math.nan, unseen)]:
            plain = members[members["view"] == "unseen"].sort_values("test_hospital", kind="stable")
            adapted = members[members["view"] == "unseen-tta"].sort_values("test_hospital", kind="stable")
            before = plain.groupby("test_hospital")["value"].mean()
            after = adapted.groupby("test_hospital")["value"].mean()
            both = before.index.intersection(after.index)
            spread, tta = _spread(plain), _spread(adapted)
            records.append({
                **base,
                "severity": severity,
                "n_unseen": int(plain["test_hospital"].nunique()),
                "unseen_dice": spread["dice_mean"],
                "gap": base["train_dice"] - spread["dice_mean"],
                "unseen_worst": spread["dice_worst"],
                "unseen_worst_hospital": spread["worst_hospital"],
                "unseen_spread": spread["dice_spread"],
                "tta_dice": tta["dice_mean"],
                "tta_worst": tta["dice_worst"],
                "tta_worst_hospital": tta["worst_hospital"],
                "tta_gain": _mean(after[both] - before[both]),
            })  # fmt: skip
    return pd.DataFrame(records, columns=list(SEVERITY_GAP_COLUMNS))


def _mean(values: pd.Series) -> float:
    return float(values.mean()) if len(values) else math.nan


def over_seeds(per_trial: pd.DataFrame, values: Iterable[str], by: Iterable[str] = ("setting",)) -> pd.DataFrame:
    """Mean and sample standard deviation (ddof = 1; NaN for one seed) over trials.

    One row per group of ``by`` (first-appearance order) with ``n_seeds`` (trials in the group)
    and ``<value>_mean``, ``<value>_std`` for each of ``values`` (NaN values are left out).
    """
    keys, names = list(by), list(values)
    records = []
    for key, group in per_trial.groupby(keys, sort=False, dropna=False):
        record: dict[str, Any] = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        record["n_seeds"] = len(group)
        for name in names:
            array = group[name].to_numpy(dtype=float)
            array = array[~np.isnan(array)]
            record[f"{name}_mean"] = float(array.mean()) if array.size else math.nan
            record[f"{name}_std"] = float(array.std(ddof=1)) if array.size > 1 else math.nan
        records.append(record)
    return pd.DataFrame(records, columns=[*keys, "n_seeds", *(f"{n}_{s}" for n in names for s in ("mean", "std"))])


@dataclass(frozen=True)
class LateJoin:
    """A late joiner's test Dice per round beside the original training hospitals' mean.

    ``forgetting`` = originals' mean at round ``join_round - 1`` minus at the final round
    (positive: the originals lost Dice once the newcomer trained); NaN if either round is missing.
    """

    site: int
    join_round: int
    late: pd.Series
    originals: pd.Series
    forgetting: float
    late_before: float
    late_final: float


def late_join(rows: pd.DataFrame, site: int, join_round: int) -> LateJoin:
    """The late-joiner curve of one trial's rows (split ``test``, ``dice_mean``).

    Originals: the hospitals whose ``test_role`` is ``train`` or ``noisy`` (they train from
    round 1); their mean is unweighted, each hospital counting once.
    """
    dice = rows[(rows["split"] == "test") & (rows["metric"] == DICE)]
    late = dice[dice["test_hospital"] == site].groupby("round")["value"].mean().sort_index()
    originals = dice[dice["test_role"].isin(("train", "noisy"))].groupby("round")["value"].mean().sort_index()
    final = int(originals.index.max()) if len(originals) else None
    before = originals.get(join_round - 1, math.nan)
    forgetting = float(before - originals[final]) if final is not None else math.nan
    return LateJoin(
        site=site,
        join_round=join_round,
        late=late,
        originals=originals,
        forgetting=forgetting,
        late_before=float(late.get(join_round - 1, math.nan)),
        late_final=float(late.iloc[-1]) if len(late) else math.nan,
    )


def local_matrix(rows: pd.DataFrame) -> pd.DataFrame:
    """The local models' site-by-site final ``dice_mean``: index model hospital ``i``, columns test
    hospital ``j``; ``model-<i>`` rows off the diagonal, hospital ``i``'s own ``test`` row on it.
    Mean over the trials in ``rows`` (seeds); empty when there are no ``model-*`` rows."""
    rows = _trials(rows)
    parts = []
    for _, trial in rows.groupby("trial", sort=False):
        dice = trial[trial["metric"] == DICE]
        models = dice[dice["split"].str.startswith(MODEL_PREFIX)]
        if models.empty:
            continue
        own = dice[dice["split"] == "test"]
        own = own[own["round"] == own["round"].max()]
        cross = models.assign(model=models["split"].str.removeprefix(MODEL_PREFIX).astype(int))
        parts.append(pd.concat([cross, own.assign(model=own["test_hospital"])])[["model", "test_hospital", "value"]])
    if not parts:
        return pd.DataFrame()
    matrix = pd.concat(parts).pivot_table(index="model", columns="test_hospital", values="value", aggfunc="mean")
    return matrix.sort_index().sort_index(axis=1)


def shift_drop(rows: pd.DataFrame) -> pd.DataFrame:
    """Each hospital's histogram distance beside its Dice drop, per trial.

    Columns ``trial, setting, seed, test_hospital, test_role, distance, dice, drop``: ``dice`` is the
    hospital's final ``dice_mean`` (``test`` for training hospitals, ``unseen`` for unseen ones),
    ``drop`` = mean over training hospitals of their ``dice`` minus this ``dice``. Hospitals with no
    distance or no Dice are left out.
    """
    values = site_values(rows)
    rows = _trials(rows)
    out = []
    for trial, group in values[values["metric"] == DICE].groupby("trial", sort=False):
        train = group[group["view"] == "test"]
        unseen = group[(group["view"] == "unseen") & (group["test_role"] == "unseen")]
        sites = pd.concat([train, unseen])
        reference = float(train["value"].mean()) if len(train) else math.nan
        shift = rows[(rows["trial"] == trial) & (rows["split"] == SHIFT_SPLIT) & (rows["metric"] == DISTANCE)]
        distance = shift.groupby("test_hospital")["value"].mean()
        for site in sites.itertuples(index=False):
            if site.test_hospital not in distance.index:
                continue
            out.append(
                {
                    "trial": trial, "setting": site.setting, "seed": site.seed,
                    "test_hospital": int(site.test_hospital), "test_role": site.test_role,
                    "distance": float(distance[site.test_hospital]), "dice": float(site.value),
                    "drop": reference - float(site.value),
                }
            )  # fmt: skip
    return pd.DataFrame(out, columns=["trial", "setting", "seed", "test_hospital", "test_role", "distance",
                                      "dice", "drop"])  # fmt: skip


# -------------------------------------------------------------------------------------- helpers


def _section(config: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = config.get(name)
    return value if isinstance(value, Mapping) else {}


def _float(value: Any, default: float = math.nan) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def _plain(value: Any) -> Any:
    """JSON and dataclass forms alike: a tuple of severities is a list in config.json."""
    return list(value) if isinstance(value, tuple | list) else value


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default
