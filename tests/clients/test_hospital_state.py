"""A hospital's encrypted state on disk: what is kept, what a resume reads, which keys are used."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.hospital_state import hospital_keyring, load_state, rounds_to_keep, save_state, state_folder
from privacy.checkpoint import CheckpointError
from privacy.keys import KeyringError, generate_keyring


def _save(
    run: Path, keys: Path, rnd: int, kept: list[int], *, site: int = 1, create: bool = True, first: int = 1
) -> None:
    state = {"round": rnd, "first-saved": first}
    save_state(run, keys, site, rnd, "hash", state, kept_server_rounds=kept, create_keys=create)


def _rounds(run: Path, site: int = 1) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in state_folder(run, site).glob("round-*.ckpt"))


def test_every_kept_server_checkpoint_keeps_the_hospital_state_it_needs(tmp_path: Path) -> None:
    # checkpoint.every=2, keep=1: the server keeps only its newest even round. The defect:
    # hospitals pruned to their own newest files and the kept round's state was gone.
    # The hospitals hear of the server checkpoints on disk when a round starts (round r's own
    # checkpoint is written after its hospitals saved their state).
    run, keys = tmp_path / "run", tmp_path / "run" / "keys"
    on_disk_at_start = {1: [], 2: [], 3: [2], 4: [2], 5: [4]}

    for rnd, kept in on_disk_at_start.items():
        _save(run, keys, rnd, kept)

    assert _rounds(run) == [4, 5]
    assert load_state(run, keys, 1, 4, "hash") == {"round": 4, "first-saved": 1}
    assert load_state(run, keys, 1, 5, "hash") == {"round": 5, "first-saved": 1}


def test_a_run_killed_before_its_checkpoint_keeps_the_state_of_the_last_one(tmp_path: Path) -> None:
    # Killed in round 4 after the hospital saved it but before the server wrote round-0004:
    # the resume reads round 2, whose state must still be there.
    run, keys = tmp_path / "run", tmp_path / "keys"
    for rnd, kept in {1: [], 2: [], 3: [2], 4: [2]}.items():
        _save(run, keys, rnd, kept)

    assert load_state(run, keys, 1, 2, "hash") == {"round": 2, "first-saved": 1}


def test_a_hospital_that_sat_rounds_out_resumes_from_its_newest_older_state(tmp_path: Path) -> None:
    run, keys = tmp_path / "run", tmp_path / "keys"
    _save(run, keys, 2, [2])

    assert load_state(run, keys, 1, 7, "hash") == {"round": 2, "first-saved": 1}  # unchanged since round 2
    assert load_state(run, keys, 3, 7, "hash") is None  # never trained: fresh state


def test_a_pruned_state_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    run, keys = tmp_path / "run", tmp_path / "keys"
    _save(run, keys, 5, [5], first=2)

    with pytest.raises(CheckpointError, match="state for round 3 is gone"):
        load_state(run, keys, 1, 3, "hash")


def test_a_hospital_first_saved_after_the_resumed_round_starts_fresh(tmp_path: Path) -> None:
    # Sampled for the first time in round 3: a resume from round 2 must not call that pruned.
    run, keys = tmp_path / "run", tmp_path / "keys"
    _save(run, keys, 3, [2], first=3)

    assert load_state(run, keys, 1, 2, "hash") is None


def test_state_of_another_config_is_refused(tmp_path: Path) -> None:
    run, keys = tmp_path / "run", tmp_path / "keys"
    _save(run, keys, 1, [1])

    with pytest.raises(CheckpointError, match="different config"):
        load_state(run, keys, 1, 1, "other-hash")


def test_keys_are_made_only_when_asked(tmp_path: Path) -> None:
    configured = tmp_path / "configured"
    generate_keyring(configured)

    with pytest.raises(KeyringError):
        _save(tmp_path / "run", configured, 1, [1], create=False)
    assert not (configured / "hospital-0001").exists()  # nothing written into a configured keyring
    assert hospital_keyring(tmp_path / "local", 1, create=True).key_id == hospital_keyring(tmp_path / "local", 1).key_id


@pytest.mark.parametrize(
    ("saved", "kept", "expected"),
    [([], [3], set()), ([1, 2, 3], [], {3}), ([1, 3, 6], [2, 4, 5], {1, 3, 6}), ([2, 4, 6, 8], [4, 6], {4, 6, 8})],
)
def test_rounds_to_keep(saved: list[int], kept: list[int], expected: set[int]) -> None:
    assert rounds_to_keep(saved, kept) == expected
