"""Keyring: generation, safe file permissions, loading errors, no key bytes in messages."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.keys import (
    ENCRYPTION_KEY_FILE,
    SIGNING_KEY_FILE,
    VERIFY_KEY_FILE,
    Keyring,
    KeyringError,
    generate_keyring,
    key_id_for,
    load_keyring,
)

posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _secret_strings(keyring: Keyring) -> list[str]:
    raw_private = keyring.signing_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return [
        keyring.encryption_key.hex(),
        repr(keyring.encryption_key),
        raw_private.hex(),
        repr(raw_private),
    ]


def test_generate_then_load_round_trips(tmp_path: Path) -> None:
    written = generate_keyring(tmp_path / "keys")

    loaded = load_keyring(tmp_path / "keys")

    assert loaded.encryption_key == written.encryption_key
    assert loaded.key_id == written.key_id == key_id_for(written.verify_key)
    assert len(loaded.key_id) == 16
    assert int(loaded.key_id, 16) >= 0
    signature = written.signing_key.sign(b"msg")
    loaded.verify_key.verify(signature, b"msg")  # raises if the keys do not match


@posix_only
def test_files_are_private_and_folder_is_0700(tmp_path: Path) -> None:
    folder = tmp_path / "keys"

    generate_keyring(folder)

    assert _mode(folder) == 0o700
    assert _mode(folder / ENCRYPTION_KEY_FILE) == 0o600
    assert _mode(folder / SIGNING_KEY_FILE) == 0o600
    assert _mode(folder / VERIFY_KEY_FILE) & 0o022 == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [ENCRYPTION_KEY_FILE, SIGNING_KEY_FILE, VERIFY_KEY_FILE]
    )


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    first = generate_keyring(tmp_path)

    with pytest.raises(KeyringError, match="overwrite=True"):
        generate_keyring(tmp_path)
    assert load_keyring(tmp_path).key_id == first.key_id

    second = generate_keyring(tmp_path, overwrite=True)
    assert load_keyring(tmp_path).key_id == second.key_id != first.key_id


def test_missing_folder_and_file_are_named(tmp_path: Path) -> None:
    with pytest.raises(KeyringError, match="does not exist"):
        load_keyring(tmp_path / "nowhere")

    generate_keyring(tmp_path)
    (tmp_path / SIGNING_KEY_FILE).unlink()
    with pytest.raises(KeyringError, match=r"signing\.key' is missing"):
        load_keyring(tmp_path)


def test_wrong_length_encryption_key(tmp_path: Path) -> None:
    generate_keyring(tmp_path)
    path = tmp_path / ENCRYPTION_KEY_FILE
    path.write_bytes(path.read_bytes()[:31])

    with pytest.raises(KeyringError, match=r"exactly 32 raw bytes.*Got 31 bytes"):
        load_keyring(tmp_path)


@posix_only
def test_permissions_too_open_tell_to_chmod(tmp_path: Path) -> None:
    generate_keyring(tmp_path)
    os.chmod(tmp_path / SIGNING_KEY_FILE, 0o644)

    with pytest.raises(KeyringError, match=r"mode 0644.*chmod 600"):
        load_keyring(tmp_path)


def test_unparsable_pem(tmp_path: Path) -> None:
    generate_keyring(tmp_path)
    (tmp_path / VERIFY_KEY_FILE).write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot base64\n")

    with pytest.raises(KeyringError, match=r"verify\.pub' is not a PEM"):
        load_keyring(tmp_path)


def test_verify_key_must_match_signing_key(tmp_path: Path) -> None:
    generate_keyring(tmp_path / "a")
    generate_keyring(tmp_path / "b")
    (tmp_path / "a" / VERIFY_KEY_FILE).write_bytes((tmp_path / "b" / VERIFY_KEY_FILE).read_bytes())

    with pytest.raises(KeyringError, match="does not match"):
        load_keyring(tmp_path / "a")


def test_repr_and_errors_hide_key_bytes(tmp_path: Path) -> None:
    keyring = generate_keyring(tmp_path)

    text = repr(keyring) + str(keyring)

    assert text == f"Keyring(key_id={keyring.key_id!r})" * 2
    for secret in _secret_strings(keyring):
        assert secret not in text
    with pytest.raises(KeyringError) as info:
        Keyring(keyring.encryption_key[:5], keyring.signing_key, keyring.verify_key, keyring.key_id)
    assert keyring.encryption_key[:5].hex() not in str(info.value)
    assert repr(keyring.encryption_key[:5]) not in str(info.value)


def test_keyring_rejects_mismatched_public_key() -> None:
    signing = Ed25519PrivateKey.generate()
    other = Ed25519PrivateKey.generate().public_key()

    with pytest.raises(KeyringError, match="not the public half"):
        Keyring(bytes(32), signing, other, key_id_for(other))


@posix_only
def test_unreadable_key_file_is_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a key file nobody may read. Root reads it anyway, so there the OS refusal a
    # normal user gets is reproduced at the open() call.
    generate_keyring(tmp_path)
    path = tmp_path / SIGNING_KEY_FILE
    path.chmod(0)
    if os.geteuid() == 0:
        real_open = Path.open

        def refuse(self: Path, *args: object, **kwargs: object) -> object:
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(Path, "open", refuse)

    # Execute / Assert
    with pytest.raises(KeyringError, match=r"signing\.key' cannot be read: Permission denied\.$"):
        load_keyring(tmp_path)


@pytest.mark.parametrize("shape", ["folder", "fifo", "huge"])
def test_key_file_of_the_wrong_kind_is_named(tmp_path: Path, shape: str) -> None:
    generate_keyring(tmp_path)
    path = tmp_path / ENCRYPTION_KEY_FILE
    path.unlink()
    if shape == "folder":
        path.mkdir()
    elif shape == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(b"\0" * 100_000)
        path.chmod(0o600)

    expected = {"folder": "is a folder", "fifo": "is not a regular file", "huge": "100000 bytes, far larger"}[shape]
    with pytest.raises(KeyringError, match=expected):
        load_keyring(tmp_path)
