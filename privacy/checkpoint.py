"""Versioned, encrypted, signed checkpoint files.

A checkpoint holds named tensors and a JSON-able state dict, encrypted with AES-256-GCM and
signed with Ed25519 (keys from :mod:`privacy.keys`). Its header is public, so a run can be
inspected (:func:`read_header`) or verified (:func:`verify_checkpoint`) without the
decryption key.

File layout (integers big-endian)::

    MAGIC            13 bytes  b"FEDSCAN-CKPT\\x00"
    version          u16       FORMAT_VERSION (1)
    header_len       u32
    header           UTF-8 JSON, sorted keys, public:
                     {"format", "kind", "run_id", "round", "config_hash", "created",
                      "key_id", "nonce" (24 hex chars), "meta"}
    ciphertext_len   u64
    ciphertext       AES-256-GCM(encryption_key, nonce, payload,
                                 associated_data = MAGIC + version + header)
    signature        64 bytes, Ed25519 over SHA-256(every byte above)

The GCM associated data binds the format version, kind, run id, round, config hash and
metadata to the encrypted payload; the signature lets anyone holding the public key check
the whole file.

The payload is never pickled::

    index_len        u64
    index            UTF-8 JSON: {"byteorder": "little", "state": {...},
                                  "tensors": [{"name", "dtype", "shape", "offset", "nbytes"}]}
    blob             the tensors' raw little-endian bytes, back to back

A payload (tensors plus state) holds at most 2 GiB - 1 byte, the limit of one AES-GCM
call in ``cryptography``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import stat
import struct
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import torch
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privacy.keys import Keyring, key_id_for

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "Checkpoint",
    "CheckpointError",
    "CheckpointHeader",
    "CheckpointMismatch",
    "CorruptCheckpoint",
    "NotACheckpoint",
    "TamperedCheckpoint",
    "TruncatedCheckpoint",
    "UnsupportedVersion",
    "WrongKey",
    "prune_checkpoints",
    "read_checkpoint",
    "read_header",
    "verify_checkpoint",
    "write_checkpoint",
]

MAGIC = b"FEDSCAN-CKPT\x00"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
"""Largest header accepted on write and read; metadata is meant to be small."""
MAX_PAYLOAD_BYTES = 2**31 - 1
"""Largest payload one AES-GCM call in ``cryptography`` accepts."""

MAX_DEPTH = 64
"""Deepest nesting of lists and dicts accepted in ``meta`` and ``state``, on write and read."""

_NONCE_BYTES = 12
_TAG_BYTES = 16
_SIGNATURE_BYTES = 64
_MAX_DIM = 2**63 - 1  # torch sizes are int64
_MAX_ROUND = 2**63 - 1
_VERSION = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_PREFIX_BYTES = len(MAGIC) + _VERSION.size + _U32.size
_MAX_FILE_BYTES = _PREFIX_BYTES + MAX_HEADER_BYTES + _U64.size + MAX_PAYLOAD_BYTES + _SIGNATURE_BYTES
# Header strings are printed by the CLI: no control characters, no lone surrogates.
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f-\x9f\ud800-\udfff]*")
_HEADER_KEYS = frozenset(
    {"format", "kind", "run_id", "round", "config_hash", "created", "key_id", "nonce", "meta"}
)
_DTYPES: dict[str, torch.dtype] = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.complex64,
        torch.complex128,
    )
}


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, verified or trusted; the message says why."""


class NotACheckpoint(CheckpointError):
    """The file does not start with the fedscan checkpoint magic bytes."""


class UnsupportedVersion(CheckpointError):
    """The file's format version is not one this fedscan reads."""


class TruncatedCheckpoint(CheckpointError):
    """The file is shorter (or longer) than its own length fields say."""


class CorruptCheckpoint(CheckpointError):
    """A header or payload field is malformed."""


class TamperedCheckpoint(CheckpointError):
    """The signature does not match the file's bytes."""


class WrongKey(CheckpointError):
    """The checkpoint was signed or encrypted with keys other than the given ones."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint is authentic but belongs to another run or config."""


@dataclass(frozen=True)
class CheckpointHeader:
    """The public, authenticated header of a checkpoint.

    Attributes
    ----------
    kind : str
        What the checkpoint holds: ``"server"`` (the global model, strategy and RNG state,
        metrics; :mod:`server.checkpointing`) or ``"hospital"`` (one hospital's privacy
        ledger and bookkeeping, no model; :mod:`clients.hospital_state`).
    run_id : str
        The run that wrote it.
    round : int
        Federated round (>= 0).
    config_hash : str
        Hash of the resolved run config it was written under.
    created : str
        ISO-8601 UTC timestamp of writing.
    key_id : str
        :attr:`privacy.keys.Keyring.key_id` of the keyring that wrote it.
    meta : dict
        Small public JSON-able metadata.
    version : int
        File format version.
    """

    kind: str
    run_id: str
    round: int
    config_hash: str
    created: str
    key_id: str
    meta: dict[str, Any]
    version: int = FORMAT_VERSION


@dataclass(frozen=True)
class Checkpoint:
    """A decrypted checkpoint.

    Attributes
    ----------
    header : CheckpointHeader
    tensors : dict of str to torch.Tensor
        CPU tensors, bit-identical to those written, in the order written.
    state : dict
        JSON-able state (dicts with str keys, lists, str, int, float, bool, None).
    """

    header: CheckpointHeader
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]


# --------------------------------------------------------------------------- validation


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _depth(value: Any) -> int:
    """Nesting depth of lists and dicts (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if depth > MAX_DEPTH:  # no need to walk the rest
                return depth
            stack.extend((child, depth) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _check_json_able(value: Any, where: str, param: str, function: str, depth: int = 0) -> None:
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, dict | list) and depth >= MAX_DEPTH:
        raise ValueError(
            f"The {param!r} parameter of {function} must nest lists and dicts at most {MAX_DEPTH} "
            f"deep. Got deeper nesting at {where[:200]} instead."
        )
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"The {param!r} parameter of {function} must be JSON-able with str keys. "
                    f"Got key {key!r} ({type(key).__name__}) at {where} instead."
                )
            _check_json_able(item, f"{where}[{key!r}]", param, function, depth + 1)
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json_able(item, f"{where}[{i}]", param, function, depth + 1)
        return
    raise TypeError(
        f"The {param!r} parameter of {function} must hold only dicts, lists, str, int, "
        f"float, bool and None. Got {type(value).__name__} at {where} instead"
        + (" (use a list)." if isinstance(value, tuple) else ".")
    )


def _check_str(value: Any, param: str, *, allow_empty: bool = False) -> None:
    if not isinstance(value, str) or (not value and not allow_empty):
        raise TypeError(
            f"The {param!r} parameter of write_checkpoint must be a "
            f"{'' if allow_empty else 'non-empty '}str. Got {value!r} instead."
        )
    if not _PRINTABLE.fullmatch(value):
        raise ValueError(
            f"The {param!r} parameter of write_checkpoint must be printable text (no control "
            f"characters or lone surrogates). Got {value!r} instead."
        )


def _check_little_endian() -> None:
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        raise CheckpointError(
            f"fedscan checkpoints store little-endian tensors; this machine is {sys.byteorder}-endian."
        )


# --------------------------------------------------------------------------- payload


def _encode_payload(tensors: Mapping[str, torch.Tensor], state: dict[str, Any]) -> bytes:
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    offset = 0
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(
                "The 'tensors' parameter of write_checkpoint must map non-empty str names "
                f"to tensors. Got name {name!r} instead."
            )
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"The 'tensors' parameter of write_checkpoint must map names to torch.Tensor. "
                f"Got {type(tensor).__name__} for {name!r} instead."
            )
        dtype_name = str(tensor.dtype).removeprefix("torch.")
        if dtype_name not in _DTYPES or tensor.layout != torch.strided:
            raise TypeError(
                f"Tensor {name!r} of write_checkpoint must be a dense tensor of dtype "
                f"{', '.join(sorted(_DTYPES))}. Got {tensor.layout} {tensor.dtype} instead."
            )
        flat = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        entries.append(
            {
                "name": name,
                "dtype": dtype_name,
                "shape": list(tensor.shape),
                "offset": offset,
                "nbytes": len(data),
            }
        )
        chunks.append(data)
        offset += len(data)
    index = json.dumps(
        {"byteorder": "little", "state": state, "tensors": entries},
        sort_keys=True,
        allow_nan=True,
        separators=(",", ":"),
    ).encode("utf-8")
    return b"".join([_U64.pack(len(index)), index, *chunks])


def _decode_payload(payload: bytes, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    def corrupt(what: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"Checkpoint '{path}' has a malformed payload: {what}.")

    if len(payload) < _U64.size:
        raise corrupt("it is shorter than its index length field")
    (index_len,) = _U64.unpack_from(payload)
    start = _U64.size + index_len
    if start > len(payload):
        raise corrupt(f"its index claims {index_len} bytes but only {len(payload) - _U64.size} remain")
    try:
        index = json.loads(payload[_U64.size : start].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise corrupt("its index is not UTF-8 JSON") from None
    if not isinstance(index, dict) or set(index) != {"byteorder", "state", "tensors"}:
        raise corrupt("its index does not have the keys byteorder, state and tensors")
    if index["byteorder"] != "little":
        raise corrupt(f"byteorder must be 'little'; got {index['byteorder']!r}")
    if not isinstance(index["state"], dict) or not isinstance(index["tensors"], list):
        raise corrupt("state must be an object and tensors a list")
    if _depth(index["state"]) > MAX_DEPTH:
        raise corrupt(f"its state nests lists and dicts more than {MAX_DEPTH} deep")
    blob = memoryview(payload)[start:]
    tensors: dict[str, torch.Tensor] = {}
    expected_offset = 0
    for entry in index["tensors"]:
        if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape", "offset", "nbytes"}:
            raise corrupt("a tensor entry lacks name, dtype, shape, offset or nbytes")
        name, dtype_name, shape = entry["name"], entry["dtype"], entry["shape"]
        offset, nbytes = entry["offset"], entry["nbytes"]
        if not isinstance(name, str) or not name or name in tensors:
            raise corrupt(f"tensor name {name!r:.80} is not a non-empty str or is repeated")
        if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
            raise corrupt(f"tensor {name!r:.80} has unsupported dtype {dtype_name!r:.80}")
        if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= _MAX_DIM for d in shape):
            raise corrupt(f"tensor {name!r:.80} has invalid shape {shape!r:.80}")
        dtype = _DTYPES[dtype_name]
        itemsize = torch.empty((), dtype=dtype).element_size()
        # Exact ints only: 4.0 == 4 in Python, but a float cannot slice the blob.
        if not _is_int(offset) or not _is_int(nbytes):
            raise corrupt(f"tensor {name!r:.80} has a non-integer offset or size")
        if offset != expected_offset or nbytes != math.prod(shape) * itemsize:
            raise corrupt(f"tensor {name!r:.80} has inconsistent offset or size")
        if offset + nbytes > len(blob):
            raise corrupt(f"tensor {name!r:.80} runs past the end of the payload")
        try:
            if nbytes:
                raw = torch.frombuffer(bytearray(blob[offset : offset + nbytes]), dtype=torch.uint8)
                tensors[name] = raw.view(dtype).reshape(shape)
            else:
                tensors[name] = torch.empty(shape, dtype=dtype)
        except (RuntimeError, ValueError, TypeError, OverflowError):
            # e.g. more dimensions than torch supports; the checks above make this rare.
            raise corrupt(f"tensor {name!r:.80} of shape {shape!r:.80} cannot be built") from None
        expected_offset += nbytes
    if expected_offset != len(blob):
        raise corrupt(f"{len(blob) - expected_offset} bytes follow the last tensor")
    return tensors, index["state"]


# --------------------------------------------------------------------------- container


@dataclass(frozen=True)
class _Parsed:
    header: CheckpointHeader
    nonce: bytes
    aad: bytes
    ciphertext: bytes
    signed: bytes
    signature: bytes


def _parse_prefix(prefix: bytes, path: Path) -> int:
    """Check magic and version; return ``header_len``."""
    if len(prefix) < len(MAGIC) or prefix[: len(MAGIC)] != MAGIC:
        if len(prefix) < len(MAGIC) and MAGIC.startswith(prefix) and prefix:
            raise TruncatedCheckpoint(
                f"Checkpoint '{path}' is truncated: it is {len(prefix)} bytes, shorter than the magic bytes."
            )
        raise NotACheckpoint(f"File '{path}' is not a fedscan checkpoint (bad magic bytes).")
    if len(prefix) < _PREFIX_BYTES:
        raise TruncatedCheckpoint(
            f"Checkpoint '{path}' is truncated: it ends inside its version or header length."
        )
    (version,) = _VERSION.unpack_from(prefix, len(MAGIC))
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(
            f"Checkpoint '{path}' has format version {version}, which is not supported; this "
            f"fedscan reads version {FORMAT_VERSION}."
        )
    (header_len,) = _U32.unpack_from(prefix, len(MAGIC) + _VERSION.size)
    if header_len > MAX_HEADER_BYTES:
        raise CorruptCheckpoint(
            f"Checkpoint '{path}' declares a {header_len}-byte header; at most "
            f"{MAX_HEADER_BYTES} bytes are allowed."
        )
    return header_len


def _parse_header(header_bytes: bytes, path: Path) -> tuple[CheckpointHeader, bytes]:
    def corrupt(what: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(f"Checkpoint '{path}' has a malformed header: {what}.")

    def strict_float(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):  # 1e999; the writer refuses non-finite meta
            raise ValueError(text)
        return value

    def no_constant(name: str) -> Any:  # NaN, Infinity: not JSON, never written
        raise ValueError(name)

    try:
        fields = json.loads(
            header_bytes.decode("utf-8"), parse_float=strict_float, parse_constant=no_constant
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise corrupt("it is not strict UTF-8 JSON") from None
    if not isinstance(fields, dict) or set(fields) != _HEADER_KEYS:
        raise corrupt(f"it must have exactly the keys {', '.join(sorted(_HEADER_KEYS))}")
    if not _is_int(fields["format"]) or fields["format"] != FORMAT_VERSION:
        raise corrupt(f"its format {fields['format']!r:.80} disagrees with the file version {FORMAT_VERSION}")
    for key in ("kind", "run_id", "config_hash", "created", "key_id", "nonce"):
        if not isinstance(fields[key], str) or not _PRINTABLE.fullmatch(fields[key]):
            raise corrupt(f"{key} must be printable text, got {fields[key]!r:.80}")
    rnd = fields["round"]
    if not _is_int(rnd) or not 0 <= rnd <= _MAX_ROUND:
        raise corrupt(f"round must be an int in [0, 2**63), got {rnd!r:.80}")
    if not isinstance(fields["meta"], dict):
        raise corrupt("meta must be an object")
    if _depth(fields["meta"]) > MAX_DEPTH:
        raise corrupt(f"meta nests lists and dicts more than {MAX_DEPTH} deep")
    if not re.fullmatch(r"[0-9a-f]{24}", fields["nonce"]):
        raise corrupt(f"nonce must be {_NONCE_BYTES} bytes in lowercase hex")
    if not re.fullmatch(r"[0-9a-f]{16}", fields["key_id"]):
        raise corrupt("key_id must be 16 lowercase hex characters")
    header = CheckpointHeader(
        kind=fields["kind"],
        run_id=fields["run_id"],
        round=rnd,
        config_hash=fields["config_hash"],
        created=fields["created"],
        key_id=fields["key_id"],
        meta=fields["meta"],
        version=FORMAT_VERSION,
    )
    return header, bytes.fromhex(fields["nonce"])


def _parse(path: Path) -> _Parsed:
    """Read and check the container, never reading (or allocating) more than the file holds."""
    with _open_checkpoint(path) as (handle, size):
        prefix = handle.read(_PREFIX_BYTES)
        header_len = _parse_prefix(prefix, path)
        header_end = _PREFIX_BYTES + header_len
        if size < header_end + _U64.size:
            raise TruncatedCheckpoint(
                f"Checkpoint '{path}' is truncated: it is {size} bytes and ends inside its header."
            )
        header_bytes = _read(handle, header_len, path)
        header, nonce = _parse_header(header_bytes, path)
        (ciphertext_len,) = _U64.unpack(_read(handle, _U64.size, path))
        ciphertext_start = header_end + _U64.size
        signature_start = ciphertext_start + ciphertext_len
        expected = signature_start + _SIGNATURE_BYTES
        if size < expected:
            raise TruncatedCheckpoint(
                f"Checkpoint '{path}' is truncated: its length fields need {expected} bytes but "
                f"the file has {size}."
            )
        if size > expected:
            raise TruncatedCheckpoint(
                f"Checkpoint '{path}' has {size - expected} unexpected bytes after its "
                "signature (a length field is damaged or data was appended)."
            )
        ciphertext = _read(handle, ciphertext_len, path)
        signature = _read(handle, _SIGNATURE_BYTES, path)
        if handle.read(1):
            raise TruncatedCheckpoint(f"Checkpoint '{path}' grew while it was being read.")
    version = prefix[: len(MAGIC) + _VERSION.size]
    return _Parsed(
        header=header,
        nonce=nonce,
        aad=version + header_bytes,
        ciphertext=ciphertext,
        signed=b"".join([prefix, header_bytes, _U64.pack(ciphertext_len), ciphertext]),
        signature=signature,
    )


def _verify(parsed: _Parsed, verify_key: Ed25519PublicKey, path: Path) -> None:
    try:
        verify_key.verify(parsed.signature, hashlib.sha256(parsed.signed).digest())
    except InvalidSignature:
        key_id = key_id_for(verify_key)
        if parsed.header.key_id != key_id:
            raise WrongKey(
                f"Checkpoint '{path}' was signed by key {parsed.header.key_id}, not by the "
                f"given key {key_id}; load the keyring that wrote it."
            ) from None
        raise TamperedCheckpoint(
            f"Checkpoint '{path}' has an invalid signature: it was modified after being "
            f"written or signed by another key (verify key {key_id})."
        ) from None


@contextlib.contextmanager
def _open_checkpoint(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    """Open a regular file for reading; every OS failure becomes a one-sentence CheckpointError."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"Checkpoint '{path}' does not exist.") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise CheckpointError(f"Checkpoint '{path}' cannot be read: {_reason(err)}.") from None
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"Checkpoint '{path}' is a folder, not a file.")
    if not stat.S_ISREG(info.st_mode):
        # A FIFO or device could block forever or never end.
        raise CheckpointError(f"Checkpoint '{path}' is not a regular file.")
    if info.st_size > _MAX_FILE_BYTES:
        raise CorruptCheckpoint(
            f"Checkpoint '{path}' is {info.st_size} bytes, larger than any checkpoint can be "
            f"({_MAX_FILE_BYTES} bytes)."
        )
    try:
        handle = path.open("rb")
    except OSError as err:
        raise CheckpointError(f"Checkpoint '{path}' cannot be read: {_reason(err)}.") from None
    try:
        with handle:
            yield handle, info.st_size
    except OSError as err:
        raise CheckpointError(f"Checkpoint '{path}' cannot be read: {_reason(err)}.") from None


def _reason(err: BaseException) -> str:
    reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
    return " ".join(str(reason).split()).rstrip(".")


def _read(handle: BinaryIO, size: int, path: Path) -> bytes:
    """Exactly ``size`` bytes, or TruncatedCheckpoint (the file shrank while being read)."""
    data = handle.read(size)
    if len(data) < size:
        raise TruncatedCheckpoint(f"Checkpoint '{path}' is truncated: it ended while being read.")
    return data


# --------------------------------------------------------------------------- public API


def write_checkpoint(
    path: str | os.PathLike[str],
    *,
    keyring: Keyring,
    kind: str,
    run_id: str,
    round: int,
    config_hash: str,
    tensors: Mapping[str, torch.Tensor],
    state: dict[str, Any],
    meta: dict[str, Any] | None = None,
) -> Path:
    """Encrypt, sign and atomically write a checkpoint.

    The file is written to a temporary file in the same folder, flushed, ``fsync``-ed and
    renamed over ``path`` with :func:`os.replace`; then the folder is ``fsync``-ed. A crash
    before the rename leaves any previous file at ``path`` untouched.

    Parameters
    ----------
    path : str or PathLike
        Destination; its folder is created if missing.
    keyring : Keyring
        Encrypts with ``encryption_key``, signs with ``signing_key``.
    kind : str
        Non-empty label of what is stored (e.g. ``"server"``).
    run_id : str
        Non-empty run identifier.
    round : int
        Federated round, >= 0.
    config_hash : str
        Hash of the resolved run config.
    tensors : mapping of str to torch.Tensor
        Dense tensors of any shape; copied to CPU. Dtypes: bool, (u)int8, int16/32/64,
        float16, bfloat16, float32/64, complex64/128.
    state : dict
        JSON-able state (dicts with str keys, lists, str, int, float incl. nan/inf, bool,
        None). Tuples are refused because they would come back as lists.
    meta : dict, optional
        Small public JSON-able metadata stored in the unencrypted (but authenticated)
        header. Never put secrets here.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    TypeError
        If an argument has the wrong type (the message names it).
    ValueError
        If ``round`` is negative, the header exceeds 64 KiB or the payload 2 GiB.
    """
    _check_little_endian()
    path = Path(path)
    if not isinstance(keyring, Keyring):
        raise TypeError(
            "The 'keyring' parameter of write_checkpoint must be a Keyring. "
            f"Got {type(keyring).__name__} instead."
        )
    _check_str(kind, "kind")
    _check_str(run_id, "run_id")
    _check_str(config_hash, "config_hash", allow_empty=True)
    if not isinstance(round, int) or isinstance(round, bool):
        raise TypeError(f"The 'round' parameter of write_checkpoint must be an int. Got {round!r} instead.")
    if round < 0:
        raise ValueError(
            f"The 'round' parameter of write_checkpoint must be an int >= 0. Got {round} instead."
        )
    if not isinstance(tensors, Mapping):
        raise TypeError(
            "The 'tensors' parameter of write_checkpoint must be a mapping of str to "
            f"torch.Tensor. Got {type(tensors).__name__} instead."
        )
    if not isinstance(state, dict):
        raise TypeError(
            f"The 'state' parameter of write_checkpoint must be a dict. Got {type(state).__name__} instead."
        )
    _check_json_able(state, "state", "state", "write_checkpoint")
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        raise TypeError(
            f"The 'meta' parameter of write_checkpoint must be a dict or None. Got {type(meta).__name__} instead."
        )
    _check_json_able(meta, "meta", "meta", "write_checkpoint")

    nonce = secrets.token_bytes(_NONCE_BYTES)
    try:
        header_bytes = json.dumps(
            {
                "format": FORMAT_VERSION,
                "kind": kind,
                "run_id": run_id,
                "round": round,
                "config_hash": config_hash,
                "created": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "key_id": keyring.key_id,
                "nonce": nonce.hex(),
                "meta": meta,
            },
            sort_keys=True,
            allow_nan=False,
            separators=(",", ":"),
        ).encode("utf-8")
    except ValueError:
        raise ValueError(
            "The 'meta' parameter of write_checkpoint must be strict JSON. Got a nan or "
            "infinite float instead."
        ) from None
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ValueError(
            f"The header of write_checkpoint must be at most {MAX_HEADER_BYTES} bytes. Got "
            f"{len(header_bytes)} bytes instead; move large values from 'meta' to 'state'."
        )

    payload = _encode_payload(tensors, state)
    if len(payload) > MAX_PAYLOAD_BYTES - 16:
        raise ValueError(
            f"The payload of write_checkpoint must be under {MAX_PAYLOAD_BYTES} bytes. Got "
            f"{len(payload)} bytes instead."
        )
    version = _VERSION.pack(FORMAT_VERSION)
    ciphertext = AESGCM(keyring.encryption_key).encrypt(nonce, payload, MAGIC + version + header_bytes)
    signed = b"".join(
        [MAGIC, version, _U32.pack(len(header_bytes)), header_bytes, _U64.pack(len(ciphertext)), ciphertext]
    )
    signature = keyring.signing_key.sign(hashlib.sha256(signed).digest())

    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(signed)
            handle.write(signature)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name != "nt":  # Windows cannot open a folder to fsync it
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def read_header(path: str | os.PathLike[str]) -> CheckpointHeader:
    """Read a checkpoint's public header without any key and without reading the weights.

    The header is *not* verified here; use :func:`verify_checkpoint` for that.

    Parameters
    ----------
    path : str or PathLike

    Returns
    -------
    CheckpointHeader

    Raises
    ------
    CheckpointError
        If the file is missing, not a checkpoint, of another format version, truncated
        inside the header, or has a malformed header.
    """
    path = Path(path)
    with _open_checkpoint(path) as (handle, _):
        header_len = _parse_prefix(handle.read(_PREFIX_BYTES), path)
        header_bytes = handle.read(header_len)
    if len(header_bytes) < header_len:
        raise TruncatedCheckpoint(f"Checkpoint '{path}' is truncated: it ends inside its header.")
    return _parse_header(header_bytes, path)[0]


def verify_checkpoint(path: str | os.PathLike[str], *, verify_key: Ed25519PublicKey) -> CheckpointHeader:
    """Check a checkpoint's structure and signature; no decryption key needed.

    Parameters
    ----------
    path : str or PathLike
    verify_key : Ed25519PublicKey
        The writer's public key (``Keyring.verify_key``).

    Returns
    -------
    CheckpointHeader
        The header, now known to be authentic.

    Raises
    ------
    CheckpointError
        If the file is not a well-formed checkpoint of this format version
        (:class:`NotACheckpoint`, :class:`UnsupportedVersion`, :class:`TruncatedCheckpoint`,
        :class:`CorruptCheckpoint`), was signed by another key (:class:`WrongKey`) or was
        modified (:class:`TamperedCheckpoint`).
    """
    path = Path(path)
    if not isinstance(verify_key, Ed25519PublicKey):
        raise TypeError(
            "The 'verify_key' parameter of verify_checkpoint must be an Ed25519PublicKey. "
            f"Got {type(verify_key).__name__} instead."
        )
    parsed = _parse(path)
    _verify(parsed, verify_key, path)
    return parsed.header


def read_checkpoint(
    path: str | os.PathLike[str],
    *,
    keyring: Keyring,
    expected_run_id: str | None = None,
    expected_config_hash: str | None = None,
) -> Checkpoint:
    """Verify, decrypt and parse a checkpoint.

    Order: structure, signature (``keyring.verify_key``), GCM decryption
    (``keyring.encryption_key``), payload, then the expected run id and config hash.
    Nothing is returned unless every check passes, and the payload is never unpickled.

    Parameters
    ----------
    path : str or PathLike
    keyring : Keyring
    expected_run_id : str, optional
        Refuse a checkpoint of another run.
    expected_config_hash : str, optional
        Refuse a checkpoint written under another config.

    Returns
    -------
    Checkpoint

    Raises
    ------
    CheckpointError
        Every failure; see :func:`verify_checkpoint` for the structural and signature
        subclasses. Additionally :class:`WrongKey` if decryption fails (the encryption key
        differs from the writer's), :class:`CorruptCheckpoint` for a malformed payload, and
        :class:`CheckpointMismatch` for another run id or config hash.
    """
    _check_little_endian()
    path = Path(path)
    if not isinstance(keyring, Keyring):
        raise TypeError(
            "The 'keyring' parameter of read_checkpoint must be a Keyring. "
            f"Got {type(keyring).__name__} instead."
        )
    parsed = _parse(path)
    _verify(parsed, keyring.verify_key, path)
    try:
        payload = AESGCM(keyring.encryption_key).decrypt(parsed.nonce, parsed.ciphertext, parsed.aad)
    except InvalidTag:
        raise WrongKey(
            f"Checkpoint '{path}' could not be decrypted: its signature is valid (key "
            f"{parsed.header.key_id}) but the keyring's encryption key is not the one it was "
            "written with."
        ) from None
    tensors, state = _decode_payload(payload, path)
    header = parsed.header
    if expected_run_id is not None and header.run_id != expected_run_id:
        raise CheckpointMismatch(
            f"Checkpoint '{path}' belongs to run {header.run_id!r}, not to the expected run "
            f"{expected_run_id!r}."
        )
    if expected_config_hash is not None and header.config_hash != expected_config_hash:
        raise CheckpointMismatch(
            f"Checkpoint '{path}' was written for a different config (config hash "
            f"{header.config_hash!r}, expected {expected_config_hash!r})."
        )
    return Checkpoint(header=header, tensors=tensors, state=state)


def prune_checkpoints(
    folder: str | os.PathLike[str], *, keep: int, pattern: str = "round-*.ckpt"
) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints, newest by round number in the name.

    The round number is the last run of digits in the file name (``round-0012.ckpt`` is
    round 12). Files matching ``pattern`` without digits are left alone.

    Parameters
    ----------
    folder : str or PathLike
    keep : int
        How many to keep, >= 0.
    pattern : str, default "round-*.ckpt"
        Glob pattern of the checkpoints to consider.

    Returns
    -------
    list of Path
        The removed files, oldest first.

    Raises
    ------
    ValueError
        If ``keep`` is not an int >= 0.
    """
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
        raise ValueError(
            f"The 'keep' parameter of prune_checkpoints must be an int >= 0. Got {keep!r} instead."
        )
    numbered: list[tuple[int, str, Path]] = []
    for candidate in Path(folder).glob(pattern):
        digits = re.findall(r"\d+", candidate.name)
        if candidate.is_file() and digits:
            numbered.append((int(digits[-1]), candidate.name, candidate))
    numbered.sort()
    removed = [item[2] for item in numbered[: max(len(numbered) - keep, 0)]]
    for old in removed:
        old.unlink()
    return removed
