"""``privacy.csv``: one row per hospital per round, plus the server's client-level rows.

Columns, exactly: ``round,site,participated,steps,sample_rate,noise_multiplier,
epsilon_rdp,epsilon_prv,delta,budget_exhausted``. Hospital rows come from each
hospital's own ledger (reported with its evaluation every round); ``site ==
"client-level"`` rows are the DP-FedAvg accounting of the server, reported apart: the
two guarantees protect different units (a patient; a whole hospital) and are not added.

With ``privacy.client-target-epsilon`` the log is also the server's budget guard
(:meth:`PrivacyLog.before_round`): the federation stops before the round that would take
the client-level epsilon above the target, and that round gets one client-level row with
``participated = 0`` and ``budget_exhausted = 1``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from privacy.events import CLIENT_LEVEL, PRIVACY_COLUMNS, DPEvent
from server.site_metrics import PrivacyRow
from sims.config import PrivacySpec, clients_per_round


class PrivacyLog:
    """Appends privacy rows to ``<run>/privacy.csv`` as rounds complete.

    Parameters
    ----------
    run_dir : Path
        The run folder.
    spec : PrivacySpec
        The run's privacy settings.
    num_hospitals : int
        Hospitals in the federation.
    num_rounds : int or None
        Planned rounds (``num-server-rounds``): needed to calibrate the client-level noise
        to ``privacy.client-target-epsilon``; ``None`` is allowed only when nothing is
        calibrated at the client level.
    """

    def __init__(
        self, run_dir: Path, spec: PrivacySpec, num_hospitals: int, *, num_rounds: int | None = None
    ) -> None:
        self.path = run_dir / "privacy.csv"
        self.spec = spec
        self.num_hospitals = num_hospitals
        self.num_rounds = num_rounds
        self.stopped_before: int | None = None
        self._client_events: list[DPEvent] = []
        self.rows: list[list[object]] = []
        with self.path.open("w", newline="") as fh:
            csv.writer(fh).writerow(PRIVACY_COLUMNS)

    @property
    def client_plan(self) -> DPEvent:
        """The DP-FedAvg round as planned: the noise the strategy adds (calibrated to
        ``privacy.client-target-epsilon`` where asked) and the client sampling rate."""
        from server.privacy_plan import client_level_plan  # Opacus loads lazily: 0.7 s

        p = self.spec
        if p.client_target_epsilon is not None and p.calibrate_noise and self.num_rounds is None:
            raise ValueError(
                "PrivacyLog needs num_rounds to calibrate the client-level noise to "
                f"privacy.client-target-epsilon = {p.client_target_epsilon:g}."
            )
        return client_level_plan(p, self.num_hospitals, self.clients_per_round, self.num_rounds or 1)

    def before_round(self, server_round: int) -> str | None:
        """The client-level budget guard, asked before ``server_round`` starts.

        Returns
        -------
        str or None
            ``None`` if the round fits in ``privacy.client-target-epsilon`` (or there is no
            client-level target); otherwise the sentence that stops the federation, after
            writing the round's client-level row (nothing released: ``participated = 0``,
            ``budget_exhausted = 1``, epsilon unchanged).
        """
        from privacy.accounting import epsilon, would_exceed

        p = self.spec
        if not p.client_level or p.client_target_epsilon is None:
            return None
        plan = self.client_plan
        event = DPEvent(server_round, plan.noise_multiplier, plan.sample_rate, plan.steps)
        if not would_exceed(
            self._client_events, event, target_epsilon=p.client_target_epsilon, delta=p.delta
        ):
            return None
        would_be = epsilon([*self._client_events, event], delta=p.delta)
        spent = [
            epsilon(self._client_events, delta=p.delta, accountant=accountant)
            for accountant in ("rdp", "prv")
        ]
        self.stopped_before = server_round
        self._append(
            [[server_round, CLIENT_LEVEL, 0, 0, plan.sample_rate, plan.noise_multiplier, *spent, p.delta, 1]]
        )
        return (
            f"round {server_round} would take the client-level epsilon to {would_be:.4g}, above "
            f"privacy.client-target-epsilon = {p.client_target_epsilon:g} (noise multiplier "
            f"{plan.noise_multiplier:.4g}, client sampling rate {plan.sample_rate:.3g}, delta {p.delta:g}); "
            f"the client-level budget allowed {sum(1 for e in self._client_events if e.steps)} round(s)"
        )

    @property
    def clients_per_round(self) -> int:
        # The same count the strategy samples (config validation made the two keys agree).
        return clients_per_round(self.spec.clients_per_round, self.num_hospitals)

    def add_round(self, server_round: int, rows: list[PrivacyRow]) -> None:
        if self.spec.mode == "off":  # nothing is accounted; the report says privacy was off
            return
        out: list[list[object]] = [
            [
                server_round,
                r["site"],
                int(r["participated"]),
                int(r["steps"]),
                float(r["sample_rate"]),
                float(r["noise_multiplier"]),
                float(r["epsilon_rdp"]),
                float(r["epsilon_prv"]),
                float(r["delta"]),
                int(r["budget_exhausted"]),
            ]
            for r in sorted(rows, key=lambda r: int(str(r["site"])))
        ]
        if self.spec.client_level:
            out.append(self._client_level_row(server_round))
        self._append(out)

    def _append(self, out: list[list[object]]) -> None:
        self.rows.extend(out)
        with self.path.open("a", newline="") as fh:
            csv.writer(fh).writerows(out)

    @property
    def client_events(self) -> list[dict[str, float | int]]:
        return [e.to_dict() for e in self._client_events]

    def restore(self, rows: list[list[object]], client_events: list[dict[str, float | int]]) -> None:
        """Continue a resumed run: the rows and client-level events written before."""
        self._client_events = [DPEvent.from_dict(e) for e in client_events]
        self._append([list(r) for r in rows])

    def _client_level_row(self, server_round: int) -> list[object]:
        """DP-FedAvg (McMahan et al., 2018): one Gaussian release of the clipped mean per round.

        Sampling rate ``q = clients_per_round / num_hospitals``, accounted as Poisson
        subsampling (as in the paper); with every hospital in every round ``q = 1`` and
        there is no amplification at all.
        """
        from privacy.accounting import epsilon  # Opacus loads lazily: 0.7 s

        plan = self.client_plan
        q, sigma = plan.sample_rate, plan.noise_multiplier
        self._client_events.append(
            DPEvent(round=server_round, noise_multiplier=sigma, sample_rate=q, steps=1)
        )
        eps_rdp = epsilon(self._client_events, delta=self.spec.delta, accountant="rdp")
        eps_prv = (
            epsilon(self._client_events, delta=self.spec.delta, accountant="prv") if sigma > 0 else math.inf
        )
        return [
            server_round,
            CLIENT_LEVEL,
            self.clients_per_round,
            1,
            q,
            sigma,
            eps_rdp,
            eps_prv,
            self.spec.delta,
            0,
        ]
