"""Server checkpoints: what a run needs to continue exactly, encrypted and signed.

A checkpoint after round ``r`` holds the global model, the strategy's own state (FedAdam's
moments), the RNG states of the server process, the config hash, the client-level DP
events, and every metric and privacy row so far. Hospitals persist their own private state
(ledger, bookkeeping) separately, each under its own key (:mod:`clients.hospital_state`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import Strategy

from privacy.checkpoint import CheckpointError, prune_checkpoints, read_checkpoint, write_checkpoint
from privacy.keys import Keyring, KeyringError, generate_keyring, load_keyring
from server.outputs import MetricRow
from sims.config import ConfigError, FedscanConfig

CHECKPOINT_DIR = "checkpoints"
RUN_LOCAL_KEYS = "keys"


def server_keyring_at(key_root: Path) -> Keyring:
    """The keyring in ``key_root``; a run-local one is made (and announced once) if absent."""
    if (key_root / "encryption.key").exists():
        return load_keyring(key_root)
    log(
        WARNING,
        "fedscan: no checkpoint.keyring configured; made a run-local keyring in %s. Keys kept "
        "beside the checkpoints protect nothing: this is for simulation only (fedscan keygen).",
        key_root,
    )
    return generate_keyring(key_root)


def _strategy_state(strategy: Strategy) -> dict[str, torch.Tensor]:
    inner = getattr(strategy, "strategy", strategy)  # unwrap Flower's DP wrapper
    tensors: dict[str, torch.Tensor] = {}
    for name in ("m_t", "v_t"):
        moments = getattr(inner, name, None)
        if moments:
            tensors.update({f"strategy/{name}/{k}": torch.from_numpy(np.asarray(v).copy()) for k, v in moments.items()})
    return tensors


def _restore_strategy(strategy: Strategy, tensors: dict[str, torch.Tensor]) -> None:
    inner = getattr(strategy, "strategy", strategy)
    for name in ("m_t", "v_t"):
        prefix = f"strategy/{name}/"
        moments = {k[len(prefix) :]: v.numpy().copy() for k, v in tensors.items() if k.startswith(prefix)}
        if moments:
            setattr(inner, name, moments)


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    tensors = {"rng/numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    state = {"numpy": [kind, int(pos), int(has_gauss), float(cached)], "python": [version, list(internal), gauss]}
    return tensors, state


def _restore_rng(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    kind, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@dataclass
class ResumeState:
    """What a resumed run starts from (the state after ``round``)."""

    round: int
    arrays: ArrayRecord
    strategy_tensors: dict[str, torch.Tensor]
    metric_rows: list[MetricRow]
    privacy_rows: list[list[Any]]
    client_events: list[dict[str, Any]]
    source_run_dir: Path
    rng_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    rng_state: dict[str, Any] = field(default_factory=dict)

    def restore(self, strategy: Strategy) -> None:
        _restore_strategy(strategy, self.strategy_tensors)
        _restore_rng(self.rng_tensors, self.rng_state)


def find_checkpoint(resume_from: str) -> Path:
    """The newest server checkpoint of a run folder, or the given file."""
    path = Path(resume_from)
    if path.is_dir():
        candidates = sorted((path / CHECKPOINT_DIR).glob("round-*.ckpt"), key=lambda p: int(p.stem.split("-")[-1]))
        if not candidates:
            raise ConfigError(f"The 'checkpoint.resume-from' folder '{path}' holds no checkpoints/round-*.ckpt.")
        return candidates[-1]
    if not path.is_file():
        raise ConfigError(f"The 'checkpoint.resume-from' parameter must be a checkpoint or run folder. Got '{path}'.")
    return path


def resume_keyring(config: FedscanConfig, checkpoint: Path) -> Keyring:
    if config.checkpoint.keyring:
        return load_keyring(config.checkpoint.keyring)
    return load_keyring(checkpoint.parent.parent / RUN_LOCAL_KEYS)


def load_resume(config: FedscanConfig) -> ResumeState:
    """Read, verify and decrypt the checkpoint named by ``checkpoint.resume_from``.

    Raises
    ------
    ConfigError
        One sentence for a wrong key, a tampered or truncated file, an unknown version or a
        checkpoint written for a different config.
    """
    path = find_checkpoint(config.checkpoint.resume_from)
    try:
        keyring = resume_keyring(config, path)
        ckpt = read_checkpoint(path, keyring=keyring, expected_config_hash=config.config_hash())
    except (CheckpointError, KeyringError) as err:
        raise ConfigError(f"Cannot resume from '{path}': {err}") from None
    tensors = ckpt.tensors
    arrays = ArrayRecord({k[len("arrays/") :]: v for k, v in tensors.items() if k.startswith("arrays/")})
    state = ckpt.state
    return ResumeState(
        round=int(ckpt.header.round),
        arrays=arrays,
        strategy_tensors={k: v for k, v in tensors.items() if k.startswith("strategy/")},
        metric_rows=[MetricRow(*row) for row in state["metrics"]],
        privacy_rows=state["privacy"],
        client_events=state["client_events"],
        source_run_dir=path.parent.parent,
        rng_tensors={k: v for k, v in tensors.items() if k.startswith("rng/")},
        rng_state=state["rng"],
    )


class ServerCheckpointer:
    """Writes ``<run>/checkpoints/round-NNNN.ckpt`` every ``checkpoint.every`` rounds."""

    def __init__(self, config: FedscanConfig, run_dir: Path, run_id: str, keyring: Keyring) -> None:
        self.config = config
        self.folder = run_dir / CHECKPOINT_DIR
        self.run_id = run_id
        self.keyring = keyring
        self.config_hash = config.config_hash()

    def due(self, server_round: int, last_round: int) -> bool:
        every = self.config.checkpoint.every
        return every > 0 and (server_round % every == 0 or server_round == last_round)

    def save(
        self,
        server_round: int,
        arrays: ArrayRecord,
        strategy: Strategy,
        metric_rows: list[MetricRow],
        privacy_rows: list[list[Any]],
        client_events: list[dict[str, Any]],
    ) -> Path:
        rng_tensors, rng_state = _rng_state()
        tensors = {f"arrays/{k}": v for k, v in arrays.to_torch_state_dict().items()}
        tensors.update(_strategy_state(strategy))
        tensors.update(rng_tensors)
        state = {
            "metrics": [[r.round, r.site, r.split, r.metric, r.value] for r in metric_rows],
            "privacy": privacy_rows,
            "client_events": client_events,
            "rng": rng_state,
        }
        path = write_checkpoint(
            self.folder / f"round-{server_round:04d}.ckpt",
            keyring=self.keyring,
            kind="server",
            run_id=self.run_id,
            round=server_round,
            config_hash=self.config_hash,
            tensors=tensors,
            state=state,
            meta={"strategy": self.config.train.strategy, "privacy": self.config.privacy.mode},
        )
        prune_checkpoints(self.folder, keep=self.config.checkpoint.keep)
        log(INFO, "fedscan: checkpoint %s", path.name)
        return path
