"""The Flower ServerApp: a thin adapter that wires config, strategy and run outputs."""

from __future__ import annotations

import random
import time
from dataclasses import asdict
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server.checkpointing import ServerCheckpointer, key_root, server_keyring, source_key_root
from server.driver import run_rounds
from server.evaluation import GlobalEvaluator
from server.failures import FailureLog
from server.outputs import RunOutputs
from server.preflight import preflight
from server.pretraining import pretrain_on_public_data
from server.privacy_log import PrivacyLog
from server.scenario_phase import ScenarioPhase
from server.shift import ShiftCoordinator
from server.site_metrics import SiteMetrics
from server.strategies import make_strategy
from sims.anatomy import class_names
from sims.config import config_from_run_config, privacy_warnings
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
    resume = preflight(config, num_hospitals)  # the verified checkpoint to resume from, if any
    shift = ShiftCoordinator(config, num_hospitals)
    specs = shift.specs
    outputs = RunOutputs.create(config.output_dir, f"run{context.run_id}")
    outputs.write_config(
        config.to_dict(),
        seed=config.seed,
        num_hospitals=num_hospitals,
        flower_run_id=context.run_id,
        config_hash=config.config_hash(num_hospitals),
        resumed_from=str(resume.source_run_dir) if resume else None,
        hospitals=[asdict(s) for s in specs],
        roles=shift.role_records(),
    )
    log(INFO, "fedscan: %d hospitals, outputs in %s", num_hospitals, outputs.run_dir)
    for note in privacy_warnings(config):
        log(WARNING, "fedscan: %s", note)

    classes = class_names(config.world.lesions)
    model = make_model(len(classes), config.train.unet_channels, seed=config.seed, norm=config.train.norm)
    if config.privacy.pretrain_epochs and resume is None:
        loss = pretrain_on_public_data(model, config)
        log(INFO, "fedscan: pre-trained %d epochs on public data (template slices, no patient; loss %.4f)",
            config.privacy.pretrain_epochs, loss)
    privacy_log = PrivacyLog(
        outputs.run_dir, config.privacy, shift.num_trainers, num_rounds=config.train.num_server_rounds
    )
    site_metrics = SiteMetrics(outputs.add, privacy_log.add_round)
    strategy = make_strategy(
        config.train, shift.strategy_hospitals, site_metrics, config.privacy, pool_trainer=shift.train_pooled
    )
    evaluator = GlobalEvaluator(
        config, make_model(len(classes), config.train.unet_channels, norm=config.train.norm), outputs.add
    )
    shift.attach(strategy, site_metrics, outputs.add, resumed=resume is not None, run_dir=outputs.run_dir)
    scenario_phase = ScenarioPhase(
        config, outputs.run_dir, outputs.add, trainers=list(shift.trainers), evaluators=[r.site for r in shift.roles]
    )


    # Keys: this run's own (configured, or run-local in its folder); a resume reads the
    # source run's with the source run's keys (see server/checkpointing.py).
    checkpointer = None
    if config.checkpoint.every:
        checkpointer = ServerCheckpointer(
            config, outputs.run_dir, str(context.run_id), server_keyring(config, outputs.run_dir), num_hospitals
        )
    failures = FailureLog(outputs.run_dir)
    arrays = ArrayRecord(model.state_dict())
    template = {k: v.numpy() for k, v in arrays.items()}
    first_round = 1
    if resume is not None:
        outputs.add(resume.metric_rows)
        privacy_log.restore(resume.privacy_rows, resume.client_events)
        failures.restore(resume.failure_rows)
        resume.restore(strategy)
        arrays, first_round = resume.arrays, resume.round + 1
        log(INFO, "fedscan: resuming after round %d from %s", resume.round, resume.source_run_dir)
    base_config: dict[str, str | int | float] = {
        "run-dir": str(outputs.run_dir) if checkpointer is not None else "",
        "key-root": str(key_root(config, outputs.run_dir)),
        "key-create": int(not config.checkpoint.keyring),
        "resume-dir": str(resume.source_run_dir) if resume else "",
        "resume-key-root": str(source_key_root(config, resume.source_run_dir)) if resume else "",
        "resume-round": resume.round if resume else 0,
        "kept-rounds": "",
        "summaries": int(shift.wants_summaries),
    }

    def round_config(server_round: int) -> dict[str, str | int | float | list[float]]:
        kept = checkpointer.kept_rounds() if checkpointer is not None else []
        return {**base_config, "kept-rounds": ",".join(map(str, kept)), **shift.round_config()}

    def after_round(server_round: int, current: ArrayRecord) -> None:
        if checkpointer is not None and checkpointer.due(server_round):
            checkpointer.save(
                server_round, current, strategy, outputs.rows, privacy_log.rows, privacy_log.client_events,
                failures.rows,
            )

    started = time.monotonic()
    run_rounds(
        strategy,
        grid,
        arrays,
        template=template,
        first_round=first_round,
        num_rounds=config.train.num_server_rounds,
        seed=config.seed,
        num_hospitals=num_hospitals,
        evaluate_fn=evaluator,
        after_round=after_round,
        failure_sink=failures.add,
        round_config=round_config,
        roll_call_config=base_config,
        round_timeout=config.faults.round_timeout,
        min_available=config.faults.min_available,
        stop_after=config.checkpoint.stop_after,
        before_round=privacy_log.before_round,
        train_sites=shift.train_sites,
        evaluate_sites=shift.evaluate_sites,
        after_evaluate=shift.after_evaluate,
        on_roll_call=shift.on_roll_call,
        message_sink=outputs.log_messages,
        after_last=scenario_phase.run,
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
            "replies rejected (failures.csv)": failures.summary(),
            "training wall time (s)": f"{time.monotonic() - started:.1f}",
        },
    )
    from privacy.report import build_report  # matplotlib, only at the end

    build_report(outputs.run_dir)
    log(INFO, "fedscan: summary and privacy report written to %s", outputs.run_dir)
