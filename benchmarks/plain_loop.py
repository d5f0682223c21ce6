"""The baseline: the same FedAvg optimizer steps on the same data, in one plain process.

Every hospital's local round runs :func:`sims.training.train_one_round` with the
same generator the ClientApp uses, the weights are averaged by patient count as FedAvg
does, and the same evaluations run (each hospital's test split, the server's public set). No
Flower, no Ray, no processes: what is left is the cost of the maths itself.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from clients.hospital import Hospital
from server.launcher import project_defaults
from sims.anatomy import class_names
from sims.config import FedscanConfig, config_from_run_config
from sims.evaluation import evaluate_segmentation
from sims.hospitals import load_public_eval, make_federation
from sims.model import make_model

ROOT = Path(__file__).resolve().parents[1]


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    return {k: torch.stack([s[k] * (w / total) for s, w in zip(states, weights, strict=True)]).sum(0) for k in states[0]}


def run_plain(config: FedscanConfig, num_hospitals: int, *, evaluate: bool = True) -> dict[str, object]:
    """Run ``num_server_rounds`` of FedAvg in-process; return timings and final Dice."""
    hospitals = [Hospital(config, spec) for spec in make_federation(config.world, num_hospitals)]
    classes = class_names(config.world.lesions)
    for h in hospitals:  # data generation / cache reads are not training cost
        h.data("train")
    public = load_public_eval(config.world)
    model = make_model(len(classes), config.train.unet_channels, seed=config.seed)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    round_times: list[float] = []
    history: list[dict[str, float]] = []
    for server_round in range(1, config.train.num_server_rounds + 1):
        t0 = time.perf_counter()
        states, weights = [], []
        for h in hospitals:
            local = h.new_model()
            local.load_state_dict(global_state)
            result = h.train(local, server_round, proximal_mu=0.0)
            states.append({k: v.detach().clone() for k, v in local.state_dict().items()})
            weights.append(result.num_examples)
        global_state = fedavg(states, weights)
        scores: dict[str, float] = {}
        if evaluate:
            model.load_state_dict(global_state)
            per_site = [h.evaluate(model, "test") for h in hospitals]
            n = sum(c for _, c in per_site)
            scores = {k: sum(s[k] * c for s, c in per_site) / n for k in per_site[0][0]}
            public_scores = evaluate_segmentation(model, *public, classes)
            scores.update({f"public_{k}": v for k, v in public_scores.items()})
        round_times.append(time.perf_counter() - t0)
        history.append({"round": server_round, "seconds": round_times[-1], **scores})
        print(json.dumps(history[-1]), flush=True)
    return {"round_seconds": round_times, "history": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hospitals", type=int, default=4)
    parser.add_argument("-c", "--run-config", action="append", default=[])
    args = parser.parse_args()
    from flwr.common.config import parse_config_args

    overrides = parse_config_args(args.run_config) if args.run_config else {}
    config = config_from_run_config({**project_defaults(ROOT), "cache-dir": str(ROOT / ".cache/fedscan"), **overrides})
    run_plain(config, args.hospitals)


if __name__ == "__main__":
    main()
