"""The domain-shift scenario: who trains, who only evaluates, and with which scanner.

A federation of ``N`` SuperNodes is hospitals ``0..N-1`` (``partition-id``). Their roles come
from the run's :class:`sims.config.ShiftSpec`, here, in one place that the ServerApp (which
hospitals to ask to train) and every hospital (what data it has, whether it may train) share:

- the last ``shift.unseen-hospitals`` nodes are **unseen** hospitals: they never train; each
  evaluates the global model on its own data at its own node. Unseen hospital ``u`` (0-based)
  has the scanner of hospital id ``N - U + u`` drawn at severity
  ``unseen_severities[(u // 4) % len]`` (the world's severity if none is given), so any four
  consecutive unseen hospitals cover the four scanner archetypes at one severity;
- the training-position hospitals whose scanner archetype is ``shift.holdout-archetype`` are
  unseen too, at the training severity (leave-one-scanner-out);
- with ``shift.late-join-round = R`` the last training hospital trains from round ``R`` on
  (it evaluates from round 1: until it joins, its scanner is new to the model);
- ``shift.label-noise-hospital`` names the training hospital whose annotations are noisy.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sims.config import ConfigError, FedscanConfig

if TYPE_CHECKING:
    from sims.hospitals import HospitalSpec

TRAIN = "train"
UNSEEN = "unseen"


@dataclass(frozen=True)
class SiteRole:
    """What one hospital does in the federation.

    Attributes
    ----------
    site : int
        Hospital id (the node's ``partition-id``).
    role : str
        ``"train"`` or ``"unseen"`` (evaluates only, never trains).
    archetype : str
        Its scanner's character (:data:`sims.scanners.SCANNER_ARCHETYPES`).
    severity : float
        Its scanner's severity.
    join_round : int
        First round it trains: 1 from the start, ``R`` for a late joiner, 0 never.
    label_noise_rate : float
        Share of its patients whose annotations are corrupted.
    """

    site: int
    role: str
    archetype: str
    severity: float
    join_round: int
    label_noise_rate: float = 0.0

    def trains_in(self, server_round: int) -> bool:
        return self.join_round > 0 and server_round >= self.join_round


def site_roles(config: FedscanConfig, num_nodes: int) -> tuple[SiteRole, ...]:
    """Every hospital's role, in hospital order; see the module docstring. Cached per process
    (every message a hospital answers asks), like :func:`sims.hospitals.make_federation`.

    Raises
    ------
    ConfigError
        When the shift settings leave no hospital to train, or name a hospital that does
        not exist or does not train (one sentence naming the key, the value and the limit).
    """
    return _site_roles(config, int(num_nodes))


@functools.lru_cache(maxsize=16)
def _site_roles(config: FedscanConfig, num_nodes: int) -> tuple[SiteRole, ...]:
    from sims.scanners import scanner_archetype  # torch and MONAI: not before a shift is configured

    shift, world = config.shift, config.world
    unseen = shift.unseen_hospitals
    positions = num_nodes - unseen
    if positions < 1:
        raise ConfigError(
            f"The 'shift.unseen-hospitals' parameter must leave at least one training hospital among the "
            f"{num_nodes} SuperNodes (num-supernodes). Got {unseen} instead; use at most {num_nodes - 1} or "
            "add SuperNodes."
        )
    roles: list[SiteRole] = []
    for site in range(positions):
        archetype = scanner_archetype(world.seed, site)
        held_out = archetype == shift.holdout_archetype
        roles.append(SiteRole(site, UNSEEN if held_out else TRAIN, archetype, world.scanner_severity,
                              0 if held_out else 1))
    training = [r.site for r in roles if r.role == TRAIN]
    if not training:
        raise ConfigError(
            f"The 'shift.holdout-archetype' parameter holds out {shift.holdout_archetype!r}, the scanner of every "
            f"one of the {positions} training-position hospitals. Add hospitals (num-supernodes) or choose another."
        )
    for u in range(unseen):
        site = positions + u
        levels = shift.unseen_severities or (world.scanner_severity,)
        roles.append(SiteRole(site, UNSEEN, scanner_archetype(world.seed, site), levels[(u // 4) % len(levels)], 0))
    if shift.late_join_round:
        if len(training) < 2:
            raise ConfigError(
                "The 'shift.late-join-round' parameter needs at least two training hospitals (one trains from "
                f"round 1, the last joins later). Got {len(training)} training hospital(s) instead."
            )
        late = training[-1]
        roles[late] = dataclasses.replace(roles[late], join_round=shift.late_join_round)
    if shift.label_noise_hospital >= 0:
        noisy = shift.label_noise_hospital
        if noisy not in training:
            raise ConfigError(
                "The 'shift.label-noise-hospital' parameter must be -1 or a training hospital's id "
                f"({', '.join(map(str, training))}). Got {noisy} instead."
            )
        roles[noisy] = dataclasses.replace(roles[noisy], label_noise_rate=shift.label_noise_rate)
    return tuple(roles)


def training_sites(roles: tuple[SiteRole, ...]) -> list[int]:
    return [r.site for r in roles if r.role == TRAIN]


def unseen_sites(roles: tuple[SiteRole, ...]) -> list[int]:
    return [r.site for r in roles if r.role == UNSEEN]


@functools.lru_cache(maxsize=16)
def federation_specs(config: FedscanConfig, num_nodes: int) -> tuple[HospitalSpec, ...]:
    """Every hospital's spec: :func:`sims.hospitals.make_federation`, with each unseen
    hospital's scanner drawn at its own severity. Cached per process."""
    from sims.hospitals import make_federation
    from sims.scanners import make_scanner_profile

    specs = list(make_federation(config.world, num_nodes))
    for role in site_roles(config, num_nodes):
        if role.role == UNSEEN and role.severity != config.world.scanner_severity:
            scanner = make_scanner_profile(config.world.seed, role.site, role.severity)
            specs[role.site] = dataclasses.replace(specs[role.site], scanner=scanner)
    return tuple(specs)


def role_records(roles: tuple[SiteRole, ...]) -> list[dict[str, object]]:
    """The roles as plain dicts (``config.json``'s ``roles``)."""
    return [dataclasses.asdict(r) for r in roles]
