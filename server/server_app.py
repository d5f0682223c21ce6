"""The Flower ServerApp: a thin adapter that wires config, strategy and run outputs."""

from __future__ import annotations

import random
import time
from dataclasses import asdict
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server.checkpointing import RUN_LOCAL_KEYS, ServerCheckpointer, load_resume, server_keyring_at
from server.driver import run_rounds
from server.evaluation import GlobalEvaluator
from server.outputs import RunOutputs
from server.pretraining import pretrain_on_public_data
from server.privacy_log import PrivacyLog
from server.site_metrics import SiteMetrics
from server.strategies import make_strategy
from sims.anatomy import class_names
from sims.config import config_from_run_config, privacy_warnings
from sims.hospitals import make_federation
from sims.model import make_model
from sims.seeding import derive_seed

app = ServerApp()


def _wait_for_hospitals(grid: Grid, timeout: float = 60.0) -> int:
    """Number of connected SuperNodes, once it has stopped changing."""
    deadline = time.monotonic() + timeout
    previous, stable_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = len(list(grid.get_node_ids()))
        if count != previous:
            previous, stable_since = count, time.monotonic()
        elif count > 0 and time.monotonic() - stable_since > 0.2:
            return count
        time.sleep(0.1)
    if previous <= 0:
        raise RuntimeError("No hospitals connected: the federation needs num-supernodes >= 1.")
    return previous


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = config_from_run_config(context.run_config)
    # Flower draws client sampling from `random` and DP-FedAvg noise from NumPy's global
    # RNG; seed both from the run's seed so a run is reproducible (and resumable exactly).
    random.seed(derive_seed(config.seed, "server", "python-random"))
    np.random.seed(derive_seed(config.seed, "server", "numpy-global") % 2**32)
    num_hospitals = _wait_for_hospitals(grid)
    if config.privacy.sample_level:
        from server.privacy_plan import check_privacy_plan  # Opacus, only when needed

        check_privacy_plan(config, num_hospitals)
    resume = load_resume(config) if config.checkpoint.resume_from else None
    specs = make_federation(config.world, num_hospitals)
    outputs = RunOutputs.create(config.output_dir, f"run{context.run_id}")
    outputs.write_config(
        config.to_dict(),
        seed=config.seed,
        num_hospitals=num_hospitals,
        flower_run_id=context.run_id,
        config_hash=config.config_hash(),
        resumed_from=str(resume.source_run_dir) if resume else None,
        hospitals=[asdict(s) for s in specs],
    )
    log(INFO, "fedscan: %d hospitals, outputs in %s", num_hospitals, outputs.run_dir)
    for note in privacy_warnings(config):
        log(WARNING, "fedscan: %s", note)

    classes = class_names(config.world.lesions)
    model = make_model(len(classes), config.train.unet_channels, seed=config.seed)
    if config.privacy.pretrain_epochs and resume is None:
        loss = pretrain_on_public_data(model, config)
        log(INFO, "fedscan: pre-trained %d epochs on public data (template slices, no patient; loss %.4f)",
            config.privacy.pretrain_epochs, loss)
    privacy_log = PrivacyLog(outputs.run_dir, config.privacy, num_hospitals)
    strategy = make_strategy(
        config.train, num_hospitals, SiteMetrics(outputs.add, privacy_log.add_round), config.privacy
    )
    evaluator = GlobalEvaluator(config, make_model(len(classes), config.train.unet_channels), outputs.add)

    # Keys: the configured keyring, else the run-local one of the run this one continues.
    key_root = Path(config.checkpoint.keyring) if config.checkpoint.keyring else (
        (resume.source_run_dir if resume else outputs.run_dir) / RUN_LOCAL_KEYS
    )
    checkpointer = None
    if config.checkpoint.every:
        checkpointer = ServerCheckpointer(config, outputs.run_dir, str(context.run_id), server_keyring_at(key_root))
    arrays = ArrayRecord(model.state_dict())
    first_round = 1
    if resume is not None:
        outputs.add(resume.metric_rows)
        privacy_log.restore(resume.privacy_rows, resume.client_events)
        resume.restore(strategy)
        arrays, first_round = resume.arrays, resume.round + 1
        log(INFO, "fedscan: resuming after round %d from %s", resume.round, resume.source_run_dir)
    round_config: dict[str, str | int] = {
        "run-dir": str(outputs.run_dir),
        "key-root": str(key_root),
        "resume-dir": str(resume.source_run_dir) if resume else "",
        "resume-round": resume.round if resume else 0,
    }

    def after_round(server_round: int, current: ArrayRecord) -> None:
        if checkpointer is not None and checkpointer.due(server_round, config.train.num_server_rounds):
            checkpointer.save(
                server_round, current, strategy, outputs.rows, privacy_log.rows, privacy_log.client_events
            )

    started = time.monotonic()
    run_rounds(
        strategy,
        grid,
        arrays,
        first_round=first_round,
        num_rounds=config.train.num_server_rounds,
        evaluate_fn=evaluator,
        after_round=after_round,
        round_config=round_config,
        stop_after=config.checkpoint.stop_after,
    )
    outputs.write_summary(
        "fedscan run summary",
        {
            "run folder": outputs.run_dir.name,
            "hospitals": num_hospitals,
            "strategy": config.train.strategy,
            "privacy": config.privacy.mode,
            "rounds": config.train.num_server_rounds,
            "seed": config.seed,
            "classes": ", ".join(classes[1:]),
            "resumed from": str(resume.source_run_dir) if resume else "-",
            "training wall time (s)": f"{time.monotonic() - started:.1f}",
        },
    )
    from privacy.report import build_report  # matplotlib, only at the end

    build_report(outputs.run_dir)
    log(INFO, "fedscan: summary and privacy report written to %s", outputs.run_dir)
