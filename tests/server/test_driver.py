"""The server's reply checks: every corrupt update is rejected with its reason; good ones pass."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from server.checkpointing import binding_mismatch
from server.driver import check_update
from server.failures import Failure, FailureLog
from sims.config import config_from_run_config
from sims.faults import CORRUPTIONS, corrupt_arrays

REFERENCE = {"w": np.ones((4, 3), np.float32), "b": np.zeros(4, np.float32)}


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    # Messages read the run, node and task they belong to from Flower's TaskIdentity.
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)  # type: ignore[attr-defined]
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved  # type: ignore[attr-defined]


def _reply(arrays: dict[str, np.ndarray], **metrics: float) -> Message:
    sent = Message(RecordDict({}), dst_node_id=7, message_type=MessageType.TRAIN)
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    content = RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 10, "uniform-weight": 1, **metrics})})
    return Message(content, reply_to=sent)


def test_a_sound_update_passes() -> None:
    assert check_update(_reply({k: v + 1 for k, v in REFERENCE.items()}), REFERENCE) is None


@pytest.mark.parametrize(
    ("corruption", "reason"),
    [("nan", "'w' holds NaN or Inf"), ("inf", "'w' holds NaN or Inf"), ("shape", "'w' has shape (3, 3), expected (4, 3)"),
     ("dtype", "dtype float16, expected float32")],
)
def test_every_simulated_corruption_is_rejected_with_its_reason(corruption: str, reason: str) -> None:
    assert corruption in CORRUPTIONS
    why = check_update(_reply(corrupt_arrays(REFERENCE, corruption)), REFERENCE)
    assert why is not None and reason in why


def test_missing_or_extra_arrays_and_bad_weights_are_rejected() -> None:
    assert "missing ['w']" in str(check_update(_reply({"b": REFERENCE["b"]}), REFERENCE))
    extra = {**REFERENCE, "x": np.ones(1, np.float32)}
    assert "unexpected ['x']" in str(check_update(_reply(extra), REFERENCE))
    assert "'num-examples' is nan" in str(check_update(_reply(REFERENCE, **{"num-examples": float("nan")}), REFERENCE))
    assert "'num-examples' is 0" in str(check_update(_reply(REFERENCE, **{"num-examples": 0}), REFERENCE))


def test_an_error_reply_is_not_an_update() -> None:
    sent = Message(RecordDict({}), dst_node_id=7, message_type=MessageType.TRAIN)
    reply = Message(Error(code=4002, reason="hospital 7 crashed"), reply_to=sent)
    assert reply.has_error()  # the driver files these as failures before any update check


def test_binding_mismatch_names_the_setting_and_both_values() -> None:
    a, b = config_from_run_config({}), config_from_run_config({"lr": 0.01})

    assert binding_mismatch(a.binding(4), a.binding(4)) is None
    assert binding_mismatch(a.binding(4), a.binding(6)) == (
        "it was written with num-supernodes = 4, and this run has num-supernodes = 6"
    )
    assert binding_mismatch(a.binding(4), b.binding(4)) == "it was written with lr = 0.003, and this run has lr = 0.01"
    # Bindings of another fedscan version: a key only one side binds is named as such.
    older = {**a.binding(4), "attack.eps": [0.0, 2.0]}
    assert binding_mismatch(older, a.binding(4)) == (
        "it was written by a fedscan version that bound attack.eps = [0.0, 2.0], which this version does not "
        "bind; resume it with the version that wrote it, or start afresh"
    )
    newer = {k: v for k, v in a.binding(4).items() if k != "adv-train.ratio"}
    assert binding_mismatch(newer, a.binding(4)) == (
        "it was written by a fedscan version that did not bind adv-train.ratio (this run has adv-train.ratio = "
        "0.0); resume it with the version that wrote it, or start afresh"
    )
    none_target = config_from_run_config({"privacy.target-epsilon": "none"}).binding(4)
    assert binding_mismatch(none_target, none_target) is None  # None is a value, not a missing key


def test_failure_log_writes_every_row_and_sums_them_up(tmp_path: Path) -> None:
    log = FailureLog(tmp_path)

    log.add([Failure(1, 0, "train", "crash", "hospital 0 crashed"), Failure(1, 2, "train", "corrupt", "NaN, \"x\"")])
    log.add([Failure(2, 0, "evaluate", "late", "no reply within 5 s")])

    rows = list(csv.reader((tmp_path / "failures.csv").open()))
    assert rows[0] == ["round", "site", "phase", "kind", "reason"]
    assert rows[2] == ["1", "2", "train", "corrupt", 'NaN, "x"'] and len(rows) == 4
    assert log.summary() == "corrupt 1, crash 1, late 1"
    (tmp_path / "other").mkdir()
    assert FailureLog(tmp_path / "other").summary() == "none"
