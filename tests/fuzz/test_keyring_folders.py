"""Fuzzing keyring folders: :func:`privacy.keys.load_keyring` loads exactly the good ones.

Each case builds a keyring folder from a recipe (per key file: the right key, another
keyring's key, RSA/EC/X25519 keys in PEM or DER, empty, truncated PEM, 31/33-byte or random
encryption keys, a folder, a FIFO, a symlink to a good file, a dangling or looping symlink,
a huge file; modes 0600, 0644, 0000) and checks the oracle: the folder loads if and only if
every file is a good one, and otherwise fails with one ``KeyringError`` sentence.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from privacy.keys import ENCRYPTION_KEY_FILE, SIGNING_KEY_FILE, VERIFY_KEY_FILE, KeyringError, load_keyring
from server.cli import main
from tests.fuzz._support import assert_cli_contract, assert_one_sentence, count, fuzz_settings, run_cli

PEM, DER = serialization.Encoding.PEM, serialization.Encoding.DER
PKCS8, SPKI = serialization.PrivateFormat.PKCS8, serialization.PublicFormat.SubjectPublicKeyInfo
NONE = serialization.NoEncryption()
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _private(key: object, encoding: serialization.Encoding = PEM) -> bytes:
    return key.private_bytes(encoding, PKCS8, NONE)  # type: ignore[attr-defined]


def _public(key: object, encoding: serialization.Encoding = PEM) -> bytes:
    return key.public_key().public_bytes(encoding, SPKI)  # type: ignore[attr-defined]


GOOD = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()
FOREIGN = {  # other key types, generated once (RSA is slow)
    "rsa": rsa.generate_private_key(public_exponent=65537, key_size=1024),
    "ec": ec.generate_private_key(ec.SECP256R1()),
    "x25519": x25519.X25519PrivateKey.generate(),
}
GOOD_BYTES = {
    ENCRYPTION_KEY_FILE: secrets.token_bytes(32),
    SIGNING_KEY_FILE: _private(GOOD),
    VERIFY_KEY_FILE: _public(GOOD),
}

# Content variants per file: name -> (bytes, is it the good content?)
_COMMON_BAD = {
    "empty": b"",
    "random": secrets.token_bytes(300),
    "huge": b"A" * 70_000,
    "truncated-pem": _private(GOOD)[:60],
    "pem-garbage": b"-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n",
    "encrypted-pem": GOOD.private_bytes(PEM, PKCS8, serialization.BestAvailableEncryption(b"pw")),
    "unicode": "ключ 🔑\n".encode(),
}
VARIANTS: dict[str, dict[str, bytes]] = {
    ENCRYPTION_KEY_FILE: {
        "good": GOOD_BYTES[ENCRYPTION_KEY_FILE], "31-bytes": secrets.token_bytes(31),
        "33-bytes": secrets.token_bytes(33), "pem": _private(GOOD), **_COMMON_BAD,
    },
    SIGNING_KEY_FILE: {
        "good": GOOD_BYTES[SIGNING_KEY_FILE], "mismatched": _private(OTHER), "der": _private(GOOD, DER),
        "public-instead": _public(GOOD), "raw-32": secrets.token_bytes(32),
        **{f"{n}-pem": _private(k) for n, k in FOREIGN.items()}, **_COMMON_BAD,
    },
    VERIFY_KEY_FILE: {
        "good": GOOD_BYTES[VERIFY_KEY_FILE], "mismatched": _public(OTHER), "der": _public(GOOD, DER),
        "private-instead": _private(GOOD), **{f"{n}-pem": _public(k) for n, k in FOREIGN.items()},
        **_COMMON_BAD,
    },
}
SHAPES = ("file", "missing", "folder", "fifo", "symlink", "dangling-symlink", "symlink-loop")
MODES = (0o600, 0o644, 0o640, 0o000, 0o400)


@dataclass(frozen=True)
class FileRecipe:
    content: str
    shape: str
    mode: int

    def is_good(self, name: str) -> bool:
        if self.content != "good" or self.shape not in ("file", "symlink"):
            return False
        secret = name != VERIFY_KEY_FILE
        if secret and self.mode & 0o077:
            return False
        return bool(self.mode & 0o400) or IS_ROOT  # root reads a chmod 000 file

    def build(self, folder: Path, name: str) -> None:
        path, data = folder / name, VARIANTS[name][self.content]
        if self.shape == "missing":
            return
        if self.shape == "folder":
            path.mkdir()
            return
        if self.shape == "fifo":
            os.mkfifo(path)
            return
        if self.shape == "dangling-symlink":
            path.symlink_to(folder / "nowhere")
            return
        if self.shape == "symlink-loop":
            path.symlink_to(path)
            return
        target = path
        if self.shape == "symlink":
            target = folder.parent / f"target-{name}"
            path.symlink_to(target)
        target.write_bytes(data)
        target.chmod(self.mode)


def _file_recipes(name: str) -> st.SearchStrategy[FileRecipe]:
    # Mostly good files, so that cases where exactly one thing is wrong are common.
    content = st.one_of(st.just("good"), st.sampled_from(sorted(VARIANTS[name])))
    shape = st.one_of(st.just("file"), st.sampled_from(SHAPES))
    mode = st.one_of(st.just(0o600), st.sampled_from(MODES))
    return st.builds(FileRecipe, content, shape, mode)


@fuzz_settings(400)
@given(
    recipes=st.fixed_dictionaries({name: _file_recipes(name) for name in VARIANTS}),
    folder_shape=st.sampled_from(["folder", "folder", "folder", "folder", "file", "missing", "symlink"]),
)
def test_load_keyring_loads_exactly_the_good_folders(recipes: dict[str, FileRecipe], folder_shape: str) -> None:
    count("keyring: folder")
    with tempfile.TemporaryDirectory(prefix="fedscan-fuzz-") as tmp:
        # Prepare
        real = Path(tmp) / "real"
        real.mkdir()
        for name, recipe in recipes.items():
            recipe.build(real, name)
        folder = Path(tmp) / "keys"
        if folder_shape == "folder":
            folder = real
        elif folder_shape == "file":
            folder.write_bytes(b"not a folder")
        elif folder_shape == "symlink":
            folder.symlink_to(real)
        should_load = folder_shape in ("folder", "symlink") and all(
            recipe.is_good(name) for name, recipe in recipes.items()
        )

        # Execute
        try:
            keyring = load_keyring(folder)
        except KeyringError as err:
            error: KeyringError | None = err
        else:
            error = None

        # Assert
        if should_load:
            assert error is None, f"{recipes} failed: {error}"
            assert keyring.encryption_key == GOOD_BYTES[ENCRYPTION_KEY_FILE]
        else:
            assert error is not None, f"{recipes} / {folder_shape} was accepted"
            assert_one_sentence(str(error))
            for secret in (GOOD_BYTES[ENCRYPTION_KEY_FILE].hex(), repr(GOOD_BYTES[ENCRYPTION_KEY_FILE])):
                assert secret not in str(error)
        code, out, err = run_cli(main, ["checkpoint", "verify", str(Path(tmp) / "none.ckpt"), "--keyring", str(folder)])
        assert_cli_contract(code, out, err)
        assert code == 2  # a bad keyring or the missing checkpoint: either way one line


def test_unreadable_folder_is_one_sentence_when_not_root(tmp_path: Path) -> None:
    # As root, permissions do not stop reads: the folder then simply loads.
    folder = tmp_path / "keys"
    folder.mkdir()
    for name, data in GOOD_BYTES.items():
        (folder / name).write_bytes(data)
        (folder / name).chmod(0o600)
    folder.chmod(0)
    count("keyring: folder")
    try:
        if IS_ROOT:
            assert load_keyring(folder).encryption_key == GOOD_BYTES[ENCRYPTION_KEY_FILE]
        else:
            try:
                load_keyring(folder)
            except KeyringError as err:
                assert_one_sentence(str(err))
            else:
                raise AssertionError("an unreadable keyring folder loaded")
    finally:
        folder.chmod(0o700)
