"""Sweep report: per-cell mean ± std over seeds, worst-case ε over hospitals (never the mean),
client-level ε apart, failures listed with their logs, a self-contained HTML page, same bytes on
a rebuild, and one-sentence errors naming the file for missing or garbled sweep files."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from server.sweep_report import (
    DICE_EPSILON_PNG,
    DICE_ROUNDS_PNG,
    SweepReportError,
    build_sweep_report,
    cell_table,
    read_sweep_folder,
)

SWEPT = ["privacy.mode", "privacy.target-epsilon", "patients-per-hospital", "seed"]
ANSI_INFO = "\x1b[92mINFO \x1b[0m:"


@dataclass
class Trial:
    """One trial as the driver records it, and the rows it leaves in results.csv."""

    id: str
    swept: dict[str, Any]
    dice_test: list[float]  # global test dice_mean, rounds 1..n
    dice_public: list[float] = field(default_factory=list)  # rounds 0..n
    epsilon: dict[str, list[float]] = field(default_factory=dict)  # hospital -> epsilon_rdp per round
    client: list[float] = field(default_factory=list)  # client-level epsilon_rdp per round
    status: str = "completed"
    error: str | None = None
    log: list[str] = field(default_factory=list)
    run_dir: str | None = None  # default /runs/<id>

    def record(self, index: int) -> dict[str, Any]:
        failed = self.status != "completed"
        return {
            "trial": self.id, "index": index, "swept": self.swept,
            "config": {"strategy": "fedavg", "num-server-rounds": 3, **self.swept},
            "federation": {"num-supernodes": 3}, "status": self.status, "exit_code": 124 if failed else 0,
            "error": self.error, "run_dir": self.run_dir or f"/runs/{self.id}",
            "node": {"node_id": "a1b2c3d4e5f60718", "hostname": "worker-1", "ip": "10.0.0.7"},
            "wall_s": 41.25, "peak_rss_bytes": 3_012_345_678, "started_at": "2026-11-29T06:10:00Z",
            "ended_at": "2026-11-29T06:10:41Z", "log_tail": self.log,
        }

    def rows(self) -> list[list[Any]]:
        prefix = [self.id, *self.swept.values()]  # in sweep.json's key order
        out = [[*prefix, r, "global", "public", "dice_mean", v] for r, v in enumerate(self.dice_public)]
        for r, v in enumerate(self.dice_test, start=1):
            out.append([*prefix, r, "global", "test", "dice_mean", v])
            out.append([*prefix, r, "0", "test", "dice_mean", v + 0.05])  # hospital rows are not the global
        for site, values in self.epsilon.items():
            for r, v in enumerate(values, start=1):
                out.append([*prefix, r, site, "privacy", "epsilon_rdp", v])
                out.append([*prefix, r, site, "privacy", "epsilon_prv", v / 2])
        for r, v in enumerate(self.client, start=1):
            out.append([*prefix, r, "client-level", "privacy", "epsilon_rdp", v])
        return out


def swept(mode: str, target: float | str, patients: int, seed: int | None) -> dict[str, Any]:
    """Swept values in sweep.json's order; without ``seed`` when seeds are not swept."""
    values = dict(zip(SWEPT, (mode, target, patients, seed), strict=True))
    return values if seed is not None else {k: v for k, v in values.items() if k != "seed"}


def write_sweep(
    folder: Path, trials: list[Trial], *, unreported: tuple[str, ...] = (), seed_key: str | None = "seed"
) -> Path:
    """The three files the sweep driver writes; ``unreported`` trial ids have no trials.jsonl line."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = [t.id for t in trials] + list(unreported)
    keys = list(trials[0].swept) if trials else SWEPT
    info = {
        "name": "privacy_utility", "sweep_file": "/abs/sweeps/privacy_utility.toml", "swept_keys": keys,
        "seed_key": seed_key, "trials": ids, "address": "local", "code_digest": "ab12cd34",
        "started_at": "2026-11-29T06:10:00Z",
    }
    (folder / "sweep.json").write_text(json.dumps(info))
    with (folder / "trials.jsonl").open("w") as fh:
        for index, trial in enumerate(trials):
            fh.write(json.dumps(trial.record(index)) + "\n")
    with (folder / "results.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trial", *keys, "round", "site", "split", "metric", "value"])
        for trial in trials:
            for row in trial.rows():
                writer.writerow(row)
    return folder


def privacy_sweep(folder: Path) -> Path:
    """Five cells x seeds 0, 1 of three hospitals and three rounds.

    A: sample, ε 8, 150 patients: two completed seeds; hospital 2 spends the most.
    B: both, ε 1: seed 0 completed (with client-level ε), seed 1 timed out after partial rows.
    C: off: seed 0 completed, seed 1 has no trials.jsonl line (missing).
    D: sample, ε 8, 50 patients (a second line in the Dice-vs-ε plot).
    E: client: no sample-level DP, hospitals report ε = inf.
    """
    log = [f"{ANSI_INFO} line {i}" for i in range(25)] + ["RuntimeError: out of time"]
    no_sample_dp = {"0": [math.inf] * 3, "1": [math.inf] * 3}  # privacy.mode client: hospitals report inf
    trials = [
        Trial("a0", swept("sample", 8, 150, 0), [0.5, 0.6, 0.70], [0.1, 0.4, 0.5, 0.60],
              {"0": [2.0, 4.0, 6.0], "1": [2.2, 4.3, 6.5], "2": [3.0, 5.5, 7.9]}),
        Trial("a1", swept("sample", 8, 150, 1), [0.5, 0.6, 0.74], [0.1, 0.4, 0.5, 0.64],
              {"0": [2.0, 4.0, 5.8], "1": [2.1, 4.2, 6.1], "2": [2.9, 5.4, 7.5]}),
        Trial("b0", swept("both", 1, 150, 0), [0.3, 0.4, 0.45], [0.1, 0.2, 0.3, 0.40],
              {"0": [0.3, 0.6, 0.9], "1": [0.3, 0.7, 1.0], "2": [0.3, 0.6, 0.95]}, client=[0.9, 1.7, 2.5]),
        Trial("b1", swept("both", 1, 150, 1), [0.10], [0.1, 0.15], {"0": [99.0], "1": [99.0], "2": [99.0]},
              client=[50.0], status="timed out", error="trial exceeded its 600 s timeout", log=log),
        Trial("c0", swept("off", "none", 150, 0), [0.6, 0.7, 0.80], [0.1, 0.5, 0.6, 0.70]),
        Trial("d0", swept("sample", 8, 50, 0), [0.4, 0.5, 0.60], [],
              {"0": [3.0, 5.0, 7.0], "1": [3.1, 5.1, 7.2]}),
        Trial("d1", swept("sample", 8, 50, 1), [0.4, 0.5, 0.62], [],
              {"0": [3.0, 5.0, 7.1], "1": [3.0, 5.0, 7.0]}),
        Trial("e0", swept("client", 8, 150, 0), [0.6, 0.7, 0.76], [], no_sample_dp, client=[1.0, 2.0, 3.0]),
        Trial("e1", swept("client", 8, 150, 1), [0.6, 0.7, 0.78], [], no_sample_dp, client=[1.0, 2.0, 3.0]),
    ]  # fmt: skip
    return write_sweep(folder, trials, unreported=("c1",))


def row(*cells: object, bold: bool = False) -> str:
    """A Markdown table row; the report shows a flagged row in bold."""
    texts = [f"**{c}**" if bold else str(c) for c in cells]
    return "| " + " | ".join(texts) + " |"


def cells_by_mode(folder: Path) -> dict[tuple[str, int], dict[str, Any]]:
    table = cell_table(read_sweep_folder(folder))
    return {(r["privacy.mode"], r["patients-per-hospital"]): r for r in table.to_dict("records")}


def test_cells_average_over_completed_seeds_and_take_the_worst_hospital(tmp_path: Path) -> None:
    folder = privacy_sweep(tmp_path / "sweep")

    table = cell_table(read_sweep_folder(folder))
    cells = cells_by_mode(folder)

    assert list(table.columns[:3]) == SWEPT[:3] and len(table) == 5  # the seed is not a cell key
    assert list(table["privacy.mode"]) == ["sample", "both", "off", "sample", "client"]  # sweep order
    a = cells[("sample", 150)]
    assert (a["n_completed"], a["n_expected"], a["flag"]) == (2, 2, "")
    assert a["dice_test_mean"] == pytest.approx(0.72)
    assert a["dice_test_std"] == pytest.approx(math.sqrt(2 * 0.02**2))  # ddof = 1
    assert a["dice_public_mean"] == pytest.approx(0.62)
    # Worst case per seed: hospital 2 (7.9 and 7.5), not the hospitals' mean (6.8 and 6.47).
    assert a["epsilon_mean"] == pytest.approx(7.7)
    assert a["epsilon_std"] == pytest.approx(math.sqrt(2 * 0.2**2))
    assert a["epsilon_max"] == pytest.approx(7.9)
    assert math.isnan(a["client_epsilon_max"])


def test_failed_seed_is_left_out_and_flagged_and_client_level_stays_apart(tmp_path: Path) -> None:
    folder = privacy_sweep(tmp_path / "sweep")

    b = cells_by_mode(folder)[("both", 150)]

    assert (b["n_completed"], b["n_expected"], b["n_failed"]) == (1, 2, 1)
    assert b["flag"] == "seed 1 timed out"
    assert b["dice_test_mean"] == pytest.approx(0.45) and math.isnan(b["dice_test_std"])  # not 0.10
    assert b["epsilon_mean"] == pytest.approx(1.0) and b["epsilon_max"] == pytest.approx(1.0)  # not 99
    assert b["client_epsilon_max"] == pytest.approx(2.5)  # not 50, and not added to the 1.0


def test_missing_seed_non_private_and_infinite_epsilon_cells(tmp_path: Path) -> None:
    folder = privacy_sweep(tmp_path / "sweep")

    cells = cells_by_mode(folder)

    c, e = cells[("off", 150)], cells[("client", 150)]
    assert (c["n_completed"], c["n_expected"], c["missing_seeds"]) == (1, 2, (1,))
    assert c["flag"] == "seed 1 missing"
    assert c["private"] is False and math.isnan(c["epsilon_mean"])
    assert c["dice_test_mean"] == pytest.approx(0.80)
    assert e["private"] is True and math.isinf(e["epsilon_mean"]) and math.isinf(e["epsilon_max"])
    assert e["client_epsilon_max"] == pytest.approx(3.0) and e["dice_test_mean"] == pytest.approx(0.77)


def test_markdown_report_shows_the_tables_plots_and_failures(tmp_path: Path) -> None:
    folder = privacy_sweep(tmp_path / "sweep")

    md_path, _ = build_sweep_report(folder)

    text = md_path.read_text(encoding="utf-8")
    a = ("sample", 8, 150, "2/2", "0.720 ± 0.028", "0.620 ± 0.028", "7.700 ± 0.283 (7.900)", "n/a", "–")
    assert row(*a) in text
    # Cells short of seeds are shown in bold.
    both = ("both", 1, 150, "1/2", "0.450 ± –", "0.400 ± –", "1.000 ± – (1.000)", "2.500", "seed 1 timed out")
    off = ("off", "none", 150, "1/2", "0.800 ± –", "0.700 ± –", "non-private", "n/a", "seed 1 missing")
    assert row(*both, bold=True) in text and row(*off, bold=True) in text
    assert row("client", 8, 150, "2/2", "0.770 ± 0.014", "n/a", "∞", "3.000", "–") in text
    a0 = ("a0", "sample", 8, 150, 0, "completed", "worker-1 (a1b2c3d4)", 41.2, 3.01, "0.700", "/runs/a0")
    assert row(*a0) in text
    assert "1 trial(s) of `sweep.json` have no line in `trials.jsonl` yet" in text and "c1" in text
    assert f"![final Dice against worst-case epsilon]({DICE_EPSILON_PNG})" in text
    assert (folder / DICE_EPSILON_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / DICE_ROUNDS_PNG).is_file()
    failures = text.split("## Failures", 1)[1]
    assert "### Trial b1: timed out" in failures and "c1" not in failures  # c1 may still be running
    assert "**exit code**: 124" in failures and "trial exceeded its 600 s timeout" in failures
    # The last 20 log lines, terminal colours stripped.
    assert "INFO : line 6\n" in failures and "RuntimeError: out of time" in failures
    assert "line 5\n" not in failures and "\x1b" not in text


def test_html_is_self_contained_and_rebuilds_to_the_same_bytes(tmp_path: Path) -> None:
    folder = privacy_sweep(tmp_path / "sweep")

    md_path, html_path = build_sweep_report(folder)
    paths = (md_path, html_path, folder / DICE_EPSILON_PNG, folder / DICE_ROUNDS_PNG)
    first = {p.name: p.read_bytes() for p in paths}
    build_sweep_report(folder)
    second = {name: (folder / name).read_bytes() for name in first}

    page = html_path.read_text(encoding="utf-8")
    assert first == second
    assert page.count('src="data:image/png;base64,') == 2
    assert 'src="http' not in page and "<link" not in page and "<script" not in page and "\x00" not in page
    assert "<details><summary>last 20 log lines</summary><pre>INFO : line 6\n" in page
    assert "<td>seed 1 timed out</td>" in page and "<td>non-private</td>" in page


def test_without_finite_epsilon_there_is_no_dice_epsilon_plot(tmp_path: Path) -> None:
    trials = [
        Trial("p0", swept("off", "none", 150, 0), [0.6, 0.7]),
        Trial("q0", swept("client", 8, 150, 0), [0.5, 0.6], epsilon={"0": [math.inf, math.inf]}),
    ]
    folder = write_sweep(tmp_path / "sweep", trials)
    (folder / DICE_EPSILON_PNG).write_bytes(b"from an earlier build")

    md_path, _ = build_sweep_report(folder)

    text = md_path.read_text(encoding="utf-8")
    assert "The sweep has no completed trial with sample-level DP (finite ε): no plot." in text
    assert not (folder / DICE_EPSILON_PNG).exists() and (folder / DICE_ROUNDS_PNG).exists()
    assert "No trial failed." in text


def test_without_swept_seeds_each_trial_is_its_own_cell(tmp_path: Path) -> None:
    trials = [
        Trial("s0", swept("sample", 4, 150, None), [0.6], epsilon={"0": [3.0], "1": [4.0]}),
        Trial("s1", swept("sample", 8, 150, None), [0.7], epsilon={"0": [5.0], "1": [8.0]}, status="error"),
    ]
    folder = write_sweep(tmp_path / "sweep", trials, seed_key=None)

    table = cell_table(read_sweep_folder(folder))

    assert list(table["privacy.target-epsilon"]) == [4, 8] and "seed" not in table.columns
    assert list(table["n_expected"]) == [1, 1] and list(table["flag"]) == ["", "error"]
    assert table["epsilon_max"].iloc[0] == 4.0 and math.isnan(table["epsilon_max"].iloc[1])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("sweep.json", None, "sweep.json is missing"),
        ("trials.jsonl", None, "trials.jsonl is missing"),
        ("results.csv", None, "results.csv is missing"),
        ("sweep.json", "{not json", "sweep.json is not readable JSON"),
        ("sweep.json", '{"swept_keys": "seed", "trials": []}', "The 'swept_keys' entry of"),
        ("trials.jsonl", '{"trial": "a0"\n', "trials.jsonl, line 1: not a JSON object"),
        ("trials.jsonl", '{"trial": "zz", "swept": {}, "status": "completed"}\n', "'trial' must be one of"),
        ("results.csv", "trial,round,site,split,metric,value\n", "results.csv has missing column(s)"),
        ("results.csv", "", "results.csv is empty"),
    ],
)
def test_missing_or_garbled_file_is_one_sentence_naming_it(
    tmp_path: Path, name: str, content: str | None, message: str
) -> None:
    folder = privacy_sweep(tmp_path / "sweep")
    if content is None:
        (folder / name).unlink()
    else:
        (folder / name).write_text(content)

    with pytest.raises(SweepReportError, match=None) as caught:
        build_sweep_report(folder)

    assert message in str(caught.value) and str(folder / name) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_bad_value_in_results_names_the_line(tmp_path: Path) -> None:
    folder = privacy_sweep(tmp_path / "sweep")
    lines = (folder / "results.csv").read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",high"
    (folder / "results.csv").write_text("\n".join(lines) + "\n")

    with pytest.raises(SweepReportError) as caught:
        read_sweep_folder(folder)

    assert str(caught.value).startswith(f"{folder / 'results.csv'}, line 4: column 'value' must be a number")


def test_a_cell_run_with_fewer_seeds_on_purpose_is_not_short(tmp_path: Path) -> None:
    trials = [
        Trial("o0", swept("off", "none", 150, 0), [0.8]),
        Trial("s0", swept("sample", 8, 150, 0), [0.6], epsilon={"0": [7.0]}),
        Trial("s1", swept("sample", 8, 150, 1), [0.7], epsilon={"0": [7.5]}),
    ]
    folder = write_sweep(tmp_path / "sweep", trials)  # every trial of sweep.json has reported

    table = cell_table(read_sweep_folder(folder))

    assert list(table["n_expected"]) == [1, 2] and list(table["flag"]) == ["", ""]


def test_report_before_any_trial_reports(tmp_path: Path) -> None:
    folder = write_sweep(tmp_path / "sweep", [], unreported=("t0", "t1"))

    md_path, html_path = build_sweep_report(folder)

    text = md_path.read_text(encoding="utf-8")
    assert "**trials**: 2 (2 not reported); **cells**: 0" in text
    assert "No trial has reported yet." in text and "no learning curves" in text
    assert "t0 and t1" in text and "| t0 | – | – | – | – | not reported |" in text
    assert "No trial failed." in text  # not reported yet is not failed: they may be running
    assert not (folder / DICE_EPSILON_PNG).exists() and not (folder / DICE_ROUNDS_PNG).exists()
    assert cell_table(read_sweep_folder(folder)).empty


def test_a_retried_trial_counts_its_latest_attempt(tmp_path: Path) -> None:
    first = Trial("r0", swept("sample", 8, 150, 0), [0.2], epsilon={"0": [9.0]}, status="error", log=["boom"])
    run_dir = str(tmp_path / "sweep" / "trials" / "r0" / "run-2")  # the driver puts runs in the sweep folder
    latest = Trial("r0", swept("sample", 8, 150, 0), [0.6], epsilon={"0": [7.0]}, run_dir=run_dir)
    folder = write_sweep(tmp_path / "sweep", [first])
    with (folder / "trials.jsonl").open("a") as fh:
        fh.write(json.dumps(latest.record(0)) + "\n")
    with (folder / "results.csv").open("a", newline="") as fh:
        csv.writer(fh).writerows(latest.rows())

    cell = cell_table(read_sweep_folder(folder)).iloc[0]
    md_path, _ = build_sweep_report(folder)

    assert (cell["n_completed"], cell["n_failed"], cell["flag"]) == (1, 0, "")
    assert cell["dice_test_mean"] == 0.6 and cell["epsilon_max"] == 7.0
    text = md_path.read_text(encoding="utf-8")
    assert "| 0.600 | trials/r0/run-2 |" in text and "No trial failed." in text


def png_height(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[20:24], "big")  # the IHDR chunk


def test_a_swept_strategy_is_one_column_and_one_panel_each(tmp_path: Path) -> None:
    def trial(id: str, strategy: str, target: int, seed: int, dice: float, eps: float) -> Trial:
        values = {"strategy": strategy, "privacy.target-epsilon": target, "seed": seed}
        return Trial(id, values, [dice], epsilon={"0": [eps], "1": [eps / 2]})

    fedavg = [trial("a", "fedavg", 1, 0, 0.5, 1.0), trial("b", "fedavg", 8, 0, 0.7, 8.0)]
    fedprox = [trial("c", "fedprox", 1, 0, 0.4, 1.1), trial("d", "fedprox", 8, 0, 0.6, 7.9)]
    one = write_sweep(tmp_path / "one", fedavg)
    two = write_sweep(tmp_path / "two", fedavg + fedprox)

    table = cell_table(read_sweep_folder(two))
    build_sweep_report(one)
    build_sweep_report(two)

    assert list(table.columns).count("strategy") == 1
    assert list(table["strategy"]) == ["fedavg", "fedavg", "fedprox", "fedprox"]
    assert list(table["epsilon_max"]) == [1.0, 8.0, 1.1, 7.9]
    assert png_height(two / DICE_EPSILON_PNG) > 1.7 * png_height(one / DICE_EPSILON_PNG)
    assert png_height(two / DICE_ROUNDS_PNG) > 1.7 * png_height(one / DICE_ROUNDS_PNG)


def test_a_path_that_is_not_a_sweep_folder(tmp_path: Path) -> None:
    with pytest.raises(SweepReportError, match="does not exist"):
        read_sweep_folder(tmp_path / "nowhere")
