"""The Flower ClientApp: a thin adapter from Messages to :class:`clients.hospital.Hospital`.

State that outlives a round lives in ``context.state`` (the ClientApp object is rebuilt
for every message): the hospital's privacy ledger (``privacy-ledger``) and its round
bookkeeping (``hospital-status``). Whenever it changes, the hospital also writes it to
disk, encrypted with its own key (:mod:`clients.hospital_state`), so a run can resume.

Simulated faults (``faults.*``) are injected here, by the hospital itself, after its state
is saved: a hospital that trained with DP-SGD and then crashed has spent that budget.
Errors are *returned* (``Message(Error(...))``), never raised: Flower drops the context of
a ClientApp that raises, which would lose a ledger event.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
    UserConfig,
)
from flwr.clientapp import ClientApp

from clients.hospital import Hospital
from clients.hospital_state import load_state, save_state
from privacy.ledger import PrivacyLedger
from sims.config import config_from_run_config
from sims.faults import corrupt_arrays, corruption_for, fault_for

app = ClientApp()

LEDGER_KEY = "privacy-ledger"
STATUS_KEY = "hospital-status"
LOCAL_KEY = "local-weights"  # what never leaves the hospital: FedBN's norm layers, a local-only model
BUDGET_EXHAUSTED = 4001  # Error code of a reply that declines a round to protect the budget
HOSPITAL_CRASHED = 4002  # Error code of a simulated crash after training (server/driver.py)
NOT_TRAINING = 4003  # Error code of a hospital asked to train in a round it does not train (evaluate-only)


def _number(record: ConfigRecord | UserConfig, key: str, default: float | None = None) -> float:
    """A numeric value of a Flower record (its values are typed as a union of many types)."""
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"'{key}' must be a number in the message's config. Got {value!r} instead.")
    return value


def _int(record: ConfigRecord | UserConfig, key: str, default: int | None = None) -> int:
    return int(_number(record, key, default))


def _hospital(context: Context, config: ConfigRecord | None = None) -> Hospital:
    run_config = config_from_run_config(context.run_config)
    standard = config.get("hist-standard", []) if config is not None else []
    return Hospital.from_partition(
        run_config, _int(context.node_config, "partition-id"), _int(context.node_config, "num-partitions"),
        hist_standard=tuple(float(v) for v in standard) if isinstance(standard, list) else (),
    )


def _config_hash(hospital: Hospital, context: Context) -> str:
    return hospital.config.config_hash(_int(context.node_config, "num-partitions"))


def _ledger(context: Context) -> PrivacyLedger:
    if LEDGER_KEY in context.state.config_records:
        return PrivacyLedger.from_config(context.state.config_records[LEDGER_KEY])
    return PrivacyLedger()


def _ledger_record(ledger: PrivacyLedger) -> ConfigRecord:
    columns: dict[str, list[int] | list[float]] = ledger.to_config()
    return ConfigRecord(dict(columns.items()))


def _status(context: Context) -> ConfigRecord:
    if STATUS_KEY not in context.state.config_records:
        context.state[STATUS_KEY] = ConfigRecord({"trained-round": -1, "steps": 0, "exhausted-round": 0})
    return context.state.config_records[STATUS_KEY]


def _restore_if_resuming(hospital: Hospital, context: Context, config: ConfigRecord) -> None:
    """First message of a resumed run: load this hospital's state as of the resumed round.

    The state is saved again into this run's folder (as of that round), so a resume of this
    run finds it even if the hospital is never sampled here.
    """
    resume_dir = str(config.get("resume-dir", ""))
    if not resume_dir or STATUS_KEY in context.state.config_records:
        return
    resume_round = _int(config, "resume-round")
    state = load_state(
        resume_dir, str(config["resume-key-root"]), hospital.site, resume_round, _config_hash(hospital, context)
    )
    _status(context)  # marks the state as restored, fresh or not
    if state is None:  # never trained before the resumed round
        return
    context.state[STATUS_KEY] = ConfigRecord(state["status"])
    if state["ledger"]["round"]:
        context.state[LEDGER_KEY] = ConfigRecord(state["ledger"])
    if state.get("tensors"):
        context.state[LOCAL_KEY] = ArrayRecord({k: Array(v.numpy()) for k, v in state["tensors"].items()})
    _persist(hospital, context, config, resume_round)


def _persist(hospital: Hospital, context: Context, config: ConfigRecord, server_round: int) -> None:
    """Write this hospital's private state after ``server_round``, encrypted with its own key."""
    run_dir = str(config.get("run-dir", ""))
    if not run_dir:
        return
    kept = [int(r) for r in str(config.get("kept-rounds", "")).split(",") if r]
    status = _status(context)
    if not _int(status, "first-saved", 0):
        status["first-saved"] = server_round
    state = {
        "ledger": _ledger(context).to_config(),
        "status": dict(status),
        "first-saved": _int(status, "first-saved"),
    }
    local = context.state.array_records.get(LOCAL_KEY)
    save_state(
        run_dir, str(config["key-root"]), hospital.site, server_round, _config_hash(hospital, context), state,
        kept_server_rounds=kept, create_keys=bool(_int(config, "key-create", 0)),
        tensors=local.to_torch_state_dict() if local is not None else None,
    )


@app.query()
def query(msg: Message, context: Context) -> Message:
    """The server's roll call: say which hospital this is (and restore state on a resume).

    With ``summaries`` in the request, also send two summaries of this hospital's images (never
    an image): the intensity histogram of its test split (the shift measure) and, for histogram
    standardisation, its percentile landmarks.
    """
    config = msg.content.config_records["config"]
    hospital = _hospital(context)
    _restore_if_resuming(hospital, context, config)
    values: dict[str, int | float | list[int] | list[float]] = {"site": hospital.site}
    if _int(config, "summaries", 0):
        values["histogram"] = [float(v) for v in hospital.intensity_histogram()]
        if hospital.config.mitigation.standardize == "histogram":
            values["landmarks"] = [float(v) for v in hospital.landmarks()]
    return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)


def _local_weights(hospital: Hospital, model: torch.nn.Module, context: Context) -> None:
    """Put this hospital's own weights into ``model`` (in place): its whole local model under
    ``strategy = "local"``, its normalisation layers under ``"fedbn"`` (none before it first trains)."""
    local = context.state.array_records.get(LOCAL_KEY)
    if local is None or hospital.config.train.strategy not in ("local", "fedbn"):
        return
    from scenarios.normalization import merge_local

    model.load_state_dict(merge_local(model.state_dict(), local.to_torch_state_dict()))


def _keep_local(hospital: Hospital, model: torch.nn.Module, received: dict[str, torch.Tensor], context: Context
                ) -> dict[str, torch.Tensor]:
    """After training: store what stays here; return the update to send.

    ``local``: the whole model stays (and is also sent: the server keeps it for the
    site-by-site evaluation, never averages it). ``fedbn``: the normalisation layers stay; the
    update carries the values it received for them, so nothing of them leaves the hospital.
    """
    state = model.state_dict()
    strategy = hospital.config.train.strategy
    if strategy == "local":
        context.state[LOCAL_KEY] = ArrayRecord(state)
    elif strategy == "fedbn":
        from scenarios.normalization import local_state_names, split_local

        names = local_state_names(model)
        shared, local = split_local(state, names)
        context.state[LOCAL_KEY] = ArrayRecord({k: v.detach().clone() for k, v in local.items()})
        state = {**shared, **{k: received[k] for k in names}}
    return state


def _open(msg: Message, context: Context) -> tuple[Hospital, ConfigRecord, int, torch.nn.Module]:
    """What every message starts with: the hospital, its round, the global model."""
    config = msg.content.config_records["config"]
    hospital = _hospital(context, config)
    _restore_if_resuming(hospital, context, config)
    model = hospital.new_model()
    model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
    return hospital, config, _int(config, "server-round"), model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global model locally (DP-SGD when sample-level DP is on) and reply."""
    hospital, config, server_round, model = _open(msg, context)
    status = _status(context)
    if hospital.role is not None and not hospital.role.trains_in(server_round):
        when = f"from round {hospital.role.join_round}" if hospital.role.join_round else "never (it evaluates only)"
        reason = f"hospital {hospital.site} was asked to train in round {server_round} but trains {when}"
        return Message(Error(code=NOT_TRAINING, reason=reason), reply_to=msg)
    received = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _local_weights(hospital, model, context)
    started = time.perf_counter()

    if hospital.config.privacy.sample_level:
        ledger = _ledger(context)
        if not hospital.budget_allows(ledger, server_round):
            if not status["exhausted-round"]:
                status["exhausted-round"] = server_round
            p = hospital.config.privacy
            spent = ledger.epsilon(delta=p.delta)
            projected = hospital.projected_epsilon(ledger, server_round)
            reason = (
                f"hospital {hospital.site} declines round {server_round} to protect its privacy budget: "
                f"training would take its epsilon from {spent:.3f} to {projected:.3f}, above its target "
                f"{p.target_epsilon:g} (delta {p.delta:g})"
            )
            _persist(hospital, context, config, server_round)
            return Message(Error(code=BUDGET_EXHAUSTED, reason=reason), reply_to=msg)
        result, event = hospital.train_private(model, server_round)
        ledger.append(event)
        context.state[LEDGER_KEY] = _ledger_record(ledger)
    else:
        result = hospital.train(model, server_round, proximal_mu=_number(config, "proximal-mu", 0.0))
    train_seconds = time.perf_counter() - started
    status["trained-round"] = server_round
    status["steps"] = result.steps
    outgoing = _keep_local(hospital, model, received, context)
    _persist(hospital, context, config, server_round)

    faults, seed = hospital.config.faults, hospital.config.seed
    fault = fault_for(faults, seed=seed, site=hospital.site, server_round=server_round)
    if fault == "crash":
        reason = f"hospital {hospital.site} crashed after training in round {server_round} (simulated fault)"
        return Message(Error(code=HOSPITAL_CRASHED, reason=reason), reply_to=msg)
    if fault == "straggle":  # reply just after the server's deadline for this round
        reply_by = _number(config, "reply-by", time.time() + faults.round_timeout)
        time.sleep(max(0.0, reply_by - time.time()) + faults.straggle_margin)
    update = ArrayRecord(outgoing)
    if fault == "corrupt":
        corruption = corruption_for(faults, seed=seed, site=hospital.site, server_round=server_round)
        bad = corrupt_arrays({k: v.numpy() for k, v in update.items()}, corruption)
        update = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in bad.items()})

    metrics = MetricRecord(
        {
            "train_loss": result.loss,
            "train_seconds": train_seconds,
            "steps": result.steps,
            "num-examples": result.num_examples,
            "uniform-weight": 1,
            "site": hospital.site,
            "server-round": server_round,
        }
    )
    content = RecordDict({"arrays": update, "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate on this hospital's test split; report its privacy state.

    What is evaluated: the model sent, as sent, when the server asks for a site-by-site
    evaluation (``cross-model`` = the hospital whose local model it is; keys ``model-<i>/...``);
    at an unseen hospital the global model, and with ``mitigation.tta`` also the global model
    after test-time adaptation here (AdaBN or TENT; ``unseen-tta/...``);
    otherwise the model this hospital uses (the global one, with its own normalisation layers
    under FedBN, its own model under local-only) and, in the final round with
    ``finetune-epochs``, that model fine-tuned here (``finetuned/...``).
    """
    hospital, config, server_round, model = _open(msg, context)
    if "scenario-step" in config:
        return _scenario_step(msg, context, hospital, config, server_round, model)
    values: dict[str, float] = {}
    if "cross-model" in config:
        scores, n = hospital.evaluate(model, "test")
        values = {f"model-{_int(config, 'cross-model')}/{k}": v for k, v in scores.items()}
    elif not hospital.trains:
        scores, n = hospital.evaluate(model, "test")
        values = dict(scores)
        if hospital.config.mitigation.tta != "none":
            hospital.adapt(model)
            adapted, _ = hospital.evaluate(model, "test")
            values.update({f"unseen-tta/{k}": v for k, v in adapted.items()})
    else:
        _local_weights(hospital, model, context)
        scores, n = hospital.evaluate(model, "test")
        values = {**scores, **_privacy_metrics(hospital, context, server_round)}
        if hospital.config.train.finetune_epochs and server_round == hospital.config.train.num_server_rounds:
            hospital.finetune(model)
            tuned, _ = hospital.evaluate(model, "test")
            values.update({f"finetuned/{k}": v for k, v in tuned.items()})
    metrics = MetricRecord(
        {
            **values,
            "num-examples": n,
            "uniform-weight": 1,
            "site": hospital.site,
            "server-round": server_round,
        }
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def _privacy_metrics(hospital: Hospital, context: Context, server_round: int) -> dict[str, float]:
    """This hospital's privacy state after ``server_round`` (``privacy_*`` keys).

    Epsilon is recomputed from the whole ledger, with Opacus' RDP and PRV accountants.
    Without sample-level DP the local training is not private: epsilon is infinite.
    """
    status = _status(context)
    participated = _int(status, "trained-round") == server_round
    p = hospital.config.privacy
    if p.mode == "off":  # nothing to account: privacy.csv stays empty and the report says so
        return {}
    if not p.sample_level:
        steps = _int(status, "steps") if participated else 0
        trained = _int(status, "trained-round") >= 0
        eps = math.inf if trained else 0.0
        return {
            "privacy_participated": int(participated),
            "privacy_steps": steps,
            "privacy_sample_rate": 0.0,
            "privacy_noise_multiplier": 0.0,
            "privacy_epsilon_rdp": eps,
            "privacy_epsilon_prv": eps,
            "privacy_delta": p.delta,
            "privacy_budget_exhausted": 0,
        }
    ledger = _ledger(context)
    plan = hospital.dp_plan()
    this_round = [e for e in ledger.events if e.round == server_round]
    return {
        "privacy_participated": int(participated),
        "privacy_steps": sum(e.steps for e in this_round),
        "privacy_sample_rate": plan.sample_rate,
        "privacy_noise_multiplier": plan.noise_multiplier,
        "privacy_epsilon_rdp": ledger.epsilon(delta=p.delta, accountant="rdp"),
        "privacy_epsilon_prv": ledger.epsilon(delta=p.delta, accountant="prv"),
        "privacy_delta": p.delta,
        "privacy_budget_exhausted": int(bool(_int(status, "exhausted-round"))),
    }


def _scenario_step(
    msg: Message, context: Context, hospital: Hospital, config: ConfigRecord, server_round: int,
    model: torch.nn.Module,
) -> Message:
    """One step of the OOD or robustness scenario after the last round (``scenario-step``).

    The model is the one this hospital uses (its own normalisation layers under FedBN, its own
    model under local-only; the global one at an evaluate-only hospital). What leaves the hospital:

    - ``feature-stats``: the count, sum and sum of outer products (per image class) of its train
      images' features (bottleneck and early-layer statistics: a D-vector and a D x D matrix; never a feature);
    - ``ood``: one score per image and method, and one Dice per image, of each image set it scores;
    - ``robustness``: one mean Dice per perturbation and strength.
    """
    from scenarios.ood_eval import stats_from_lists, stats_to_lists

    if hospital.trains:
        _local_weights(hospital, model, context)
    step = str(config["scenario-step"])
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {}
    if step == "feature-stats":
        lists = stats_to_lists(hospital.feature_stats(model))
        records["stats"] = ConfigRecord(dict(lists.items()))
    elif step == "ood":
        prefix = "ood-stats/"
        shipped = {k[len(prefix):]: config[k] for k in config if k.startswith(prefix)}
        stats = stats_from_lists(shipped) if shipped else None
        arrays: dict[str, Array] = {}
        names, kinds = [], []
        for name, kind, scored in hospital.ood_scores(model, stats):
            names.append(name)
            kinds.append(kind)
            for method, values in scored.scores.items():
                arrays[f"{name}::{method}"] = Array(np.ascontiguousarray(values, dtype=np.float64))
            if scored.dice is not None:
                arrays[f"{name}::dice"] = Array(np.ascontiguousarray(scored.dice, dtype=np.float64))
        records["scores"] = ArrayRecord(arrays)
        records["sets"] = ConfigRecord({"names": names, "kinds": kinds})
    elif step == "robustness":
        rows = hospital.robustness(model)
        records["rows"] = ConfigRecord({
            "perturbation": [r.perturbation for r in rows], "family": [r.family for r in rows],
            "strength": [float(r.strength) for r in rows], "unit": [r.unit for r in rows],
            "dice": [float(r.dice) for r in rows], "n": [int(r.n) for r in rows],
        })
    else:
        return Message(Error(code=0, reason=f"unknown scenario step {step!r}"), reply_to=msg)
    records["metrics"] = MetricRecord({"site": hospital.site, "server-round": server_round})
    return Message(content=RecordDict(records), reply_to=msg)
