"""Key material for encrypted, signed checkpoints.

A :class:`Keyring` holds the three keys one hospital (or the server) owns: a 32-byte
AES-256 key that encrypts checkpoint payloads, an Ed25519 private key that signs them, and
the matching public key that anyone may use to verify a checkpoint without decrypting it.

On disk a keyring is a folder (mode ``0700``) of three files::

    encryption.key   raw 32 bytes                          mode 0600
    signing.key      Ed25519 private key, PEM PKCS8        mode 0600
    verify.pub       Ed25519 public key, PEM SPKI          mode 0644

Key bytes never appear in a ``repr``, a ``str`` or an exception message; only the
:attr:`Keyring.key_id` (a fingerprint of the public key) does.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

__all__ = [
    "ENCRYPTION_KEY_BYTES",
    "ENCRYPTION_KEY_FILE",
    "SIGNING_KEY_FILE",
    "VERIFY_KEY_FILE",
    "Keyring",
    "KeyringError",
    "generate_keyring",
    "key_id_for",
    "load_keyring",
]

ENCRYPTION_KEY_FILE = "encryption.key"
SIGNING_KEY_FILE = "signing.key"
VERIFY_KEY_FILE = "verify.pub"
ENCRYPTION_KEY_BYTES = 32
"""AES-256 key length in bytes."""

_SECRET_FILES = (ENCRYPTION_KEY_FILE, SIGNING_KEY_FILE)


class KeyringError(ValueError):
    """A keyring folder, key file or key is missing, malformed or unsafe.

    The message names the file and what is wrong with it, never the key bytes.
    """


def key_id_for(verify_key: Ed25519PublicKey) -> str:
    """Fingerprint of a public key: the first 16 hex characters of SHA-256 of its raw bytes.

    Parameters
    ----------
    verify_key : Ed25519PublicKey
        The public (verify) key.

    Returns
    -------
    str
        16 lowercase hex characters.
    """
    raw = verify_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True, repr=False, eq=False)
class Keyring:
    """The keys that encrypt, sign and verify one owner's checkpoints.

    Validated on construction. ``repr`` shows only :attr:`key_id`, never key bytes.
    Compared by identity (key objects do not define equality).

    Parameters
    ----------
    encryption_key : bytes
        32 raw bytes, the AES-256-GCM key.
    signing_key : Ed25519PrivateKey
        Signs checkpoints.
    verify_key : Ed25519PublicKey
        Public half of ``signing_key``; verifies checkpoints.
    key_id : str
        ``key_id_for(verify_key)``: 16 hex characters naming the keyring in checkpoint
        headers and error messages.

    Raises
    ------
    KeyringError
        If a key has the wrong type or length, ``verify_key`` is not the public half of
        ``signing_key``, or ``key_id`` does not match ``verify_key``.
    """

    encryption_key: bytes
    signing_key: Ed25519PrivateKey
    verify_key: Ed25519PublicKey
    key_id: str

    def __post_init__(self) -> None:
        if not isinstance(self.encryption_key, bytes):
            raise KeyringError(
                "The 'encryption_key' parameter of Keyring must be bytes. "
                f"Got {type(self.encryption_key).__name__} instead."
            )
        if len(self.encryption_key) != ENCRYPTION_KEY_BYTES:
            raise KeyringError(
                "The 'encryption_key' parameter of Keyring must be exactly "
                f"{ENCRYPTION_KEY_BYTES} bytes (AES-256). Got {len(self.encryption_key)} "
                "bytes instead."
            )
        if not isinstance(self.signing_key, Ed25519PrivateKey):
            raise KeyringError(
                "The 'signing_key' parameter of Keyring must be an Ed25519PrivateKey. "
                f"Got {type(self.signing_key).__name__} instead."
            )
        if not isinstance(self.verify_key, Ed25519PublicKey):
            raise KeyringError(
                "The 'verify_key' parameter of Keyring must be an Ed25519PublicKey. "
                f"Got {type(self.verify_key).__name__} instead."
            )
        if _raw_public(self.signing_key.public_key()) != _raw_public(self.verify_key):
            raise KeyringError(
                "The 'verify_key' of Keyring is not the public half of its 'signing_key' "
                f"(verify key id {key_id_for(self.verify_key)}, signing key id "
                f"{key_id_for(self.signing_key.public_key())})."
            )
        expected = key_id_for(self.verify_key)
        if self.key_id != expected:
            raise KeyringError(
                f"The 'key_id' parameter of Keyring must be {expected!r} (derived from "
                f"'verify_key'). Got {self.key_id!r} instead."
            )

    @classmethod
    def from_keys(cls, encryption_key: bytes, signing_key: Ed25519PrivateKey) -> Keyring:
        """Build a keyring, deriving ``verify_key`` and ``key_id`` from ``signing_key``."""
        verify_key = signing_key.public_key()
        return cls(encryption_key, signing_key, verify_key, key_id_for(verify_key))

    @classmethod
    def generate(cls) -> Keyring:
        """A fresh in-memory keyring from the operating system's CSPRNG."""
        return cls.from_keys(secrets.token_bytes(ENCRYPTION_KEY_BYTES), Ed25519PrivateKey.generate())

    def __repr__(self) -> str:
        return f"Keyring(key_id={self.key_id!r})"

    __str__ = __repr__


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL + an explicit mode: the file never exists with wider permissions, and a
    # concurrent writer is refused rather than raced.
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_keyring(folder: str | os.PathLike[str], *, overwrite: bool = False) -> Keyring:
    """Create a fresh keyring and write it to ``folder``.

    The folder is created with mode ``0700`` if missing (an existing folder keeps its
    mode). Secret key files are created with mode ``0600`` through ``O_CREAT | O_EXCL``,
    so they never exist with wider permissions; ``verify.pub`` gets ``0644``. Each file is
    written to a temporary name and then renamed into place.

    Parameters
    ----------
    folder : str or PathLike
        Keyring folder.
    overwrite : bool, default False
        Replace existing key files. Without it, any existing key file is an error:
        overwriting keys makes every checkpoint written with them unreadable.

    Returns
    -------
    Keyring
        The keys just written.

    Raises
    ------
    KeyringError
        If a key file already exists and ``overwrite`` is False, or ``folder`` is not a
        folder.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise KeyringError(f"Keyring folder '{folder}' exists but is not a folder.")
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
        os.chmod(folder, 0o700)  # mkdir's mode is reduced by the umask; be explicit
    names = (ENCRYPTION_KEY_FILE, SIGNING_KEY_FILE, VERIFY_KEY_FILE)
    existing = [name for name in names if (folder / name).exists()]
    if existing and not overwrite:
        raise KeyringError(
            f"Keyring folder '{folder}' already holds {', '.join(existing)}; refusing to "
            "overwrite keys (checkpoints written with them would become unreadable). "
            "Pass overwrite=True to replace them."
        )

    keyring = Keyring.generate()
    contents = {
        ENCRYPTION_KEY_FILE: (keyring.encryption_key, 0o600),
        SIGNING_KEY_FILE: (
            keyring.signing_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            0o600,
        ),
        VERIFY_KEY_FILE: (
            keyring.verify_key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            0o644,
        ),
    }
    for name, (data, mode) in contents.items():
        tmp = folder / f".{name}.{secrets.token_hex(8)}.tmp"
        try:
            _write_new_file(tmp, data, mode)
            os.replace(tmp, folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    _fsync_dir(folder)
    return keyring


_MAX_KEY_FILE_BYTES = 64 * 1024
"""A key file is a few hundred bytes; anything far larger is not one (and is not read)."""


def _os_reason(err: OSError) -> str:
    return " ".join(str(err.strerror or type(err).__name__).split())


def _read_key_file(folder: Path, name: str) -> bytes:
    path = folder / name
    try:
        info = path.stat()  # follows a symlink: the target must be a private regular file
    except FileNotFoundError:
        raise KeyringError(
            f"Key file '{path}' is missing; a keyring folder holds {ENCRYPTION_KEY_FILE}, "
            f"{SIGNING_KEY_FILE} and {VERIFY_KEY_FILE} (create them with `fedscan keygen DIR`)."
        ) from None
    except OSError as err:  # permission denied on the folder, a symlink loop, ...
        raise KeyringError(f"Key file '{path}' cannot be read: {_os_reason(err)}.") from None
    if stat.S_ISDIR(info.st_mode):
        raise KeyringError(
            f"Key file '{path}' is a folder; it must be a file written by `fedscan keygen DIR`."
        )
    if not stat.S_ISREG(info.st_mode):
        raise KeyringError(
            f"Key file '{path}' is not a regular file; it must be a file written by `fedscan keygen DIR`."
        )
    if name in _SECRET_FILES and os.name != "nt":
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise KeyringError(
                f"Key file '{path}' is accessible by group or others (mode {mode:04o}); "
                f"it must be private to its owner: run chmod 600 '{path}'."
            )
    if info.st_size > _MAX_KEY_FILE_BYTES:
        raise KeyringError(
            f"Key file '{path}' is {info.st_size} bytes, far larger than a key file; it is not one."
        )
    try:
        with path.open("rb") as handle:
            return handle.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as err:
        raise KeyringError(f"Key file '{path}' cannot be read: {_os_reason(err)}.") from None


def load_keyring(folder: str | os.PathLike[str]) -> Keyring:
    """Load and check a keyring written by :func:`generate_keyring`.

    Parameters
    ----------
    folder : str or PathLike
        Keyring folder.

    Returns
    -------
    Keyring

    Raises
    ------
    KeyringError
        If the folder or a file is missing, a secret key file is accessible by group or
        others, ``encryption.key`` is not exactly 32 bytes, a PEM file cannot be parsed as
        an Ed25519 key, or ``verify.pub`` is not the public half of ``signing.key``.
    """
    folder = Path(folder)
    try:
        is_dir = folder.is_dir()
    except OSError as err:  # e.g. a parent folder we may not enter
        raise KeyringError(f"Keyring folder '{folder}' cannot be read: {_os_reason(err)}.") from None
    if not is_dir:
        raise KeyringError(
            f"Keyring folder '{folder}' does not exist or is not a folder; create one with `fedscan keygen DIR`."
        )
    encryption_key = _read_key_file(folder, ENCRYPTION_KEY_FILE)
    if len(encryption_key) != ENCRYPTION_KEY_BYTES:
        raise KeyringError(
            f"Key file '{folder / ENCRYPTION_KEY_FILE}' must hold exactly "
            f"{ENCRYPTION_KEY_BYTES} raw bytes (AES-256). Got {len(encryption_key)} bytes "
            "instead."
        )

    signing_pem = _read_key_file(folder, SIGNING_KEY_FILE)
    try:
        signing_key = serialization.load_pem_private_key(signing_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # `from None`: never chain parser errors that might quote key material.
        raise KeyringError(
            f"Key file '{folder / SIGNING_KEY_FILE}' is not an unencrypted PEM (PKCS8) private key."
        ) from None
    if not isinstance(signing_key, Ed25519PrivateKey):
        raise KeyringError(
            f"Key file '{folder / SIGNING_KEY_FILE}' must hold an Ed25519 private key. "
            f"Got {type(signing_key).__name__} instead."
        )

    verify_pem = _read_key_file(folder, VERIFY_KEY_FILE)
    try:
        verify_key = serialization.load_pem_public_key(verify_pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyringError(
            f"Key file '{folder / VERIFY_KEY_FILE}' is not a PEM (SubjectPublicKeyInfo) public key."
        ) from None
    if not isinstance(verify_key, Ed25519PublicKey):
        raise KeyringError(
            f"Key file '{folder / VERIFY_KEY_FILE}' must hold an Ed25519 public key. "
            f"Got {type(verify_key).__name__} instead."
        )
    if _raw_public(verify_key) != _raw_public(signing_key.public_key()):
        raise KeyringError(
            f"Key file '{folder / VERIFY_KEY_FILE}' (key id {key_id_for(verify_key)}) does "
            f"not match '{folder / SIGNING_KEY_FILE}' (key id "
            f"{key_id_for(signing_key.public_key())}); regenerate the keyring or restore the "
            "matching pair."
        )
    return Keyring(encryption_key, signing_key, verify_key, key_id_for(verify_key))
