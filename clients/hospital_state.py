"""A hospital's private state at rest: encrypted and signed with the hospital's own key.

Whenever its state changes (a round it trains, declines or fails), a hospital writes
``<run>/hospitals/hospital-NNNN/round-RRRR.ckpt`` holding its privacy ledger and round
bookkeeping. A resumed run reads, for the round it resumes from, the newest file at or
before that round: a hospital that sat rounds out (sampling) has not changed since.

Keys: ``<key root>/hospital-NNNN/``. With a configured keyring (``checkpoint.keyring``) the
key root is that folder and the hospital's keys must already be there (``fedscan keygen DIR
--hospitals N``); only a run-local key root (``<run>/keys``, which the run created) is ever
written to, by the hospital on first use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from privacy.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from privacy.keys import Keyring, generate_keyring, load_keyring

_ROUND_FILE = re.compile(r"^round-(\d+)\.ckpt$")


def hospital_key_folder(key_root: str | Path, site: int) -> Path:
    return Path(key_root) / f"hospital-{site:04d}"


def hospital_keyring(key_root: str | Path, site: int, *, create: bool = False) -> Keyring:
    """Hospital ``site``'s keyring under ``key_root``; made there only when ``create``."""
    folder = hospital_key_folder(key_root, site)
    if create and not (folder / "encryption.key").exists():
        return generate_keyring(folder)
    return load_keyring(folder)


def state_folder(run_dir: str | Path, site: int) -> Path:
    return Path(run_dir) / "hospitals" / f"hospital-{site:04d}"


def state_path(run_dir: str | Path, site: int, server_round: int) -> Path:
    return state_folder(run_dir, site) / f"round-{server_round:04d}.ckpt"


def _saved_rounds(run_dir: str | Path, site: int) -> list[int]:
    folder = state_folder(run_dir, site)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _ROUND_FILE.match(p.name)))


def rounds_to_keep(saved: Iterable[int], kept_server_rounds: Iterable[int]) -> set[int]:
    """The state files a hospital must keep: for each kept server checkpoint, the newest
    file at or before its round (what a resume from it reads), and the newest file of all
    (what the next server checkpoint will need)."""
    saved = sorted(saved)
    keep = {saved[-1]} if saved else set()
    for k in kept_server_rounds:
        older = [r for r in saved if r <= k]
        if older:
            keep.add(older[-1])
    return keep


def save_state(
    run_dir: str | Path,
    key_root: str | Path,
    site: int,
    server_round: int,
    config_hash: str,
    state: dict[str, Any],
    *,
    kept_server_rounds: Iterable[int],
    create_keys: bool,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write hospital ``site``'s state after ``server_round``; prune what no kept checkpoint needs.

    ``state["first-saved"]`` (the round of the hospital's first saved state, carried from
    file to file) tells a later resume "no state yet" from "state pruned". ``tensors`` are the
    weights that never leave the hospital (FedBN's normalisation layers, a local-only model).
    """
    path = write_checkpoint(
        state_path(run_dir, site, server_round),
        keyring=hospital_keyring(key_root, site, create=create_keys),
        kind="hospital",
        run_id=f"hospital-{site}",
        round=server_round,
        config_hash=config_hash,
        tensors=dict(tensors or {}),
        state=state,
    )
    saved = _saved_rounds(run_dir, site)
    keep = rounds_to_keep(saved, kept_server_rounds)
    for r in saved:
        if r not in keep:
            state_path(run_dir, site, r).unlink(missing_ok=True)
    return path


def load_state(
    run_dir: str | Path, key_root: str | Path, site: int, server_round: int, config_hash: str
) -> dict[str, Any] | None:
    """The state hospital ``site`` had after ``server_round`` in the run ``run_dir``.

    ``None`` if the hospital had no state yet after ``server_round`` (it had not trained).
    The weights it keeps locally, if it has any, come back under ``state["tensors"]`` (name -> tensor,
    bit-identical to those saved).

    Raises
    ------
    CheckpointError
        If the needed file was pruned, or does not verify, decrypt or match the config.
    """

    def read(rnd: int) -> dict[str, Any]:
        checkpoint = read_checkpoint(
            state_path(run_dir, site, rnd),
            keyring=hospital_keyring(key_root, site),
            expected_run_id=f"hospital-{site}",
            expected_config_hash=config_hash,
        )
        state = dict(checkpoint.state)
        if checkpoint.tensors:
            state["tensors"] = dict(checkpoint.tensors)
        return state

    saved = _saved_rounds(run_dir, site)
    older = [r for r in saved if r <= server_round]
    if older:
        return read(older[-1])
    if saved and int(read(saved[0]).get("first-saved", 0)) <= server_round:
        raise CheckpointError(
            f"Hospital {site}'s state for round {server_round} is gone from '{state_folder(run_dir, site)}' "
            f"(it holds rounds {', '.join(map(str, saved))} only)."
        )
    return None
