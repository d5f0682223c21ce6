"""``privacy.csv``: one row per hospital per round, plus the server's client-level rows.

Columns, exactly: ``round,site,participated,steps,sample_rate,noise_multiplier,
epsilon_rdp,epsilon_prv,delta,budget_exhausted``. Hospital rows come from each
hospital's own ledger (reported with its evaluation every round); ``site ==
"client-level"`` rows are the DP-FedAvg accounting of the server, reported apart: the
two guarantees protect different units (a patient; a whole hospital) and are not added.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from privacy.events import CLIENT_LEVEL, PRIVACY_COLUMNS, DPEvent
from server.site_metrics import PrivacyRow
from sims.config import PrivacySpec, clients_per_round


class PrivacyLog:
    """Appends privacy rows to ``<run>/privacy.csv`` as rounds complete."""

    def __init__(self, run_dir: Path, spec: PrivacySpec, num_hospitals: int) -> None:
        self.path = run_dir / "privacy.csv"
        self.spec = spec
        self.num_hospitals = num_hospitals
        self._client_events: list[DPEvent] = []
        self.rows: list[list[object]] = []
        with self.path.open("w", newline="") as fh:
            csv.writer(fh).writerow(PRIVACY_COLUMNS)

    @property
    def clients_per_round(self) -> int:
        # The same count the strategy samples (config validation made the two keys agree).
        return clients_per_round(self.spec.clients_per_round, self.num_hospitals)

    def add_round(self, server_round: int, rows: list[PrivacyRow]) -> None:
        out = [
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

        q = self.clients_per_round / self.num_hospitals
        sigma = self.spec.client_noise_multiplier
        self._client_events.append(DPEvent(round=server_round, noise_multiplier=sigma, sample_rate=q, steps=1))
        eps_rdp = epsilon(self._client_events, delta=self.spec.delta, accountant="rdp")
        eps_prv = epsilon(self._client_events, delta=self.spec.delta, accountant="prv") if sigma > 0 else math.inf
        return [server_round, CLIENT_LEVEL, self.clients_per_round, 1, q, sigma, eps_rdp, eps_prv, self.spec.delta, 0]
