"""Reliability benchmark: the default run with unreliable hospitals (issue 7, README table).

Three real ``fedscan run``s through :func:`server.launcher.launch`, default config (4
hospitals, 30 rounds), sample-level DP at a per-hospital target of epsilon 8 so that every
hospital's budget is on the table:

1. reliable hospitals (the baseline);
2. 30% of hospitals crash in each round, after training (``faults.crash-rate=0.3``);
3. 30% of hospitals send a corrupt update in each round (NaN/Inf, wrong shape or dtype).

It prints one markdown table: did the run complete, final mean foreground Dice (hospitals'
test splits and the server's public set), replies rejected, and every hospital's epsilon.

    .venv/bin/python -m benchmarks.bench_reliability [--rounds 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from server.launcher import launch

ROOT = Path(__file__).resolve().parents[1]
PRIVATE = {"privacy.mode": "sample", "privacy.target-epsilon": 8.0}
SETTINGS = {
    "reliable": {},
    "30% crash": {"faults.crash-rate": 0.3},
    "30% corrupt": {"faults.corrupt-rate": 0.3},
}


def run_one(name: str, overrides: dict[str, Any], rounds: int, out: Path) -> dict[str, Any]:
    config = {**PRIVATE, **overrides, "num-server-rounds": rounds, "output-dir": str(out / name.replace(" ", "-").replace("%", ""))}
    result = launch(config, {"num-supernodes": 4, "client-resources-num-cpus": 1}, project=ROOT, stream=None)
    row: dict[str, Any] = {"setting": name, "completed": result.ok, "exit": result.exit_code, "wall_s": result.wall_s}
    if result.run_dir is None:
        return row
    metrics = pd.read_csv(result.run_dir / "metrics.csv", dtype={"site": str})
    last = metrics[metrics["round"] == metrics["round"].max()]
    dice = last[(last["site"] == "global") & (last["metric"] == "dice_mean")].set_index("split")["value"]
    failures = pd.read_csv(result.run_dir / "failures.csv")
    privacy = pd.read_csv(result.run_dir / "privacy.csv", dtype={"site": str})
    final = privacy.sort_values("round").groupby("site").last()
    row.update(
        rounds=int(metrics["round"].max()),
        dice_test=float(dice.get("test", float("nan"))),
        dice_public=float(dice.get("public", float("nan"))),
        rejected=failures.groupby("kind").size().to_dict(),
        epsilon={site: round(float(e), 4) for site, e in final["epsilon_rdp"].items()},
        trained_rounds={site: int(n) for site, n in privacy[privacy["participated"] == 1].groupby("site").size().items()},
        run_dir=str(result.run_dir),
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "outputs" / "bench-reliability"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = []
    for name, overrides in SETTINGS.items():
        print(f"bench_reliability: {name} ...", file=sys.stderr, flush=True)
        rows.append(run_one(name, overrides, args.rounds, Path(args.out)))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("| setting | completed | rounds | Dice (test) | Dice (public) | replies rejected | epsilon per hospital (RDP) | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        eps = ", ".join(f"{s}: {e:.3f}" for s, e in sorted(r.get("epsilon", {}).items()))
        rejected = ", ".join(f"{k} {v}" for k, v in sorted(r.get("rejected", {}).items())) or "0"
        print(f"| {r['setting']} | {'yes' if r['completed'] else 'no (exit ' + str(r['exit']) + ')'} | {r.get('rounds', '-')} "
              f"| {r.get('dice_test', float('nan')):.3f} | {r.get('dice_public', float('nan')):.3f} | {rejected} | {eps} "
              f"| {r['wall_s']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
