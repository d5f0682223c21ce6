"""A hospital's private state at rest: encrypted and signed with the hospital's own key.

After every round a hospital writes ``<run>/hospitals/hospital-NNNN/round-RRRR.ckpt``
holding its privacy ledger and round bookkeeping; a resumed run reads the file of the
round it resumes from, so every hospital continues its epsilon exactly where it was.
The keys live in ``<key root>/hospital-NNNN/`` and are made by the hospital on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from privacy.checkpoint import prune_checkpoints, read_checkpoint, write_checkpoint
from privacy.keys import Keyring, generate_keyring, load_keyring


def hospital_keyring(key_root: str | Path, site: int) -> Keyring:
    folder = Path(key_root) / f"hospital-{site:04d}"
    if (folder / "encryption.key").exists():
        return load_keyring(folder)
    return generate_keyring(folder)


def state_path(run_dir: str | Path, site: int, server_round: int) -> Path:
    return Path(run_dir) / "hospitals" / f"hospital-{site:04d}" / f"round-{server_round:04d}.ckpt"


def save_state(
    run_dir: str | Path, key_root: str | Path, site: int, server_round: int, config_hash: str, state: dict[str, Any], keep: int
) -> Path:
    path = write_checkpoint(
        state_path(run_dir, site, server_round),
        keyring=hospital_keyring(key_root, site),
        kind="hospital",
        run_id=f"hospital-{site}",
        round=server_round,
        config_hash=config_hash,
        tensors={},
        state=state,
    )
    prune_checkpoints(path.parent, keep=keep)
    return path


def load_state(run_dir: str | Path, key_root: str | Path, site: int, server_round: int, config_hash: str) -> dict[str, Any]:
    """The state hospital ``site`` saved after ``server_round``; raises CheckpointError."""
    ckpt = read_checkpoint(
        state_path(run_dir, site, server_round),
        keyring=hospital_keyring(key_root, site),
        expected_run_id=f"hospital-{site}",
        expected_config_hash=config_hash,
    )
    return ckpt.state
