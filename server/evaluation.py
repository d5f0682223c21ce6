"""Server-side evaluation of the global model on the pooled held-out patients."""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, MetricRecord

from server.outputs import MetricRow
from sims.anatomy import class_names
from sims.config import FedscanConfig
from sims.evaluation import evaluate_segmentation
from sims.hospitals import HospitalSpec, load_holdout_pool


class GlobalEvaluator:
    """``evaluate_fn`` for ``Strategy.start``: Dice on every hospital's holdout, pooled."""

    def __init__(
        self,
        config: FedscanConfig,
        specs: tuple[HospitalSpec, ...],
        model: torch.nn.Module,
        sink: Callable[[list[MetricRow]], None],
    ) -> None:
        self._images, self._labels = load_holdout_pool(config.world, specs, config.cache_dir)
        self._classes = class_names(config.world.lesions)
        self._model = model
        self._sink = sink

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        self._model.load_state_dict(arrays.to_torch_state_dict())
        scores = evaluate_segmentation(self._model, self._images, self._labels, self._classes)
        self._sink([MetricRow(server_round, "global", "holdout", k, v) for k, v in scores.items()])
        return MetricRecord(scores)
