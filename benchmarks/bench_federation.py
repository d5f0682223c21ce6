"""Benchmark: the default federated simulation against the plain in-process loop.

Runs, in this order and in one invocation (so both see the same machine load):

1. warms the data cache (generation is reported separately, it is not training);
2. ``fedscan run`` (default config, 4 hospitals) as a subprocess, sampling the summed
   resident memory of its whole process tree (CLI, SuperLink, ServerApp, simulation
   engine, Ray and its workers) every 0.2 s and time-stamping every streamed log line.
   It is the user's command, a thin layer over :func:`server.launcher.launch`, timed from
   outside so start-up includes the CLI's own; the launcher makes itself a child subreaper,
   so processes whose parent exits (Ray's) stay in the tree being measured;
3. the plain loop (:mod:`benchmarks.plain_loop`): the same optimizer steps on the same
   data in one process, with the same evaluations.

It prints a Markdown table: wall time, per-round cost of both, the overhead ratio
(federated seconds per round / plain seconds per round), the fixed start-up seconds
(launch until rounds run at steady speed) and teardown (last round until the command
exits), peak memory, and final
Dice of both (they should agree: same steps, same data, same seeds).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from common.sampling import TreeMemory

ROOT = Path(__file__).resolve().parents[1]
ROUND_LINE = re.compile(r"\[ROUND (\d+)/(\d+)\]")
FINISHED_LINE = re.compile(r"Strategy execution finished")


def run_federated(hospitals: int, overrides: list[str]) -> dict[str, Any]:
    command = [str(Path(sys.executable).parent / "fedscan"), "run", "--hospitals", str(hospitals)]
    for item in overrides:
        command += ["-c", item]
    start = time.monotonic()
    round_starts: dict[int, float] = {}
    finished = None
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log_lines = []
    with TreeMemory(proc.pid) as memory:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.monotonic() - start
            log_lines.append(line)
            if m := ROUND_LINE.search(line):
                round_starts.setdefault(int(m.group(1)), now)
            elif FINISHED_LINE.search(line):
                finished = now
        code = proc.wait()
    wall = time.monotonic() - start
    if code != 0 or finished is None or not round_starts:
        sys.stdout.write("".join(log_lines[-60:]))
        raise SystemExit(f"federated run failed (exit {code})")
    marks = [round_starts[r] for r in sorted(round_starts)] + [finished]
    per_round = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    steady = statistics.median(per_round[1:]) if len(per_round) > 1 else per_round[0]
    run_dir = (ROOT / "outputs" / "latest").resolve()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    last = metrics[(metrics["round"] == metrics["round"].max()) & (metrics["site"] == "global")]
    dice = last[(last["split"] == "test") & (last["metric"] == "dice_mean")]["value"].iloc[0]
    public = last[(last["split"] == "public") & (last["metric"] == "dice_mean")]["value"].iloc[0]
    return {
        "wall": wall,
        "rounds": len(per_round),
        "first_round": per_round[0],
        "steady_round": steady,
        "fixed": wall - len(per_round) * steady,
        # launch -> round 1 starts, plus round 1's extra over a steady round (Ray start,
        # ClientApp imports, data loading in the hospitals)
        "startup": marks[0] + (per_round[0] - steady),
        "teardown": wall - finished,
        "peak_rss_gb": memory.peak / 1e9,
        "peak_pss_gb": memory.peak_pss / 1e9,
        "dice_test": float(dice),
        "dice_public": float(public),
        "run_dir": str(run_dir),
    }


def run_plain_subprocess(hospitals: int, overrides: list[str]) -> dict[str, float]:
    command = [sys.executable, "-m", "benchmarks.plain_loop", "--hospitals", str(hospitals)]
    for item in overrides:
        command += ["-c", item]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    history = []
    with TreeMemory(proc.pid) as memory:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                history.append(json.loads(line))
        if proc.wait() != 0:
            raise SystemExit("plain loop failed")
    seconds = [h["seconds"] for h in history]
    return {
        "rounds": len(seconds),
        "total": sum(seconds),
        "steady_round": statistics.median(seconds),
        "peak_rss_gb": memory.peak / 1e9,
        "peak_pss_gb": memory.peak_pss / 1e9,
        "dice_test": history[-1]["dice_mean"],
        "dice_public": history[-1]["public_dice_mean"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, default=4)
    parser.add_argument("-c", "--run-config", action="append", default=[], help="overrides, as for fedscan run")
    args = parser.parse_args()

    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "benchmarks.plain_loop", "--hospitals", str(args.hospitals), "-c", "num-server-rounds=1"],
        cwd=ROOT,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    warm = time.monotonic() - t0
    fed = run_federated(args.hospitals, args.run_config)
    plain = run_plain_subprocess(args.hospitals, args.run_config)

    rows = [
        ("rounds", f"{fed['rounds']}", f"{plain['rounds']}"),
        ("wall time, whole run (s)", f"{fed['wall']:.1f}", f"{plain['total']:.1f} (rounds only)"),
        ("first round (s)", f"{fed['first_round']:.2f}", ""),
        ("steady round (s, median)", f"{fed['steady_round']:.2f}", f"{plain['steady_round']:.2f}"),
        ("overhead ratio (fed/plain per round)", f"{fed['steady_round'] / plain['steady_round']:.2f}", "1.00"),
        ("fixed start-up (s): launch to steady rounds", f"{fed['startup']:.1f}", ""),
        ("fixed teardown (s): last round to exit", f"{fed['teardown']:.1f}", ""),
        ("fixed cost in all (s): wall - rounds x steady round", f"{fed['fixed']:.1f}", ""),
        ("peak memory, all processes, summed RSS (GB)", f"{fed['peak_rss_gb']:.2f}", f"{plain['peak_rss_gb']:.2f}"),
        ("peak memory, all processes, summed PSS (GB)", f"{fed['peak_pss_gb']:.2f}", f"{plain['peak_pss_gb']:.2f}"),
        ("final mean foreground Dice, hospitals' test", f"{fed['dice_test']:.4f}", f"{plain['dice_test']:.4f}"),
        ("final mean foreground Dice, server public set", f"{fed['dice_public']:.4f}", f"{plain['dice_public']:.4f}"),
    ]
    print(f"\ndata cache warm-up (not counted): {warm:.1f} s; run folder: {fed['run_dir']}\n")
    print("| measure | federated (`fedscan run`) | plain loop |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
