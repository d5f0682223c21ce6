"""The privacy-budget report of one run: ``privacy_report.md`` and ``privacy_report.html``.

Reads a run folder (``privacy.csv``, ``metrics.csv``, ``config.json``) and writes, beside them,

* ``privacy_report.md``: GitHub-flavoured Markdown; its plots are PNG files written next to it
  (``privacy_epsilon.png``, ``privacy_client_epsilon.png``, ``privacy_dice_epsilon.png``);
* ``privacy_report.html``: one self-contained page, the same plots embedded as base64 PNG, no
  external CSS, JavaScript, fonts or images.

The report never averages ε across hospitals: each hospital's guarantee is its own, so it lists
every hospital and the worst case (the maximum). Client-level ε (DP-FedAvg, McMahan et al. 2018)
protects a whole hospital and is reported apart from the per-patient (sample-level DP-SGD)
figures; the two are never added.

The text is deterministic: the same inputs give the same bytes (no clock, no random state).
Plots are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through
pyplot's global state.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from privacy.events import CLIENT_LEVEL, PRIVACY_COLUMNS

REPORT_MD = "privacy_report.md"
REPORT_HTML = "privacy_report.html"
PRIVACY_CSV = "privacy.csv"
METRICS_CSV = "metrics.csv"
CONFIG_JSON = "config.json"
EPSILON_PNG = "privacy_epsilon.png"
CLIENT_EPSILON_PNG = "privacy_client_epsilon.png"
DICE_EPSILON_PNG = "privacy_dice_epsilon.png"

METRICS_COLUMNS = ("round", "site", "split", "metric", "value")
WORST_CASE = "worst case"
MODES = ("off", "sample", "client", "both")
SUMMARY_COLUMNS = (
    "site",
    "epsilon_rdp",
    "epsilon_prv",
    "delta",
    "steps",
    "rounds_participated",
    "budget_exhausted_round",
)

_TRUE = frozenset({"1", "1.0", "true", "yes"})
_FALSE = frozenset({"0", "0.0", "false", "no"})
_DPI = 110
_DOTS: dict[str, Any] = {"marker": "o", "markersize": 3}
_RAN_OUT: dict[str, Any] = {"marker": "X", "markersize": 10}
_TARGET: dict[str, Any] = {"color": "black", "linestyle": ":", "linewidth": 1.5}


class ReportError(ValueError):
    """A user mistake in a run folder, explained in one sentence.

    Raised for a missing run folder, a path that is not a folder, a missing ``metrics.csv``, and
    an unreadable or malformed ``privacy.csv``, ``metrics.csv`` or ``config.json``. It subclasses
    :class:`ValueError`, so :func:`load_privacy`'s validation errors are both.
    """


# --------------------------------------------------------------------------------------- loading


def load_privacy(run_dir: str | Path) -> pd.DataFrame:
    """Read and validate ``RUN_DIR/privacy.csv``.

    Parameters
    ----------
    run_dir
        The run folder.

    Returns
    -------
    pandas.DataFrame
        Exactly the columns of :data:`PRIVACY_COLUMNS`, one row per ``(round, site)``, sorted by
        site (hospitals by id, then ``"client-level"``) and round. Types: ``round`` and ``steps``
        int; ``site`` str (hospital ids normalised, ``"007"`` -> ``"7"``); ``participated`` and
        ``budget_exhausted`` bool (0/1 or true/false; on client-level rows ``participated`` may
        also be the number of hospitals sampled, read as "any", and empty flags read as false);
        the other columns float, where ε may be ``inf`` (noise 0) or NaN (not computed). An empty frame with these columns when ``privacy.csv`` is absent
        (privacy off).

    Raises
    ------
    ReportError
        (a :class:`ValueError`) naming the file and what is wrong: columns missing or extra, an
        empty or unparsable file, a value of the wrong type or sign (with its line), or a
        ``(round, site)`` pair given twice.
    """
    path = Path(run_dir) / PRIVACY_CSV
    if not path.exists():
        return _empty_privacy()
    raw = _read_csv_as_text(path, PRIVACY_COLUMNS)
    if raw.empty:
        return _empty_privacy()

    site = [_parse_site(path, line, value) for line, value in _cells(raw, "site")]
    is_client = [s == CLIENT_LEVEL for s in site]
    frame = pd.DataFrame(
        {
            "round": [_parse_count(path, "round", line, v) for line, v in _cells(raw, "round")],
            "site": site,
            "participated": [
                _parse_count(path, "participated", line, v or "0") > 0
                if c
                else _parse_flag(path, "participated", line, v, optional=False)
                for (line, v), c in zip(_cells(raw, "participated"), is_client, strict=True)
            ],
            "steps": [_parse_count(path, "steps", line, v) for line, v in _cells(raw, "steps")],
            **{
                name: [_parse_nonnegative(path, name, line, v) for line, v in _cells(raw, name)]
                for name in ("sample_rate", "noise_multiplier", "epsilon_rdp", "epsilon_prv", "delta")
            },
            "budget_exhausted": [
                _parse_flag(path, "budget_exhausted", line, v, optional=c)
                for (line, v), c in zip(_cells(raw, "budget_exhausted"), is_client, strict=True)
            ],
        }
    )
    duplicated = frame.duplicated(["round", "site"], keep="first")
    if duplicated.any():
        first = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise ReportError(
            f"{path} has two rows for round {frame['round'].iloc[first]} and site "
            f"'{frame['site'].iloc[first]}' (second one on line {first + 2}); each hospital, and the "
            f"client-level accountant, must have one row per round."
        )
    keys = [(_site_key(site), rnd) for site, rnd in zip(frame["site"], frame["round"], strict=True)]
    order = sorted(range(len(frame)), key=keys.__getitem__)
    return frame.iloc[order].reset_index(drop=True)


def budget_summary(privacy: pd.DataFrame) -> pd.DataFrame:
    """Each hospital's spent privacy budget, and the worst case over hospitals.

    Rows with ``site == "client-level"`` are ignored: client-level ε protects a different unit
    (a whole hospital) and is reported apart.

    Parameters
    ----------
    privacy
        A frame as returned by :func:`load_privacy`.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`SUMMARY_COLUMNS`, one row per hospital in id order, then one row whose
        ``site`` is ``"worst case"``:

        * ``epsilon_rdp``, ``epsilon_prv``, ``delta``: the values at the hospital's last round
          (ε is cumulative; NaN where not computed, ``inf`` where the noise was 0);
        * ``steps``: DP-SGD steps summed over rounds; ``rounds_participated``: rounds trained;
        * ``budget_exhausted_round``: the first round flagged ``budget_exhausted`` (the round
          in which the hospital declined to train), ``None`` if never (object column).

        The worst-case row takes the maximum over hospitals of every ε, δ, steps and rounds
        (ignoring hospitals where that ε was not computed) and the earliest exhausted round.
        ε is never averaged across hospitals. Empty (no worst-case row) when there are no
        hospital rows.

    Raises
    ------
    ValueError
        If ``privacy`` lacks one of :data:`PRIVACY_COLUMNS`.
    """
    missing = [c for c in PRIVACY_COLUMNS if c not in privacy.columns]
    if missing:
        raise ValueError(
            f"budget_summary needs a frame with the columns of privacy.csv; missing {_quoted(missing)}. "
            f"Load it with load_privacy(run_dir)."
        )
    hospitals = privacy[privacy["site"].astype(str) != CLIENT_LEVEL]
    records: list[dict[str, Any]] = []
    for site in sorted(hospitals["site"].astype(str).unique(), key=_site_key):
        rows = hospitals[hospitals["site"].astype(str) == site].sort_values("round")
        last = rows.iloc[-1]
        exhausted = rows.loc[rows["budget_exhausted"].astype(bool), "round"]
        records.append(
            {
                "site": site,
                "epsilon_rdp": float(last["epsilon_rdp"]),
                "epsilon_prv": float(last["epsilon_prv"]),
                "delta": float(last["delta"]),
                "steps": int(rows["steps"].sum()),
                "rounds_participated": int(rows["participated"].astype(bool).sum()),
                "budget_exhausted_round": int(exhausted.min()) if len(exhausted) else None,
            }
        )
    if records:
        exhausted_rounds = [r["budget_exhausted_round"] for r in records]
        exhausted_rounds = [r for r in exhausted_rounds if r is not None]
        records.append(
            {
                "site": WORST_CASE,
                **{key: _worst([r[key] for r in records]) for key in ("epsilon_rdp", "epsilon_prv", "delta")},
                "steps": max(r["steps"] for r in records),
                "rounds_participated": max(r["rounds_participated"] for r in records),
                "budget_exhausted_round": min(exhausted_rounds) if exhausted_rounds else None,
            }
        )
    summary = pd.DataFrame(records, columns=list(SUMMARY_COLUMNS))
    # Keep "never" as None rather than letting pandas turn the column into floats with NaN.
    summary["budget_exhausted_round"] = pd.Series(
        [r["budget_exhausted_round"] for r in records], index=summary.index, dtype=object
    )
    return summary


def build_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``RUN_DIR/privacy_report.md`` and ``RUN_DIR/privacy_report.html``.

    Also writes the Markdown's plots beside it (``privacy_epsilon.png`` and, where there is
    something to draw, ``privacy_client_epsilon.png`` and ``privacy_dice_epsilon.png``). A run
    without privacy (no ``privacy.csv``, no hospital rows, or mode ``off``) still gets a report
    that says so. ``config.json`` is optional; missing keys are reported as not recorded.

    Parameters
    ----------
    run_dir
        The run folder; it must hold ``metrics.csv``.

    Returns
    -------
    tuple of pathlib.Path
        ``(markdown_path, html_path)``.

    Raises
    ------
    ReportError
        If the folder does not exist or is not a folder, ``metrics.csv`` is missing, or a file
        is unreadable or malformed; the message names the file and what is wrong.
    """
    run = Path(run_dir)
    if not run.exists():
        raise ReportError(
            f"Run folder {run} does not exist; give the folder of a finished run (it holds {METRICS_CSV})."
        )
    if not run.is_dir():
        raise ReportError(f"Run folder {run} is not a folder; give the folder of a run, not a file in it.")
    if not (run / METRICS_CSV).is_file():
        raise ReportError(
            f"Run folder {run} has no {METRICS_CSV}; is it the folder of a run that has started?"
        )

    settings = _load_settings(run)
    privacy = load_privacy(run)
    metrics = _load_metrics(run)
    blocks = _report_blocks(run, settings, privacy, metrics) + _scenario_blocks(run, metrics)

    md_path, html_path = run / REPORT_MD, run / REPORT_HTML
    for block in blocks:
        if isinstance(block, _Figure):
            (run / block.name).write_bytes(block.png)
    md_path.write_text(_render_markdown(blocks), encoding="utf-8")
    html_path.write_text(_render_html(blocks, title=f"Privacy budget report: {run.name}"), encoding="utf-8")
    return md_path, html_path


# ------------------------------------------------------------------------------ parsing helpers


def _empty_privacy() -> pd.DataFrame:
    dtypes = {
        "round": "int64",
        "site": object,
        "participated": bool,
        "steps": "int64",
        "budget_exhausted": bool,
    }
    return pd.DataFrame({c: pd.Series([], dtype=dtypes.get(c, "float64")) for c in PRIVACY_COLUMNS})


def _read_csv_as_text(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """Read every cell as text and check the header is exactly ``columns`` (any order)."""
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        expected = ",".join(columns)
        raise ReportError(f"{path} is empty; it must start with the header line {expected}.") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ReportError(f"{path} is not a readable CSV file ({reason}).") from None
    except OSError as err:
        raise ReportError(f"{path} cannot be read ({err.strerror or err}).") from None
    header = [str(c).strip() for c in raw.columns]
    raw.columns = header
    missing = [c for c in columns if c not in header]
    extra = [c for c in header if c not in columns]
    duplicates = sorted({c for c in header if header.count(c) > 1})
    if missing or extra or duplicates:
        problems = []
        if missing:
            problems.append(f"missing column(s) {_quoted(missing)}")
        if extra:
            problems.append(f"unexpected column(s) {_quoted(extra)}")
        if duplicates:
            problems.append(f"repeated column(s) {_quoted(duplicates)}")
        raise ReportError(
            f"{path} has {' and '.join(problems)}; it must have exactly the columns {', '.join(columns)}."
        )
    return raw


def _cells(raw: pd.DataFrame, column: str) -> list[tuple[int, str]]:
    """``(line number in the file, stripped text)`` for each cell of ``column``."""
    return [(i + 2, str(v).strip()) for i, v in enumerate(raw[column].tolist())]


def _bad(path: Path, column: str, line: int, rule: str, value: str) -> ReportError:
    return ReportError(f"{path}, line {line}: column '{column}' must be {rule}. Got '{value}' instead.")


def _parse_site(path: Path, line: int, value: str) -> str:
    if value.lower() == CLIENT_LEVEL:
        return CLIENT_LEVEL
    if value.isdigit():
        return str(int(value))
    rule = f"a hospital id (a non-negative integer such as '0') or '{CLIENT_LEVEL}'"
    raise _bad(path, "site", line, rule, value)


def _parse_count(path: Path, column: str, line: int, value: str) -> int:
    try:
        number = float(value)
    except ValueError:
        raise _bad(path, column, line, "a non-negative integer", value) from None
    if not math.isfinite(number) or number < 0 or number != int(number):
        raise _bad(path, column, line, "a non-negative integer", value)
    return int(number)


def _parse_flag(path: Path, column: str, line: int, value: str, *, optional: bool) -> bool:
    text = value.lower()
    if text in _TRUE:
        return True
    if text in _FALSE or (optional and text == ""):
        return False
    raise _bad(path, column, line, "0/1 or true/false", value)


def _parse_nonnegative(path: Path, column: str, line: int, value: str) -> float:
    if value == "" or value.lower() in {"nan", "na", "n/a", "none", "null"}:
        return math.nan
    rule = "a non-negative number, 'inf', or empty/NaN when not computed"
    try:
        number = float(value)
    except ValueError:
        raise _bad(path, column, line, rule, value) from None
    if number < 0:
        raise _bad(path, column, line, rule, value)
    return number


def _site_key(site: str) -> tuple[int, int, str]:
    """Hospitals in numeric id order, then anything else (client-level, worst case)."""
    return (0, int(site), "") if site.isdigit() else (1, 0, site)


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _worst(values: Sequence[float]) -> float:
    """The maximum, ignoring NaN (not computed); NaN when nothing was computed."""
    finite_or_inf = [v for v in values if not math.isnan(v)]
    return max(finite_or_inf) if finite_or_inf else math.nan


def _load_metrics(run: Path) -> pd.DataFrame:
    path = run / METRICS_CSV
    raw = _read_csv_as_text(path, METRICS_COLUMNS)
    values = []
    for line, text in _cells(raw, "value"):
        try:
            values.append(float(text) if text else math.nan)
        except ValueError:
            raise _bad(path, "value", line, "a number", text) from None
    return pd.DataFrame(
        {
            "round": [_parse_count(path, "round", line, v) for line, v in _cells(raw, "round")],
            "site": [v for _, v in _cells(raw, "site")],
            "split": [v for _, v in _cells(raw, "split")],
            "metric": [v for _, v in _cells(raw, "metric")],
            "value": pd.Series(values, dtype="float64"),
        }
    )


@dataclass(frozen=True)
class _Settings:
    """What ``config.json`` says about the run; ``None`` where a key is absent."""

    mode: str | None = None
    delta: float | None = None
    target_epsilon: float | None = None
    client_target_epsilon: float | None = None
    pretrain: int = 0
    pretrain_unit: str = "round"
    num_hospitals: int | None = None
    seed: int | None = None
    found: bool = True


def _load_settings(run: Path) -> _Settings:
    path = run / CONFIG_JSON
    if not path.exists():
        return _Settings(found=False)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"{path} is not readable JSON ({err}).") from None
    if not isinstance(record, dict):
        kind = type(record).__name__
        raise ReportError(f"{path} must hold a JSON object at the top level. Got {kind} instead.")
    config: dict[str, Any] = record["config"] if isinstance(record.get("config"), dict) else {}
    privacy: dict[str, Any] = config["privacy"] if isinstance(config.get("privacy"), dict) else {}
    world: dict[str, Any] = config["world"] if isinstance(config.get("world"), dict) else {}

    mode = privacy.get("mode")
    if mode is not None and mode not in MODES:
        allowed = ", ".join(MODES)
        raise ReportError(f"{path}: config.privacy.mode must be one of {allowed}. Got {mode!r} instead.")
    seed = record.get("seed", world.get("seed"))
    # The brief's name is pretrain_rounds; sims.config writes pretrain_epochs (before round 1).
    unit = "epoch" if privacy.get("pretrain_rounds") is None and "pretrain_epochs" in privacy else "round"
    pretrain = _json_count(path, f"config.privacy.pretrain_{unit}s", privacy.get(f"pretrain_{unit}s"))
    return _Settings(
        mode=mode,
        delta=_json_number(path, "config.privacy.delta", privacy.get("delta")),
        target_epsilon=_json_number(path, "config.privacy.target_epsilon", privacy.get("target_epsilon")),
        client_target_epsilon=_json_number(
            path, "config.privacy.client_target_epsilon", privacy.get("client_target_epsilon")
        ),
        pretrain=pretrain or 0,
        pretrain_unit=unit,
        num_hospitals=_json_count(path, "num_hospitals", record.get("num_hospitals")),
        seed=_json_count(path, "seed", seed, allow_negative=True),
    )


def _json_number(path: Path, key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or value < 0:
        raise ReportError(f"{path}: {key} must be a non-negative number or null. Got {value!r} instead.")
    return float(value)


def _json_count(path: Path, key: str, value: Any, *, allow_negative: bool = False) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (value < 0 and not allow_negative):
        rule = "an integer" if allow_negative else "a non-negative integer"
        raise ReportError(f"{path}: {key} must be {rule} or absent. Got {value!r} instead.")
    return value


# ------------------------------------------------------------------------------ document model


@dataclass(frozen=True)
class _Heading:
    level: int
    text: str


@dataclass(frozen=True)
class _Paragraph:
    """Text with inline ``**bold**`` and ```code``` only, so both renderers agree."""

    text: str


@dataclass(frozen=True)
class _Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class _Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    emphasise: frozenset[int] = field(default_factory=frozenset)  # row indices shown in bold


@dataclass(frozen=True)
class _Figure:
    name: str
    png: bytes
    alt: str
    caption: str


_Block = _Heading | _Paragraph | _Bullets | _Table | _Figure


def _render_markdown(blocks: Sequence[_Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, _Heading):
            out += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, _Paragraph):
            out += [block.text, ""]
        elif isinstance(block, _Bullets):
            out += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, _Table):
            out.append("| " + " | ".join(_md_cell(c) for c in block.header) + " |")
            out.append("|" + "---|" * len(block.header))
            for i, row in enumerate(block.rows):
                cells = [_md_cell(c) for c in row]
                if i in block.emphasise:
                    cells = [f"**{c}**" if c else c for c in cells]
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
        else:
            out += [f"![{block.alt}]({block.name})", "", f"*{block.caption}*", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       max-width: 60rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.45; color: #1b1b1b; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.75rem 0; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; } tr.emphasise td { font-weight: bold; background: #fff4e5; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; }
figcaption { font-size: 0.9rem; color: #555; }
code { background: #f3f3f3; padding: 0 0.2rem; }
""".strip()


def _render_html(blocks: Sequence[_Block], *, title: str) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
    ]
    for block in blocks:
        if isinstance(block, _Heading):
            out.append(f"<h{block.level}>{_inline_html(block.text)}</h{block.level}>")
        elif isinstance(block, _Paragraph):
            out.append(f"<p>{_inline_html(block.text)}</p>")
        elif isinstance(block, _Bullets):
            out += ["<ul>", *(f"<li>{_inline_html(item)}</li>" for item in block.items), "</ul>"]
        elif isinstance(block, _Table):
            header = "".join(f"<th>{_inline_html(c)}</th>" for c in block.header)
            out += ["<table>", "<thead>", f"<tr>{header}</tr>", "</thead>", "<tbody>"]
            for i, row in enumerate(block.rows):
                opening = '<tr class="emphasise">' if i in block.emphasise else "<tr>"
                out.append(opening + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>")
            out += ["</tbody>", "</table>"]
        else:
            data = base64.b64encode(block.png).decode("ascii")
            out += [
                "<figure>",
                f'<img src="data:image/png;base64,{data}" alt="{html.escape(block.alt)}">',
                f"<figcaption>{_inline_html(block.caption)}</figcaption>",
                "</figure>",
            ]
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    escaped = html.escape(text, quote=False)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


# ---------------------------------------------------------------------------------- formatting


def _fmt_eps(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞"
    return f"{value:.3f}"


def _fmt_number(value: float | None, spec: str = ".4g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def _fmt_optional(value: Any, missing: str = "not recorded") -> str:
    return missing if value is None else str(value)


def _site_label(site: str) -> str:
    return f"hospital {site}" if site.isdigit() else site


def _plural(count: int, unit: str) -> str:
    return f"{count} {unit}" + ("" if count == 1 else "s")


def _list_words(words: Sequence[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


# -------------------------------------------------------------------------------------- plots


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    # No "Software" key: the bytes then depend only on the drawing, not on the library version.
    figure.savefig(buffer, format="png", dpi=_DPI, metadata={"Software": None})
    return buffer.getvalue()


def _finite(values: pd.Series) -> np.ndarray:
    """Values as floats with ±inf replaced by NaN, so lines break instead of shooting off."""
    array = values.to_numpy(dtype=float, copy=True)
    array[np.isinf(array)] = np.nan
    return array


def _drawable(target: float | None) -> float | None:
    """The target as a horizontal line, or ``None`` when there is none to draw (unset or ∞)."""
    return target if target is not None and math.isfinite(target) else None


def _headroom(ax: Any, series: Sequence[pd.Series], target: float | None) -> None:
    """y from 0 to a little above the largest finite ε or the target, so neither sits on the frame."""
    values = [v for s in series for v in _finite(s) if not math.isnan(v)]
    if target is not None:
        values.append(target)
    top = max(values, default=0.0)
    ax.set_ylim(0.0, top * 1.08 if top > 0 else 1.0)


def _epsilon_figure(hospitals: pd.DataFrame, summary: pd.DataFrame, target: float | None) -> bytes:
    figure = Figure(figsize=(8.0, 4.5), layout="constrained")
    ax = figure.subplots()
    handles: list[Line2D] = []
    sites = [s for s in summary["site"] if s != WORST_CASE]
    for index, site in enumerate(sites):
        colour = f"C{index % 10}"
        rows = hospitals[hospitals["site"] == site].sort_values("round")
        rounds = rows["round"].to_numpy()
        ax.plot(rounds, _finite(rows["epsilon_rdp"]), color=colour, linestyle="-", **_DOTS)
        if rows["epsilon_prv"].notna().any():
            ax.plot(rounds, _finite(rows["epsilon_prv"]), color=colour, linestyle="--", **_DOTS)
        ran_out = summary.loc[summary["site"] == site, "budget_exhausted_round"].iloc[0]
        if ran_out is not None:
            at = rows[rows["round"] == ran_out]
            ax.plot(at["round"], _finite(at["epsilon_rdp"]), color=colour, linestyle="none", **_RAN_OUT)
        handles.append(Line2D([], [], color=colour, linestyle="-", label=_site_label(site)))
    handles.append(Line2D([], [], color="0.3", linestyle="-", label="RDP accountant"))
    if hospitals["epsilon_prv"].notna().any():
        handles.append(Line2D([], [], color="0.3", linestyle="--", label="PRV accountant"))
    if summary["budget_exhausted_round"].notna().any():
        handles.append(Line2D([], [], color="0.3", linestyle="none", label="budget ran out", **_RAN_OUT))
    if target is not None:
        ax.axhline(target, **_TARGET)
        handles.append(Line2D([], [], label=f"target ε = {target:g}", **_TARGET))
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε (per patient)")
    ax.set_title("Sample-level ε per hospital")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _headroom(ax, [hospitals["epsilon_rdp"], hospitals["epsilon_prv"]], target)
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _png(figure)


def _client_figure(client: pd.DataFrame, target: float | None) -> bytes:
    figure = Figure(figsize=(8.0, 3.6), layout="constrained")
    ax = figure.subplots()
    rounds = client["round"].to_numpy()
    ax.plot(rounds, _finite(client["epsilon_rdp"]), color="C3", linestyle="-", label="RDP", **_DOTS)
    if client["epsilon_prv"].notna().any():
        ax.plot(rounds, _finite(client["epsilon_prv"]), color="C3", linestyle="--", label="PRV", **_DOTS)
    stopped = client[client["budget_exhausted"].astype(bool)]
    if not stopped.empty:
        ax.plot(
            stopped["round"], _finite(stopped["epsilon_rdp"]), color="C3", linestyle="none",
            label="stopped before this round", **_RAN_OUT,
        )
    if target is not None:
        ax.axhline(target, label=f"client-level target ε = {target:g}", **_TARGET)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative ε (per hospital)")
    ax.set_title("Client-level ε (DP-FedAvg), not added to the per-patient ε")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _headroom(ax, [client["epsilon_rdp"], client["epsilon_prv"]], target)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _png(figure)


def _dice_figure(dice: pd.Series, dice_label: str, worst: pd.DataFrame, target: float | None) -> bytes:
    figure = Figure(figsize=(8.0, 5.6), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True)
    top.plot(dice.index.to_numpy(), dice.to_numpy(dtype=float), color="C0", marker="o", markersize=3)
    top.set_ylabel("Dice (mean over classes)")
    top.set_title(dice_label)
    top.grid(True, alpha=0.3)
    if worst.empty:
        bottom.text(0.5, 0.5, "no sample-level ε", ha="center", va="center", transform=bottom.transAxes)
    else:
        rounds = worst.index.to_numpy()
        for column, style, name in (("epsilon_rdp", "-", "RDP"), ("epsilon_prv", "--", "PRV")):
            if worst[column].notna().any():
                label = f"worst-case ε, {name}"
                bottom.plot(rounds, _finite(worst[column]), color="C1", linestyle=style, label=label, **_DOTS)
        if target is not None:
            bottom.axhline(target, label=f"target ε = {target:g}", **_TARGET)
        _headroom(bottom, [worst["epsilon_rdp"], worst["epsilon_prv"]], target)
        bottom.legend(loc="lower right", framealpha=0.9)
    bottom.set_ylabel("ε (max over hospitals)")
    bottom.set_xlabel("round")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.grid(True, alpha=0.3)
    return _png(figure)


# ------------------------------------------------------------------------------- the report


def _worst_case_by_round(hospitals: pd.DataFrame) -> pd.DataFrame:
    """Per round, the maximum over hospitals of the cumulative ε (a missing row keeps its last value)."""
    if hospitals.empty:
        return pd.DataFrame(columns=["epsilon_rdp", "epsilon_prv"], dtype=float)
    out = {}
    for column in ("epsilon_rdp", "epsilon_prv"):
        wide = hospitals.pivot(index="round", columns="site", values=column).sort_index().ffill()
        out[column] = wide.max(axis=1, skipna=True)
    return pd.DataFrame(out)


def _global_dice(metrics: pd.DataFrame) -> tuple[pd.Series, str]:
    """Global ``dice_mean`` per round and a label saying where it comes from (empty if none)."""
    dice = metrics[metrics["metric"] == "dice_mean"]
    # "public": the server's public evaluation set; "holdout": runs written before it existed,
    # when the server pooled held-out patients of every hospital.
    for split, label in (
        ("public", "Global model on the server's public evaluation set (no hospital's patients)"),
        ("holdout", "Global model on the hospitals' pooled held-out patients"),
    ):
        server = dice[(dice["site"] == "global") & (dice["split"] == split)]
        if not server.empty:
            return server.groupby("round")["value"].mean(), label
    pooled = dice[(dice["site"] == "global") & (dice["split"] == "test")]
    if not pooled.empty:
        return pooled.groupby("round")["value"].mean(), "Patient-weighted mean of the hospitals' test Dice"
    tests = dice[dice["site"].str.isdigit() & (dice["split"] == "test")]
    if not tests.empty:
        return tests.groupby("round")["value"].mean(), "Mean of the hospitals' test Dice (unweighted)"
    return pd.Series(dtype=float), ""


def _final_test_dice(metrics: pd.DataFrame) -> dict[str, tuple[int, float]]:
    """Each hospital's last test ``dice_mean``: ``{site: (round, value)}``."""
    chosen = (metrics["metric"] == "dice_mean") & (metrics["split"] == "test") & metrics["site"].str.isdigit()
    dice = metrics[chosen]
    out: dict[str, tuple[int, float]] = {}
    for site, rows in dice.groupby("site"):
        last = rows.sort_values("round").iloc[-1]
        out[str(int(str(site)))] = (int(last["round"]), float(last["value"]))
    return out


def _scenario_blocks(run: Path, metrics: pd.DataFrame) -> list[_Block]:
    """Sections of the scenarios the run took part in; each returns nothing when it does not apply.

    Imported here, not at the top: the scenarios build on this module's blocks and renderers.
    """
    from scenarios import domain_shift_report, ood_report, robustness_report

    sections = (domain_shift_report, robustness_report, ood_report)
    return [block for section in sections for block in section.run_section(run, metrics)]


def _report_blocks(
    run: Path, settings: _Settings, privacy: pd.DataFrame, metrics: pd.DataFrame
) -> list[_Block]:
    hospitals = privacy[privacy["site"] != CLIENT_LEVEL]
    client = privacy[privacy["site"] == CLIENT_LEVEL].sort_values("round")
    summary = budget_summary(privacy)
    delta = settings.delta
    if delta is None and not privacy.empty and privacy["delta"].notna().any():
        delta = float(privacy["delta"].max())
    target = settings.target_epsilon
    recorded = not privacy.empty
    if settings.mode is not None:
        mode = settings.mode
    else:
        mode = "not recorded (privacy rows present)" if recorded else f"off (no settings, no {PRIVACY_CSV})"
    sample_level_off = hospitals.empty or settings.mode in ("off", "client")
    client_target = []
    if settings.mode in ("client", "both"):
        value = settings.client_target_epsilon
        client_target.append(f"**client-level target ε**: {'none' if value is None else _fmt_number(value, 'g')}")

    blocks: list[_Block] = [_Heading(1, f"Privacy budget report: {run.name}")]
    blocks.append(
        _Bullets(
            (
                f"**privacy mode**: {mode}",
                f"**δ**: {_fmt_number(delta, 'g')}",
                f"**target ε**: {'none' if target is None else _fmt_number(target, 'g').replace('inf', '∞')}",
                *client_target,
                f"**hospitals**: {_fmt_optional(settings.num_hospitals)}",
                f"**seed**: {_fmt_optional(settings.seed)}",
                f"**public pre-training**: {_plural(settings.pretrain, settings.pretrain_unit)}",
            )
        )
    )
    if not settings.found:
        blocks.append(_Paragraph(f"`{CONFIG_JSON}` is not in the run folder; settings are not recorded."))
    if not recorded and settings.mode in (None, "off"):
        blocks.append(
            _Paragraph(
                "**Privacy was off in this run.** No differential privacy was applied, so neither the model "
                "nor the updates the hospitals sent carry any formal privacy guarantee; there is no "
                "privacy budget to report."
            )
        )
    elif not recorded:
        blocks.append(
            _Paragraph(
                f"**Warning: no privacy accounting was recorded.** `{CONFIG_JSON}` says privacy mode "
                f"'{settings.mode}', but `{PRIVACY_CSV}` is missing or has no rows, so no guarantee can be "
                "shown."
            )
        )
    blocks.append(
        _Paragraph(
            "**Privacy unit: the patient.** Each simulated patient contributes exactly one slice, so "
            "per-sample DP-SGD is per-patient DP: ε bounds what the released model reveals about any "
            "one patient of a hospital, at failure probability δ."
        )
    )
    if settings.pretrain > 0:
        blocks.append(
            _Paragraph(
                f"Pre-training ({_plural(settings.pretrain, settings.pretrain_unit)}) ran on the public "
                "ICBM152 template, which holds no patient data: it costs no patient privacy and adds nothing "
                "to ε."
            )
        )

    blocks += _sample_level_blocks(hospitals, summary, target, sample_level_off, settings.mode)
    blocks += _client_level_blocks(client, settings.mode, settings.client_target_epsilon)
    blocks += _dice_blocks(metrics, summary, _worst_case_by_round(hospitals), target)
    return blocks


def _sample_level_blocks(
    hospitals: pd.DataFrame, summary: pd.DataFrame, target: float | None, off: bool, mode: str | None
) -> list[_Block]:
    blocks: list[_Block] = [_Heading(2, "Per-patient privacy budget of each hospital (sample-level DP-SGD)")]
    if hospitals.empty:
        reason = "client-level DP only" if mode == "client" else "privacy off"
        blocks.append(_Paragraph(f"No sample-level DP-SGD in this run ({reason}): no per-patient ε spent."))
        return blocks
    if off:
        blocks.append(
            _Paragraph(
                f"Warning: `{CONFIG_JSON}` says mode '{mode}', yet `{PRIVACY_CSV}` has per-hospital rows; "
                "they are shown as recorded."
            )
        )
    blocks.append(
        _Paragraph(
            "ε is cumulative over all rounds up to the last one. **RDP** is the Rényi-DP accountant "
            "(Mironov 2017; an upper bound), **PRV** the privacy-random-variable accountant (Gopi et al. "
            "2021; a tighter numerical estimate). ε is never averaged across hospitals: each hospital's "
            "guarantee is its own, and the **worst case** row is the maximum over hospitals (for the "
            "round the budget ran out, the earliest)."
        )
    )
    rows = []
    for record in summary.itertuples(index=False):
        ran_out = record.budget_exhausted_round
        rows.append(
            (
                _site_label(str(record.site)),
                _fmt_eps(record.epsilon_rdp),
                _fmt_eps(record.epsilon_prv),
                _fmt_number(record.delta, "g"),
                str(record.steps),
                str(record.rounds_participated),
                "never" if ran_out is None else str(ran_out),
            )
        )
    blocks.append(
        _Table(
            ("site", "ε (RDP)", "ε (PRV)", "δ", "DP-SGD steps", "rounds trained", "budget ran out in round"),
            tuple(rows),
            emphasise=frozenset({len(rows) - 1}),
        )
    )
    notes: list[str] = []
    per_site = summary[summary["site"] != WORST_CASE]
    for record in per_site.itertuples(index=False):
        if record.budget_exhausted_round is not None:
            notes.append(
                f"{_site_label(str(record.site)).capitalize()} ran out of budget in round "
                f"{record.budget_exhausted_round}: from that round on it declined to train, because its "
                "next round would have overshot the target ε."
            )
    for column, name in (("epsilon_rdp", "RDP"), ("epsilon_prv", "PRV")):
        infinite = [str(s) for s, v in zip(per_site["site"], per_site[column], strict=True) if math.isinf(v)]
        if infinite:
            notes.append(
                f"ε ({name}) is ∞ for hospital(s) {_list_words(infinite)}: "
                "noise multiplier 0 gives no privacy."
            )
        missing = [str(s) for s, v in zip(per_site["site"], per_site[column], strict=True) if math.isnan(v)]
        if missing and len(missing) < len(per_site):
            notes.append(
                f"ε ({name}) was not computed for hospital(s) {_list_words(missing)}; its worst case "
                "covers the other hospitals only."
            )
        elif missing:
            notes.append(f"ε ({name}) was not computed in this run.")
        if target is not None:
            over = [
                f"{s} ({_fmt_eps(v)})"
                for s, v in zip(per_site["site"], per_site[column], strict=True)
                if not math.isnan(v) and v > target * (1 + 1e-9)
            ]
            if over:
                notes.append(
                    f"Final ε ({name}) exceeds the target {target:g} for hospital(s) {_list_words(over)}."
                )
    if notes:
        blocks.append(_Bullets(tuple(notes)))
    caption = "Cumulative ε per hospital against rounds: RDP solid, PRV dashed"
    caption += "; dotted line: the target ε" if _drawable(target) is not None else "; no finite target ε"
    caption += "; ✕ marks the round a hospital ran out of budget. ε = ∞ is not drawn."
    png = _epsilon_figure(hospitals, summary, _drawable(target))
    blocks.append(_Figure(EPSILON_PNG, png, "ε per hospital against rounds", caption))
    return blocks


def _client_level_blocks(client: pd.DataFrame, mode: str | None, target: float | None) -> list[_Block]:
    if client.empty:
        if mode in ("client", "both"):
            return [
                _Heading(2, "Client-level privacy budget (DP-FedAvg)"),
                _Paragraph(
                    f"Mode '{mode}' asks for client-level DP, but `{PRIVACY_CSV}` has no client-level rows."
                ),
            ]
        return []
    last = client.iloc[-1]
    released = client[client["participated"].astype(bool)]
    blocks: list[_Block] = [
        _Heading(2, "Client-level privacy budget (DP-FedAvg)"),
        _Paragraph(
            "The server's client-level DP (DP-FedAvg, McMahan et al. 2018) bounds what the global model "
            "reveals about a whole hospital's participation. It is reported apart from the sample-level "
            "(per-patient) figures above, and **the two are not added**: they protect different units."
        ),
        _Table(
            (
                "accountant",
                "rounds",
                "client sampling rate",
                "noise multiplier",
                "ε (RDP)",
                "ε (PRV)",
                "δ",
                "target ε",
            ),
            (
                (
                    CLIENT_LEVEL,
                    str(len(released)),
                    _fmt_number(float(last["sample_rate"])),
                    _fmt_number(float(last["noise_multiplier"])),
                    _fmt_eps(float(last["epsilon_rdp"])),
                    _fmt_eps(float(last["epsilon_prv"])),
                    _fmt_number(float(last["delta"]), "g"),
                    "none" if target is None else _fmt_number(target, "g"),
                ),
            ),
        ),
    ]
    notes: list[str] = []
    stopped = client.loc[client["budget_exhausted"].astype(bool), "round"]
    if len(stopped):
        notes.append(
            f"The client-level budget stopped the federation before round {int(stopped.min())}: one more "
            "round of DP-FedAvg would have taken the client-level ε above the target"
            + ("." if target is None else f" {target:g}.")
        )
    elif target is not None:
        notes.append(f"The client-level budget (target ε = {target:g}) did not stop the federation.")
    if target is not None:
        for column, name in (("epsilon_rdp", "RDP"), ("epsilon_prv", "PRV")):
            value = float(last[column])
            if not math.isnan(value) and value > target * (1 + 1e-9):
                notes.append(
                    f"Final client-level ε ({name}) {_fmt_eps(value)} exceeds the target {target:g}."
                )
    if notes:
        blocks.append(_Bullets(tuple(notes)))
    caption = "Cumulative client-level ε against rounds (RDP solid, PRV dashed where computed)"
    caption += "; dotted line: the client-level target ε" if _drawable(target) is not None else ""
    caption += "; ✕ marks the round the budget stopped the federation." if len(stopped) else "."
    png = _client_figure(client, _drawable(target))
    blocks.append(_Figure(CLIENT_EPSILON_PNG, png, "client-level ε against rounds", caption))
    return blocks


def _dice_blocks(
    metrics: pd.DataFrame, summary: pd.DataFrame, worst: pd.DataFrame, target: float | None
) -> list[_Block]:
    blocks: list[_Block] = [_Heading(2, "Segmentation quality beside privacy")]
    final_dice = _final_test_dice(metrics)
    per_site = {str(r.site): r for r in summary.itertuples(index=False) if r.site != WORST_CASE}
    sites = sorted(set(final_dice) | set(per_site), key=_site_key)
    if sites:
        rows = []
        for site in sites:
            dice = final_dice.get(site)
            record = per_site.get(site)
            rows.append(
                (
                    _site_label(site),
                    "n/a" if dice is None else f"{dice[1]:.4f}",
                    "n/a" if dice is None else str(dice[0]),
                    "n/a" if record is None else _fmt_eps(record.epsilon_rdp),
                    "n/a" if record is None else _fmt_eps(record.epsilon_prv),
                )
            )
        header = ("site", "final test Dice", "Dice round", "final ε (RDP)", "final ε (PRV)")
        blocks.append(_Table(header, tuple(rows)))
    else:
        blocks.append(_Paragraph("No per-hospital test Dice was recorded."))
    dice, label = _global_dice(metrics)
    if dice.empty:
        blocks.append(_Paragraph("No global Dice was recorded, so there is no Dice curve to draw."))
        return blocks
    blocks.append(
        _Figure(
            DICE_EPSILON_PNG,
            _dice_figure(dice, label, worst, _drawable(target)),
            "global Dice and worst-case ε against rounds",
            f"Top: {label.lower()} (`dice_mean`) against rounds. Bottom: "
            + ("no sample-level ε was spent." if worst.empty
               else "worst-case (max over hospitals) cumulative ε against rounds."),
        )
    )
    return blocks
