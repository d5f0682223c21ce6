"""Server-side evaluation of the global model on a public evaluation set.

A real server holds no hospital's patients, so it evaluates on *public* ones
(:func:`sims.hospitals.load_public_eval`: the template through the public scanner profiles
that pre-training uses, patients disjoint from pre-training's). The set has
``server-eval-patients`` patients (default 64) whatever the number of hospitals, so the
server's memory and its per-round evaluation do not grow with the federation. Its rows in
``metrics.csv`` are ``site = global, split = public``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, MetricRecord

from server.outputs import PUBLIC_SPLIT, MetricRow
from sims.anatomy import class_names
from sims.config import FedscanConfig
from sims.evaluation import evaluate_segmentation
from sims.hospitals import load_public_eval


class GlobalEvaluator:
    """``evaluate_fn`` for the round loop: Dice of the global model on the public set."""

    def __init__(
        self,
        config: FedscanConfig,
        model: torch.nn.Module,
        sink: Callable[[list[MetricRow]], None],
    ) -> None:
        # Labels stay uint8 (64 x 96 x 96 bytes); MONAI's one-hot widens them per batch.
        self._images, self._labels = load_public_eval(config.world)
        self._classes = class_names(config.world.lesions)
        self._model = model
        self._sink = sink

    @property
    def num_patients(self) -> int:
        return len(self._images)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        self._model.load_state_dict(arrays.to_torch_state_dict())
        scores = evaluate_segmentation(self._model, self._images, self._labels, self._classes)
        self._sink([MetricRow(server_round, "global", PUBLIC_SPLIT, k, v) for k, v in scores.items()])
        values: dict[str, int | float | list[int] | list[float]] = dict(scores)  # MetricRecord's value type
        return MetricRecord(values)
