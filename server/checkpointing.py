"""Server checkpoints: what a run needs to continue exactly, encrypted and signed.

A checkpoint after round ``r`` holds the global model, the strategy's own state (FedAdam's
moments), the RNG states of the server process, the run's binding (everything that shapes
its numbers, :meth:`sims.config.FedscanConfig.binding`), the client-level DP events, and
every metric, privacy and failure row so far. Hospitals persist their own private state
(ledger, bookkeeping) separately, each under its own key (:mod:`clients.hospital_state`).

Keys. A run signs and encrypts with the configured keyring (``checkpoint.keyring``, which
must exist: nothing is ever written into it) or, by default, with a run-local keyring that
it makes in ``<its run folder>/keys``. It reads the checkpoint it resumes from with the
configured keyring or the run-local keyring *of the run that wrote it*; so a resume of a
resume of a resume works, every file verifying with the keys of the run it sits in.
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


def key_root(config: FedscanConfig, run_dir: Path) -> Path:
    """Where this run's keys are: the configured keyring, else ``<run_dir>/keys``."""
    return Path(config.checkpoint.keyring) if config.checkpoint.keyring else run_dir / RUN_LOCAL_KEYS


def source_key_root(config: FedscanConfig, source_run_dir: Path) -> Path:
    """Where the keys of the run being resumed are: the configured keyring, else its own."""
    return Path(config.checkpoint.keyring) if config.checkpoint.keyring else source_run_dir / RUN_LOCAL_KEYS


def check_configured_keyring(config: FedscanConfig, num_hospitals: int) -> None:
    """A configured keyring must hold the server's keys and every hospital's; nothing is made.

    Raises
    ------
    ConfigError
        One sentence naming the folder and the command that creates what is missing.
    """
    folder = config.checkpoint.keyring
    if not folder or not config.checkpoint.every:
        return
    from clients.hospital_state import hospital_keyring

    make = f"create it with `fedscan keygen {folder} --hospitals {num_hospitals}`"
    try:
        load_keyring(folder)
    except KeyringError as err:
        raise ConfigError(f"The 'checkpoint.keyring' folder is not usable: {err} ({make}).") from None
    for site in range(num_hospitals):
        try:
            hospital_keyring(folder, site)
        except KeyringError as err:
            raise ConfigError(
                f"The 'checkpoint.keyring' folder '{folder}' has no usable keys for hospital {site}: {err} "
                f"({make}; a configured keyring is never written to)."
            ) from None


def server_keyring(config: FedscanConfig, run_dir: Path) -> Keyring:
    """This run's server keyring: the configured one, or a run-local one made in ``run_dir``."""
    if config.checkpoint.keyring:
        return load_keyring(config.checkpoint.keyring)
    log(
        WARNING,
        "fedscan: no checkpoint.keyring configured; made a run-local keyring in %s. Keys kept "
        "beside the checkpoints protect nothing: this is for simulation only (fedscan keygen DIR).",
        run_dir / RUN_LOCAL_KEYS,
    )
    return generate_keyring(run_dir / RUN_LOCAL_KEYS)


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
    failure_rows: list[list[Any]]
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


def _show(value: Any) -> str:
    return "none" if value is None else repr(value)


def binding_mismatch(written: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """The first setting that differs between two bindings, as a sentence, or ``None``."""
    for key in sorted(set(written) | set(wanted)):
        if key not in wanted:  # a key this version no longer binds (None is a value, e.g. a target)
            return (
                f"it was written by a fedscan version that bound {key} = {_show(written[key])}, which this "
                "version does not bind; resume it with the version that wrote it, or start afresh"
            )
        if key not in written:
            return (
                f"it was written by a fedscan version that did not bind {key} (this run has {key} = "
                f"{_show(wanted[key])}); resume it with the version that wrote it, or start afresh"
            )
        if written[key] != wanted[key]:
            return (
                f"it was written with {key} = {_show(written[key])}, and this run has "
                f"{key} = {_show(wanted[key])}"
            )
    return None


def load_resume(config: FedscanConfig, num_hospitals: int) -> ResumeState:
    """Read, verify and decrypt the checkpoint named by ``checkpoint.resume_from``.

    Raises
    ------
    ConfigError
        One sentence for a wrong key, a tampered or truncated file, an unknown version, or a
        checkpoint written for another config or federation size (naming the setting and
        both values).
    """
    path = find_checkpoint(config.checkpoint.resume_from)
    source = path.parent.parent
    try:
        keyring = load_keyring(source_key_root(config, source))
        ckpt = read_checkpoint(path, keyring=keyring)
    except (CheckpointError, KeyringError) as err:
        raise ConfigError(f"Cannot resume from '{path}': {err}") from None
    if ckpt.header.kind != "server":
        raise ConfigError(f"Cannot resume from '{path}': it is a {ckpt.header.kind!r} checkpoint, not a server one.")
    if ckpt.header.config_hash != config.config_hash(num_hospitals):
        why = binding_mismatch(ckpt.state.get("binding") or {}, config.binding(num_hospitals))
        raise ConfigError(f"Cannot resume from '{path}': {why or 'it was written for a different config'}.")
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
        failure_rows=state.get("failures", []),
        source_run_dir=source,
        rng_tensors={k: v for k, v in tensors.items() if k.startswith("rng/")},
        rng_state=state["rng"],
    )


class ServerCheckpointer:
    """Writes ``<run>/checkpoints/round-NNNN.ckpt`` every ``checkpoint.every`` rounds."""

    def __init__(
        self, config: FedscanConfig, run_dir: Path, run_id: str, keyring: Keyring, num_hospitals: int
    ) -> None:
        self.config = config
        self.folder = run_dir / CHECKPOINT_DIR
        self.run_id = run_id
        self.keyring = keyring
        self.binding = config.binding(num_hospitals)
        self.config_hash = config.config_hash(num_hospitals)

    def due(self, server_round: int) -> bool:
        every = self.config.checkpoint.every
        last = self.config.train.num_server_rounds
        return every > 0 and (server_round % every == 0 or server_round == last)

    def kept_rounds(self) -> list[int]:
        """Rounds whose server checkpoints are on disk now.

        Hospitals keep the state each of them needs. Not the checkpoint this round will
        write: the run may die before it does (the hospitals' newest state covers it).
        """
        return sorted(int(p.stem.split("-")[-1]) for p in self.folder.glob("round-*.ckpt"))

    def save(
        self,
        server_round: int,
        arrays: ArrayRecord,
        strategy: Strategy,
        metric_rows: list[MetricRow],
        privacy_rows: list[list[Any]],
        client_events: list[dict[str, Any]],
        failure_rows: list[list[Any]],
    ) -> Path:
        rng_tensors, rng_state = _rng_state()
        tensors = {f"arrays/{k}": v for k, v in arrays.to_torch_state_dict().items()}
        tensors.update(_strategy_state(strategy))
        tensors.update(rng_tensors)
        state = {
            "metrics": [[r.round, r.site, r.split, r.metric, r.value] for r in metric_rows],
            "privacy": privacy_rows,
            "client_events": client_events,
            "failures": failure_rows,
            "rng": rng_state,
            "binding": self.binding,
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
