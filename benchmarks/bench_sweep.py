"""Benchmark: what the sweep runner costs, and what running trials side by side gains.

In one invocation (so every measurement sees the same machine load):

1. **Runner overhead**: N short trials as ``fedscan sweep --max-parallel 1`` against the same
   N ``fedscan run`` commands one after the other. Target: at most 1.05x the wall time.
2. **Parallel efficiency**: 4 short trials, each limited to 1 CPU (``cpus-per-trial = 1``:
   Flower's Ray gets one CPU, hospitals train one at a time), ``--max-parallel 2`` against
   ``--max-parallel 1``. Target: a speedup of at least 1.5x on 2 cores. Also the peak memory
   of each trial (its whole process tree, summed RSS, sampled by the trial itself) and of
   everything at once (the driver's tree: private Ray, workers, every trial's processes).

Every command is timed from outside, as a user runs it. The data cache is warmed first.
Prints a Markdown table and writes ``outputs/bench/bench_sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common.sampling import TreeMemory

ROOT = Path(__file__).resolve().parents[1]
FEDSCAN = str(Path(sys.executable).parent / "fedscan")
SHORT = {"num-server-rounds": 2, "image-size": 32, "unet-channels": "8,16", "patients-per-hospital": 20,
         "holdout-per-hospital": 4, "server-eval-patients": 8}


def _toml(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def sweep_file(folder: Path, name: str, seeds: list[int], cache: Path, cpus_per_trial: int = 0) -> Path:
    lines = [f'[sweep]\nname = "{name}"\noutput-dir = "{folder}"\ntimeout = 600\ncpus-per-trial = {cpus_per_trial}',
             "[run-config]", *(f"{k} = {_toml(v)}" for k, v in SHORT.items()), f'cache-dir = "{cache}"',
             "[federation-config]\nnum-supernodes = 2", f"[grid]\nseed = {seeds}"]
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def timed(command: list[str]) -> tuple[float, int, str]:
    """Wall seconds, summed-RSS peak of the command's whole tree (bytes), and its output."""
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeMemory(proc.pid, interval=0.5) as memory:
        out, _ = proc.communicate()
    wall = time.monotonic() - start
    if proc.returncode != 0:
        sys.stdout.write(out[-4000:])
        raise SystemExit(f"{' '.join(command[:3])} failed (exit {proc.returncode})")
    return wall, memory.peak, out


def trial_peaks(folder: Path) -> list[float]:
    return [json.loads(line)["peak_rss_bytes"] / 1e9 for line in (folder / "trials.jsonl").open()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3, help="N for the overhead comparison (default 3)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-", dir=ROOT / "outputs" if (ROOT / "outputs").is_dir() else None))
    cache = work / "cache"
    run_config = " ".join(f"{k}={_toml(v)}" for k, v in SHORT.items())

    def plain(seed: int) -> list[str]:
        return [FEDSCAN, "run", "--hospitals", "2", "-c",
                f"{run_config} seed={seed} cache-dir='{cache}' output-dir='{work / 'plain'}'"]

    timed(plain(99))  # warm the data cache (and the OS's file cache) for everything below
    seeds = list(range(args.trials))
    sequential = [timed(plain(seed))[0] for seed in seeds]
    one_by_one, _, _ = timed([FEDSCAN, "sweep", str(sweep_file(work, "overhead", seeds, cache)), "--max-parallel", "1"])

    four = list(range(10, 14))
    serial, serial_peak, _ = timed([FEDSCAN, "sweep", str(sweep_file(work, "p1", four, cache, 1)), "--max-parallel", "1"])
    parallel, parallel_peak, _ = timed([FEDSCAN, "sweep", str(sweep_file(work, "p2", four, cache, 1)),
                                        "--max-parallel", "2"])
    result = {
        "trials": args.trials,
        "sequential_runs_s": sum(sequential),
        "sweep_max_parallel_1_s": one_by_one,
        "overhead_ratio": one_by_one / sum(sequential),
        "four_trials_max_parallel_1_s": serial,
        "four_trials_max_parallel_2_s": parallel,
        "speedup": serial / parallel,
        "peak_per_trial_gb_parallel_2": trial_peaks(work / "p2"),
        "peak_all_gb_parallel_1": serial_peak / 1e9,
        "peak_all_gb_parallel_2": parallel_peak / 1e9,
        "work": str(work),
    }
    out = ROOT / "outputs" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    per_trial = ", ".join(f"{p:.2f}" for p in result["peak_per_trial_gb_parallel_2"])
    rows = [
        (f"{args.trials} x `fedscan run`, one after the other (s)", f"{sum(sequential):.1f}", ""),
        (f"`fedscan sweep --max-parallel 1`, the same {args.trials} trials (s)", f"{one_by_one:.1f}",
         f"ratio {result['overhead_ratio']:.3f} (target <= 1.05)"),
        ("4 trials, 1 CPU each, `--max-parallel 1` (s)", f"{serial:.1f}", ""),
        ("4 trials, 1 CPU each, `--max-parallel 2` (s)", f"{parallel:.1f}",
         f"speedup {result['speedup']:.2f}x (target >= 1.5x)"),
        ("peak memory per trial, summed RSS (GB), `--max-parallel 2`", per_trial, ""),
        ("peak memory of everything, summed RSS (GB): parallel 1 / parallel 2",
         f"{result['peak_all_gb_parallel_1']:.2f} / {result['peak_all_gb_parallel_2']:.2f}", ""),
    ]
    print("\n| measure | value | note |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nwork folder: {work}")


if __name__ == "__main__":
    main()
