"""Encrypted, signed checkpoints: round trip, every tamper detected, atomic writes, pruning."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privacy.checkpoint import (
    FORMAT_VERSION,
    MAGIC,
    CheckpointError,
    CheckpointMismatch,
    CorruptCheckpoint,
    NotACheckpoint,
    TamperedCheckpoint,
    TruncatedCheckpoint,
    UnsupportedVersion,
    WrongKey,
    prune_checkpoints,
    read_checkpoint,
    read_header,
    verify_checkpoint,
    write_checkpoint,
)
from privacy.keys import Keyring


@pytest.fixture(scope="module")
def keyring() -> Keyring:
    return Keyring.generate()


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "w": torch.tensor([[1.5, -0.0], [float("nan"), float("inf")]], dtype=torch.float32),
        "b": torch.arange(3, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "half": torch.tensor([0.1, 2.0], dtype=torch.bfloat16),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "c": torch.tensor([1 + 2j], dtype=torch.complex64),
        "view": torch.arange(12, dtype=torch.float32).reshape(3, 4)[:, 1],  # strided view
    }


STATE: dict[str, Any] = {
    "lr": 0.01,
    "step": 7,
    "name": "fedavg",
    "hist": [1, 2.5, None, True],
    "nest": {"a": []},
}


def _write(path: Path, keyring: Keyring, **overrides: Any) -> Path:
    kwargs: dict[str, Any] = {
        "keyring": keyring,
        "kind": "server",
        "run_id": "run-1",
        "round": 3,
        "config_hash": "abc123",
        "tensors": _tensors(),
        "state": STATE,
        "meta": {"model": "tiny-cnn"},
    }
    kwargs.update(overrides)
    return write_checkpoint(path, **kwargs)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def test_round_trip_is_bit_identical(tmp_path: Path, keyring: Keyring) -> None:
    path = _write(tmp_path / "round-3.ckpt", keyring)

    ckpt = read_checkpoint(path, keyring=keyring, expected_run_id="run-1", expected_config_hash="abc123")

    original = _tensors()
    assert list(ckpt.tensors) == list(original)
    for name, tensor in original.items():
        loaded = ckpt.tensors[name]
        assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape, name
        assert _bits(loaded) == _bits(tensor), name
    assert ckpt.state == STATE
    h = ckpt.header
    assert (h.kind, h.run_id, h.round, h.config_hash, h.meta, h.version) == (
        "server",
        "run-1",
        3,
        "abc123",
        {"model": "tiny-cnn"},
        FORMAT_VERSION,
    )
    assert h.key_id == keyring.key_id
    assert h.created.endswith("+00:00")


def test_header_readable_and_verifiable_without_decryption_key(tmp_path: Path, keyring: Keyring) -> None:
    path = _write(tmp_path / "c.ckpt", keyring)

    header = read_header(path)

    assert header == read_checkpoint(path, keyring=keyring).header
    assert verify_checkpoint(path, verify_key=keyring.verify_key) == header


def test_payload_is_encrypted(tmp_path: Path, keyring: Keyring) -> None:
    path = _write(tmp_path / "c.ckpt", keyring, state={"secret": "PATIENT-0042"})

    data = path.read_bytes()

    assert data.startswith(MAGIC)
    assert b"PATIENT-0042" not in data and b"fedavg" not in data
    assert b"tiny-cnn" in data  # meta is public by design


def test_every_single_byte_flip_is_detected(tmp_path: Path, keyring: Keyring) -> None:
    tensors = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3], dtype=torch.int32)}
    original = _write(tmp_path / "c.ckpt", keyring, tensors=tensors, state={"s": 1}).read_bytes()
    assert len(original) < 4096
    target = tmp_path / "flipped.ckpt"

    for position in range(len(original)):
        for mask in (0x01, 0xFF):
            data = bytearray(original)
            data[position] ^= mask
            target.write_bytes(bytes(data))
            try:
                read_checkpoint(target, keyring=keyring)
            except CheckpointError:
                continue
            pytest.fail(f"flip {mask:#04x} at byte {position} of {len(original)} went undetected")


def test_truncation_is_detected(tmp_path: Path, keyring: Keyring) -> None:
    original = _write(tmp_path / "c.ckpt", keyring).read_bytes()
    target = tmp_path / "t.ckpt"

    for length in (
        0,
        5,
        len(MAGIC),
        len(MAGIC) + 3,
        40,
        len(original) // 2,
        len(original) - 64,
        len(original) - 1,
    ):
        target.write_bytes(original[:length])
        with pytest.raises(CheckpointError):
            read_checkpoint(target, keyring=keyring)
    target.write_bytes(original[:-1])
    with pytest.raises(TruncatedCheckpoint, match="truncated"):
        read_checkpoint(target, keyring=keyring)
    target.write_bytes(original + b"\0")
    with pytest.raises(TruncatedCheckpoint, match="unexpected bytes"):
        read_checkpoint(target, keyring=keyring)


def test_not_a_checkpoint(tmp_path: Path, keyring: Keyring) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(b"PK\x03\x04 a zip file, not ours" * 4)

    with pytest.raises(NotACheckpoint, match="not a fedscan checkpoint"):
        read_checkpoint(path, keyring=keyring)
    with pytest.raises(NotACheckpoint):
        read_header(path)


def test_unknown_version_names_both_versions(tmp_path: Path, keyring: Keyring) -> None:
    path = _write(tmp_path / "c.ckpt", keyring)
    data = bytearray(path.read_bytes())
    data[len(MAGIC) : len(MAGIC) + 2] = struct.pack(">H", 7)
    path.write_bytes(bytes(data))

    for call in (lambda: read_header(path), lambda: read_checkpoint(path, keyring=keyring)):
        with pytest.raises(UnsupportedVersion, match="format version 7.*not supported.*reads version 1"):
            call()


def test_wrong_encryption_key(tmp_path: Path, keyring: Keyring) -> None:
    path = _write(tmp_path / "c.ckpt", keyring)
    same_signer = Keyring.from_keys(os.urandom(32), keyring.signing_key)

    with pytest.raises(WrongKey, match="encryption key is not the one"):
        read_checkpoint(path, keyring=same_signer)


def test_wrong_signing_key_names_both_key_ids(tmp_path: Path, keyring: Keyring) -> None:
    path = _write(tmp_path / "c.ckpt", keyring)
    other = Keyring.generate()

    with pytest.raises(WrongKey) as info:
        read_checkpoint(path, keyring=other)
    assert keyring.key_id in str(info.value) and other.key_id in str(info.value)
    with pytest.raises(WrongKey):
        verify_checkpoint(path, verify_key=other.verify_key)


def test_forged_key_id_is_reported_as_tampering(tmp_path: Path, keyring: Keyring) -> None:
    # Another signer that copies our key id into its header still fails the signature.
    other = Keyring.generate()
    path = _write(tmp_path / "c.ckpt", other)
    data = path.read_bytes().replace(other.key_id.encode(), keyring.key_id.encode())
    path.write_bytes(data)

    with pytest.raises(TamperedCheckpoint, match="invalid signature"):
        read_checkpoint(path, keyring=keyring)


def test_config_and_run_mismatch(tmp_path: Path, keyring: Keyring) -> None:
    path = _write(tmp_path / "c.ckpt", keyring)

    with pytest.raises(CheckpointMismatch, match="written for a different config"):
        read_checkpoint(path, keyring=keyring, expected_config_hash="zzz")
    with pytest.raises(CheckpointMismatch, match="'run-1'.*'run-2'"):
        read_checkpoint(path, keyring=keyring, expected_run_id="run-2")


def test_crash_before_rename_keeps_previous_checkpoint(
    tmp_path: Path, keyring: Keyring, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "latest.ckpt", keyring, round=1)
    before = path.read_bytes()

    def crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        _write(path, keyring, round=2)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert read_checkpoint(path, keyring=keyring).header.round == 1
    assert [p.name for p in tmp_path.iterdir()] == ["latest.ckpt"]


def test_overwrite_replaces_atomically(tmp_path: Path, keyring: Keyring) -> None:
    path = _write(tmp_path / "latest.ckpt", keyring, round=1)

    _write(path, keyring, round=2)

    assert read_checkpoint(path, keyring=keyring).header.round == 2
    assert [p.name for p in tmp_path.iterdir()] == ["latest.ckpt"]


def test_prune_keeps_newest_by_round_number(tmp_path: Path) -> None:
    for rnd in (1, 2, 9, 10, 100):
        (tmp_path / f"round-{rnd}.ckpt").write_bytes(b"x")
    (tmp_path / "other.txt").write_bytes(b"x")

    removed = prune_checkpoints(tmp_path, keep=2)

    assert [p.name for p in removed] == ["round-1.ckpt", "round-2.ckpt", "round-9.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt", "round-10.ckpt", "round-100.ckpt"]
    assert prune_checkpoints(tmp_path, keep=5) == []
    with pytest.raises(ValueError, match="'keep' parameter of prune_checkpoints"):
        prune_checkpoints(tmp_path, keep=-1)


def test_invalid_arguments_have_clear_messages(tmp_path: Path, keyring: Keyring) -> None:
    with pytest.raises(TypeError, match=r"'state' parameter.*tuple at state\['t'\].*use a list"):
        _write(tmp_path / "c.ckpt", keyring, state={"t": (1, 2)})
    with pytest.raises(ValueError, match="'round' parameter of write_checkpoint must be an int >= 0. Got -1"):
        _write(tmp_path / "c.ckpt", keyring, round=-1)
    with pytest.raises(TypeError, match="'tensors' parameter"):
        _write(tmp_path / "c.ckpt", keyring, tensors={"x": [1.0]})
    assert not list(tmp_path.iterdir())


def test_state_keeps_nan_and_header_is_frozen(tmp_path: Path, keyring: Keyring) -> None:
    path = _write(tmp_path / "c.ckpt", keyring, state={"loss": float("nan")})

    ckpt = read_checkpoint(path, keyring=keyring)

    assert math.isnan(ckpt.state["loss"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        ckpt.header.round = 0  # type: ignore[misc]


class _Marker:
    """Unpickling this object creates a file: the observable side effect of unpickling."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def _signed_container(keyring: Keyring, payload: bytes) -> bytes:
    """A container laid out as write_checkpoint writes it, validly signed and encrypted, around
    an arbitrary payload: only the payload decoder stands between it and the caller."""
    nonce = os.urandom(12)
    header = json.dumps(
        {"format": FORMAT_VERSION, "kind": "server", "run_id": "run-1", "round": 1, "config_hash": "",
         "created": "2026-01-01T00:00:00.000+00:00", "key_id": keyring.key_id, "nonce": nonce.hex(),
         "meta": {}},
        sort_keys=True,
    ).encode()
    version = struct.pack(">H", FORMAT_VERSION)
    ciphertext = AESGCM(keyring.encryption_key).encrypt(nonce, payload, MAGIC + version + header)
    signed = MAGIC + version + struct.pack(">I", len(header)) + header + struct.pack(">Q", len(ciphertext)) + ciphertext
    return signed + keyring.signing_key.sign(hashlib.sha256(signed).digest())


def test_a_signed_pickle_payload_is_refused_without_being_unpickled(tmp_path: Path, keyring: Keyring) -> None:
    # Prepare: three authentic files whose payloads would create a marker file if unpickled:
    # a raw pickle, a torch.save archive, and a pickle behind a well-formed index length.
    marker = tmp_path / "unpickled.marker"
    raw = pickle.dumps({"state": _Marker(marker)})
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2), "evil": _Marker(marker)}, buffer)
    payloads = {
        "pickle": raw,
        "torch.save": buffer.getvalue(),
        "pickle-as-index": struct.pack(">Q", len(raw)) + raw,
    }
    assert pickle.loads(raw) and marker.exists()  # the payload really is live
    marker.unlink()

    for name, payload in payloads.items():
        path = tmp_path / f"{name}.ckpt"
        path.write_bytes(_signed_container(keyring, payload))
        assert verify_checkpoint(path, verify_key=keyring.verify_key).run_id == "run-1"  # authentic

        # Execute
        with pytest.raises(CorruptCheckpoint, match="malformed payload") as info:
            read_checkpoint(path, keyring=keyring)

        # Assert
        assert not marker.exists(), f"the {name} payload was unpickled"
        assert isinstance(info.value, CheckpointError) and "\n" not in str(info.value)
