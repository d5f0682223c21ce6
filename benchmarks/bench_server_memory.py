"""Benchmark: the server's peak memory does not grow with the number of hospitals.

Runs ``fedscan run`` twice, as subprocesses of this script — a small federation
(``--small``, default 4 hospitals) and a large one (``--large``, default 200) — with the
same number of hospitals sampled each round (``--per-round``, default 4), ``--rounds``
rounds (default 3), the default model and image size (96), and ``patients-per-hospital``
20 (``--patients``) so the few sampled hospitals make their data quickly: the server holds
no hospital's data, so cohort size does not touch what is measured.

What is measured: the resident memory (RSS) of the process that hosts the ServerApp,
sampled every 0.2 s with psutil. With ``fedscan run`` (a SuperLink in simulation mode,
``--isolation subprocess``) there is no ``flwr-serverapp`` process: the SuperLink starts one
``flwr-simulation`` process which runs the ServerApp (in a thread) *and* the simulation
engine's Ray driver; the hospitals' ClientApps run in Ray worker processes, which are not
counted. So the figure is that ``flwr-simulation`` process's RSS (a ``flwr-serverapp``
process is measured instead if one appears, e.g. under a deployment-mode SuperLink).

Target: the large federation's peak within 10% of the small one's.

``--project`` runs another checkout of fedscan (e.g. ``git worktree add /tmp/before REV``
to measure code from before a change); ``--legacy-sampling`` samples hospitals with
``privacy.mode='client' privacy.clients-per-round=N privacy.client-noise-multiplier=0`` for
code that predates the ``clients-per-round`` key (client-level DP with zero noise: same
sampling, uniform weights, nothing else that changes server memory).

Usage::

    .venv/bin/python -m benchmarks.bench_server_memory [--small 4 --large 200 --per-round 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from common.sampling import PeriodicSampler

ROOT = Path(__file__).resolve().parents[1]
FEDSCAN = Path(sys.executable).parent / "fedscan"
SERVER_HOSTS = ("flwr-serverapp", "flwr-simulation")


class ServerMemory(PeriodicSampler):
    """Peak RSS of the ServerApp's host process among the descendants of ``pid``."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(interval)
        self.pid = pid
        self.peak = 0
        self.host = ""
        self.samples = 0
        self._proc: psutil.Process | None = None

    def _host(self) -> psutil.Process | None:
        try:
            tree = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        found: dict[str, psutil.Process] = {}
        for proc in tree:
            try:
                cmd = " ".join(proc.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for name in SERVER_HOSTS:
                # The executable itself, not a process that merely mentions it in its arguments.
                if Path(cmd.split(" ")[0]).name == name or f"/{name} " in f"{cmd} ":
                    found.setdefault(name, proc)
        for name in SERVER_HOSTS:  # a dedicated ServerApp process wins over the simulation host
            if name in found:
                self.host = name
                return found[name]
        return None

    def sample(self) -> bool:
        if self._proc is None or not self._proc.is_running():
            self._proc = self._host()
        if self._proc is not None:
            try:
                self.peak = max(self.peak, self._proc.memory_info().rss)
                self.samples += 1
            except psutil.NoSuchProcess:
                self._proc = None
        return True


def run_once(project: Path, hospitals: int, args: argparse.Namespace, work: Path) -> dict[str, object]:
    """One ``fedscan run``; returns the server's peak RSS and what the run recorded."""
    out = work / f"h{hospitals}"
    overrides = [
        f"num-server-rounds={args.rounds}",
        f"patients-per-hospital={args.patients}",
        f"output-dir='{out / 'outputs'}'",
        f"cache-dir='{out / 'cache'}'",
        "checkpoint.every=0",
    ]
    if args.legacy_sampling:
        overrides += [
            "privacy.mode='client'",
            f"privacy.clients-per-round={args.per_round}",
            "privacy.client-noise-multiplier=0.0",
        ]
    else:
        overrides.append(f"clients-per-round={args.per_round}")
    command = [str(FEDSCAN), "run", str(project), "--hospitals", str(hospitals), "-c", " ".join(overrides)]
    log = out / "fedscan.log"
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log.open("w") as fh:
        process = subprocess.Popen(command, cwd=project, stdout=fh, stderr=subprocess.STDOUT)
        with ServerMemory(process.pid) as memory:
            code = process.wait()
    wall = time.monotonic() - started
    if code != 0:
        raise SystemExit(f"fedscan run --hospitals {hospitals} failed (exit {code}); see {log}")
    run_dir = (out / "outputs" / "latest").resolve()
    import pandas as pd

    metrics = pd.read_csv(run_dir / "metrics.csv", dtype={"site": str})
    steps = metrics[(metrics["split"] == "train") & (metrics["metric"] == "steps")]
    trained = steps[steps["site"] != "global"]
    server = metrics[(metrics["site"] == "global") & ~metrics["split"].isin(["train", "test"])]
    return {
        "hospitals": hospitals,
        "server_host": memory.host,
        "samples": memory.samples,
        "peak_rss_mb": memory.peak / 2**20,
        "wall_s": wall,
        "trained_per_round": sorted(set(trained.groupby("round")["site"].nunique())),
        "server_split": sorted(set(server["split"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=ROOT, help="fedscan checkout to run (default: this)")
    parser.add_argument("--small", type=int, default=4)
    parser.add_argument("--large", type=int, default=200)
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--legacy-sampling", action="store_true", help="sample via privacy.clients-per-round")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fedscan-bench-mem-") as tmp:
        results = [run_once(args.project.resolve(), n, args, Path(tmp)) for n in (args.small, args.large)]
    small, large = results
    ratio = large["peak_rss_mb"] / small["peak_rss_mb"]  # type: ignore[operator]
    print("| hospitals | sampled per round | server host | peak RSS (MB) | wall (s) | trained/round |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['hospitals']} | {args.per_round} | `{r['server_host']}` | {r['peak_rss_mb']:.0f} | "
            f"{r['wall_s']:.1f} | {r['trained_per_round']} |"
        )
    print(f"\nlarge / small peak = {ratio:.3f} (target <= 1.10); server split(s): {large['server_split']}")
    if args.json is not None:
        args.json.write_text(json.dumps({"results": results, "ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
