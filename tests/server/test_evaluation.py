"""The server evaluates on a public set whose size does not grow with the federation."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord

from server.evaluation import GlobalEvaluator
from server.outputs import PUBLIC_SPLIT, MetricRow
from sims.anatomy import class_names
from sims.config import config_from_run_config
from sims.evaluation import evaluate_segmentation
from sims.hospitals import load_public_eval, make_federation
from sims.model import make_model

TINY = {"image-size": 32, "unet-channels": "8,16", "patients-per-hospital": 10, "server-eval-patients": 6}


def test_evaluator_holds_the_configured_public_set_whatever_the_number_of_hospitals() -> None:
    # Prepare: the same config for a 4- and a 200-hospital federation; the evaluator is not
    # even told the number of hospitals.
    config = config_from_run_config(TINY)
    make_federation(config.world, 200)  # what the server builds for config.json
    model = make_model(len(class_names(True)), (8, 16))

    # Execute
    evaluator = GlobalEvaluator(config, model, lambda rows: None)

    # Assert: 6 public patients, uint8 labels: 6 * 32 * 32 * (4 + 1) bytes in all.
    assert evaluator.num_patients == 6
    assert evaluator._labels.dtype == np.uint8
    assert evaluator._images.nbytes + evaluator._labels.nbytes == 6 * 32 * 32 * 5
    np.testing.assert_array_equal(evaluator._images, load_public_eval(config.world)[0])


def test_default_set_is_64_patients() -> None:
    assert config_from_run_config({}).world.server_eval_patients == 64


@pytest.mark.parametrize("value", [0, -3, 1.5])
def test_server_eval_patients_is_validated(value: object) -> None:
    from sims.config import ConfigError

    with pytest.raises(ConfigError, match=r"^The 'server-eval-patients' parameter must be an int in \[1, 100000\]"):
        config_from_run_config({**TINY, "server-eval-patients": value})


def test_rows_are_global_public_and_scores_are_the_dice_on_the_public_set() -> None:
    # Prepare
    config = config_from_run_config(TINY)
    classes = class_names(True)
    trained = make_model(len(classes), (8, 16), seed=3)
    rows: list[MetricRow] = []
    evaluator = GlobalEvaluator(config, make_model(len(classes), (8, 16)), rows.extend)

    # Execute
    record = evaluator(2, ArrayRecord(trained.state_dict()))

    # Assert
    expected = evaluate_segmentation(trained, *load_public_eval(config.world), classes)
    assert dict(record) == pytest.approx(expected)
    assert {(r.round, r.site, r.split) for r in rows} == {(2, "global", PUBLIC_SPLIT)}
    assert {r.metric: r.value for r in rows} == pytest.approx(expected)

