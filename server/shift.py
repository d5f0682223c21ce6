"""The server's side of the domain-shift scenario: roles, summaries, extra evaluations, pooling.

:class:`ShiftCoordinator` is what the ServerApp asks, each round, about who trains (a late
joiner from its round on; evaluate-only hospitals never), who the strategy evaluates (the
training hospitals), and what else to evaluate after it (every unseen hospital, under the
split ``unseen``; at the end of a local-only run, every local model at every other hospital,
under ``model-<i>``). From the roll call it takes two summaries per hospital (never an image):
percentile landmarks, whose mean over the training hospitals becomes the federation's
histogram-standardisation scale, and an intensity histogram, from which it writes each
hospital's distance to the training hospitals (split ``shift``, round 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp.strategy import Strategy

from scenarios.domain_shift import (
    TRAIN,
    federation_specs,
    role_records,
    site_roles,
    training_sites,
    unseen_sites,
)
from server.driver import Ask
from server.outputs import MetricRow
from server.site_metrics import SiteMetrics
from sims.config import FedscanConfig, round_lr

SHIFT_SPLIT = "shift"
UNSEEN_SPLIT = "unseen"


class ShiftCoordinator:
    """Roles and extra phases of one run (see the module docstring)."""

    def __init__(self, config: FedscanConfig, num_hospitals: int) -> None:
        self.config = config
        self.num_hospitals = num_hospitals
        self.roles = site_roles(config, num_hospitals)
        self.specs = federation_specs(config, num_hospitals)
        self.trainers = training_sites(self.roles)
        self.unseen = unseen_sites(self.roles)
        self.standard: list[float] = []
        self._strategy: Strategy | None = None
        self._site_metrics: SiteMetrics | None = None
        self._sink: Any = None
        self._resumed = False

    # ------------------------------------------------------------------ sizes and roles

    @property
    def num_trainers(self) -> int:
        """``K`` of the strategy and the client-level accounting: hospitals that ever train."""
        return len(self.trainers)

    @property
    def strategy_hospitals(self) -> int:
        """Hospitals the strategy must wait for: one fewer while a late joiner has not joined
        (it samples every connected training hospital, 0 = all being required with a late joiner)."""
        return self.num_trainers - (1 if self.config.shift.late_join_round > 1 else 0)

    @property
    def wants_summaries(self) -> bool:
        c = self.config
        return c.mitigation.standardize == "histogram" or bool(self.unseen) or c.scenario == "domain_shift"

    def role_records(self) -> list[dict[str, object]]:
        return role_records(self.roles)

    def train_sites(self, server_round: int) -> list[int]:
        return [r.site for r in self.roles if r.trains_in(server_round)]

    @property
    def evaluate_sites(self) -> list[int]:
        return [r.site for r in self.roles if r.role == TRAIN]

    def attach(
        self, strategy: Strategy, site_metrics: SiteMetrics, sink: Any, *, resumed: bool, run_dir: Path | None = None
    ) -> None:
        self._strategy, self._site_metrics, self._sink, self._resumed = strategy, site_metrics, sink, resumed
        self._run_dir = run_dir

    # ------------------------------------------------------------------ summaries

    def on_roll_call(self, replies: dict[int, MetricRecord]) -> None:
        """Turn the hospitals' summaries into the standard scale and the shift measure.

        Every roll-call reply is also written, as received, to ``summaries.json``: the audit
        trail of what left each hospital before round 1 (its id and, when asked, P landmarks
        and a B-bin histogram: numbers, never an image).
        """
        if self._run_dir is not None:
            received = {str(site): {k: record[k] for k in record} for site, record in sorted(replies.items())}
            (self._run_dir / "summaries.json").write_text(json.dumps(received, indent=1) + "\n")
        if self.config.mitigation.standardize == "histogram":
            from scenarios.mitigations import standard_scale

            landmarks = [np.asarray(replies[s]["landmarks"], dtype=np.float64) for s in self.trainers]
            self.standard = [float(v) for v in standard_scale(landmarks)]
        if "histogram" not in next(iter(replies.values()), {}) or self._resumed:
            return  # a resumed run has its round-0 rows from the checkpoint
        from scenarios.shift_measures import histogram_distance, mean_histogram

        histograms = {s: np.asarray(r["histogram"], dtype=np.float64) for s, r in replies.items()}
        reference = mean_histogram([histograms[s] for s in self.trainers])
        self._sink([
            MetricRow(0, str(site), SHIFT_SPLIT, "histogram_distance", histogram_distance(histograms[site], reference))
            for site in sorted(histograms)
        ])

    def round_config(self) -> dict[str, list[float]]:
        return {"hist-standard": self.standard} if self.standard else {}

    # ------------------------------------------------------------------ extra evaluations

    def after_evaluate(self, server_round: int, arrays: ArrayRecord, ask: Ask) -> None:
        assert self._site_metrics is not None, "attach() first"
        strategy = self.config.train.strategy
        if self.unseen and strategy != "local":
            replies = ask([(site, arrays, {}) for site in self.unseen], "evaluate-unseen")
            self._site_metrics.collect([r.content for r in replies], split=UNSEEN_SPLIT)
        if strategy == "local" and server_round == self.config.train.num_server_rounds:
            models: dict[int, ArrayRecord] = getattr(self._strategy, "local_models", {})
            everyone = [r.site for r in self.roles]
            jobs = [(j, models[i], {"cross-model": i}) for i in sorted(models) for j in everyone if j != i]
            replies = ask(jobs, "evaluate-cross")
            self._site_metrics.collect([r.content for r in replies], split="cross")

    # ------------------------------------------------------------------ pooled

    def train_pooled(self, server_round: int, arrays: ArrayRecord) -> tuple[ArrayRecord, float]:
        """One round of centralised training on the training hospitals' pooled train splits
        (``local-epochs`` epochs, as each hospital would do on its own), for ``strategy = "pooled"``."""
        from clients.hospital import Hospital
        from sims.anatomy import class_names
        from sims.model import make_model
        from sims.seeding import make_torch_generator
        from sims.training import train_one_round

        c, t = self.config, self.config.train
        hospitals = [
            Hospital.from_partition(c, site, self.num_hospitals, hist_standard=tuple(self.standard))
            for site in self.train_sites(server_round)
        ]
        parts = [h.training_data() for h in hospitals]
        model = make_model(len(class_names(c.world.lesions)), t.unet_channels, norm=t.norm)
        model.load_state_dict(arrays.to_torch_state_dict())
        result = train_one_round(
            model,
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
            epochs=t.local_epochs,
            lr=round_lr(t, server_round),
            batch_size=t.batch_size,
            generator=make_torch_generator(c.seed, "pooled", server_round, "train"),
            augment=False,
            transform=hospitals[0].batch_transform(),
        )
        self._sink([MetricRow(server_round, "pooled", "train", "train_loss", result.loss)])
        return ArrayRecord(model.state_dict()), result.loss
