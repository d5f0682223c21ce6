"""Benchmark: one DP-SGD step against one non-private step, same model, same batch size.

For the default model (MONAI UNet 16-32-64-128, instance norm, PReLU) and image size (96),
each variant runs in its own subprocess (so peak memory is its own): a few warm-up steps,
then timed steps. Non-private: Adam on a batch of ``B``. DP-SGD: Opacus hooks (per-sample
gradients), per-sample clipping and noise, Adam, Poisson batches of expected size ``B``
(:func:`privacy.dpsgd.train_dp_round`). Prints a Markdown table with the time ratio.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _one(variant: str, batch: int, size: int, steps: int) -> dict[str, float]:
    import torch

    from privacy.dpsgd import train_dp_round
    from sims.model import make_model
    from sims.training import make_loss

    n = 200
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, size, size, generator=gen)
    y = torch.randint(0, 5, (n, 1, size, size), generator=gen)
    model = make_model(5, seed=0)
    loss_fn = make_loss()
    if variant == "plain":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def run(k: int) -> None:
            for _ in range(k):
                idx = torch.randperm(n, generator=gen)[:batch]
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()

    else:

        def run(k: int) -> None:
            train_dp_round(
                model, x, y, loss_fn=loss_fn, steps=k, sample_rate=batch / n, noise_multiplier=1.0,
                max_grad_norm=1.0, lr=1e-3, generator=gen,
            )

    run(3)
    start = time.perf_counter()
    run(steps)
    seconds = (time.perf_counter() - start) / steps
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_ms": seconds * 1000, "peak_mb": peak_mb, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_one(args.one[0], int(args.one[1]), args.image_size, args.steps)))
        return
    print("| batch | non-private step (ms) | DP-SGD step (ms) | time ratio | peak RSS non-private (MB) | peak RSS DP (MB) |")
    print("|---|---|---|---|---|---|")
    for batch in args.batch:
        res = {}
        for variant in ("plain", "dp"):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_dp", "--one", variant, str(batch),
                 "--image-size", str(args.image_size), "--steps", str(args.steps)],
                cwd=ROOT, capture_output=True, text=True, check=True,
            )
            res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        p, d = res["plain"], res["dp"]
        print(
            f"| {batch} | {p['step_ms']:.0f} | {d['step_ms']:.0f} | {d['step_ms'] / p['step_ms']:.2f} "
            f"| {p['peak_mb']:.0f} | {d['peak_mb']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
