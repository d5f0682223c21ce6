"""Utility at epsilon 1, 3 and 8 (delta 1e-5, sample-level DP) next to the non-private run.

Each setting is one real launch (:func:`server.launcher.launch`, 4 hospitals) with the same world and training
config; only the privacy keys differ. Prints a Markdown table of the final mean Dice (and
per class) on the hospitals' test splits and the worst-case epsilon actually spent.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
COMMON = (
    "patients-per-hospital=600 batch-size=32 local-epochs=1 num-server-rounds=10 lr=0.002 "
    "privacy.pretrain-epochs=15 privacy.max-grad-norm=1.0 privacy.delta=1e-5"
)


def run(label: str, overrides: str, out: Path) -> dict[str, object]:
    from server.launcher import launch, parse_pairs

    config = parse_pairs([f"{COMMON} {overrides} output-dir='{out / label}' cache-dir='{ROOT / '.cache/fedscan'}'"],
                         "run config")
    result = launch(config, {"num-supernodes": 4}, project=ROOT)
    if not result.ok or result.run_dir is None:
        tail = "\n".join(result.log_tail[-60:])
        raise SystemExit(f"{label} failed: {result.status} (log: {result.superlink_log})\n{tail}")
    run_dir = result.run_dir
    metrics = pd.read_csv(run_dir / "metrics.csv", dtype={"site": str})
    last = metrics[(metrics["round"] == metrics["round"].max()) & (metrics["site"] == "global") & (metrics["split"] == "test")]
    row: dict[str, object] = {"setting": label, **{m: v for m, v in zip(last["metric"], last["value"], strict=True) if m.startswith("dice_")}}
    privacy = pd.read_csv(run_dir / "privacy.csv", dtype={"site": str})
    hospitals = privacy[(privacy["site"] != "client-level") & (privacy["round"] == privacy["round"].max())]
    row["epsilon_rdp_worst"] = float(hospitals["epsilon_rdp"].max())
    row["noise_multiplier"] = ", ".join(f"{v:.2f}" for v in sorted(hospitals["noise_multiplier"].unique()))
    row["run"] = str(run_dir)
    print(row, flush=True)
    return row


def pretrained_only(out: Path) -> dict[str, object]:
    """The public pre-training alone, evaluated like the runs: no hospital data used at all."""
    from flwr.common.config import parse_config_args

    from clients.hospital import Hospital
    from server.launcher import project_defaults
    from server.pretraining import pretrain_on_public_data
    from sims.anatomy import class_names
    from sims.config import config_from_run_config
    from sims.hospitals import make_federation
    from sims.model import make_model

    overrides = parse_config_args([COMMON])
    config = config_from_run_config({**project_defaults(ROOT), **overrides, "cache-dir": str(ROOT / ".cache/fedscan")})
    model = make_model(len(class_names(config.world.lesions)), config.train.unet_channels, seed=config.seed)
    pretrain_on_public_data(model, config)
    scores = [Hospital(config, spec).evaluate(model, "test") for spec in make_federation(config.world, 4)]
    n = sum(c for _, c in scores)
    row: dict[str, object] = {"setting": "public pre-training only", "epsilon_rdp_worst": 0.0, "noise_multiplier": "-"}
    row.update({k: sum(s[k] * c for s, c in scores) / n for k in scores[0][0]})
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "outputs" / "privacy-utility"))
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--only-pretrained", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dp", default="privacy.dp-layers='head'", help="extra overrides for the DP runs")
    args = parser.parse_args()
    out = Path(args.out)
    if args.only_pretrained:
        pretrained_only(out)
        return
    rows = [run("non-private", "privacy.mode='off'", out), pretrained_only(out)]
    for eps in args.epsilons:
        rows.append(run(f"epsilon-{eps:g}", f"privacy.mode='sample' privacy.target-epsilon={eps} {args.dp}", out))
    table = pd.DataFrame(rows)
    base = float(table.loc[0, "dice_mean"])
    table["gap_to_non_private"] = base - table["dice_mean"]
    cols = ["setting", "epsilon_rdp_worst", "noise_multiplier", "dice_mean", "gap_to_non_private"]
    cols += sorted(c for c in table.columns if c.startswith("dice_") and c != "dice_mean")
    print(f"\ncommon config: {COMMON}; DP runs add: {args.dp}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for _, r in table[cols].iterrows():
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in r]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
