"""Fuzzing checkpoint files: every hostile file is refused with one CheckpointError sentence.

Targets: :func:`privacy.checkpoint.read_header`, :func:`~privacy.checkpoint.verify_checkpoint`,
:func:`~privacy.checkpoint.read_checkpoint`, and ``fedscan checkpoint inspect|verify`` (exit
code 2, one stderr line). Inputs: random bytes, every truncation of a real file, valid magic
and version with hostile header JSON and length fields, and files that are validly signed and
encrypted with the real keys but carry a hostile payload index.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import secrets
import shutil
import struct
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from privacy.checkpoint import (
    FORMAT_VERSION,
    MAGIC,
    CheckpointError,
    CheckpointHeader,
    read_checkpoint,
    read_header,
    verify_checkpoint,
    write_checkpoint,
)
from privacy.keys import Keyring, generate_keyring
from server.cli import main
from tests.fuzz._support import assert_cli_contract, assert_one_sentence, count, fuzz_settings, run_cli

U16, U32, U64 = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")

# One keyring folder for the whole module: the CLI's verify reads it from disk.
_KEY_DIR = Path(tempfile.mkdtemp(prefix="fedscan-fuzz-keys-"))
atexit.register(shutil.rmtree, _KEY_DIR, ignore_errors=True)
KEYRING = generate_keyring(_KEY_DIR / "keys")
KEYS = str(_KEY_DIR / "keys")


def _valid_file() -> bytes:
    path = _KEY_DIR / "valid.ckpt"
    write_checkpoint(
        path, keyring=KEYRING, kind="server", run_id="run-7", round=2, config_hash="c0ffee",
        tensors={"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor([1, 2])},
        state={"lr": 0.1, "hist": [1, None, "x"]}, meta={"model": "unet"},
    )
    return path.read_bytes()


VALID = _valid_file()


def _header(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "format": FORMAT_VERSION, "kind": "server", "run_id": "r", "round": 1, "config_hash": "",
        "created": "2026-01-01T00:00:00.000+00:00", "key_id": KEYRING.key_id,
        "nonce": secrets.token_bytes(12).hex(), "meta": {},
    }
    fields.update(overrides)
    return fields


def container(header: bytes, payload: bytes, nonce: bytes, keyring: Keyring = KEYRING) -> bytes:
    """A file laid out exactly as write_checkpoint lays it out, signed and encrypted with real keys."""
    version = U16.pack(FORMAT_VERSION)
    ciphertext = AESGCM(keyring.encryption_key).encrypt(nonce, payload, MAGIC + version + header)
    signed = b"".join([MAGIC, version, U32.pack(len(header)), header, U64.pack(len(ciphertext)), ciphertext])
    return signed + keyring.signing_key.sign(hashlib.sha256(signed).digest())


def _check_all(data: bytes, *, may_succeed: bool, header_ok: bool | None = None) -> None:
    """Run the three readers and the two CLI commands on ``data``; check the error contract.

    ``may_succeed``: the file may be accepted; ``header_ok``: ``read_header`` (and ``inspect``)
    may accept it (default: as ``may_succeed``), e.g. a file cut after its header.
    """
    header_ok = may_succeed if header_ok is None else header_ok
    with tempfile.TemporaryDirectory(prefix="fedscan-fuzz-") as tmp:
        path = Path(tmp) / "f.ckpt"
        path.write_bytes(data)
        calls = (
            lambda: read_header(path),
            lambda: verify_checkpoint(path, verify_key=KEYRING.verify_key),
            lambda: read_checkpoint(path, keyring=KEYRING),
        )
        for allowed, call in zip((header_ok, may_succeed, may_succeed), calls, strict=True):
            try:
                result = call()
            except CheckpointError as err:
                assert_one_sentence(str(err))
                continue
            assert allowed, f"a hostile file was accepted: {data[:80]!r}"
            assert isinstance(result, CheckpointHeader) or hasattr(result, "tensors")
        for allowed, argv in (
            (header_ok, ["checkpoint", "inspect", str(path)]),
            (may_succeed, ["checkpoint", "verify", str(path), "--keyring", KEYS]),
        ):
            code, out, err = run_cli(main, argv)
            assert_cli_contract(code, out, err)
            assert allowed or code == 2, f"{argv[:2]} accepted a hostile file: {data[:80]!r}"
        assert sorted(os.listdir(tmp)) == ["f.ckpt"]  # nothing written beside it
        assert path.read_bytes() == data  # nor overwritten


# ------------------------------------------------------------------------------- random bytes


@fuzz_settings(300)
@given(st.one_of(st.binary(max_size=600), st.binary(max_size=200).map(lambda b: MAGIC + b)))
def test_random_bytes_are_refused(data: bytes) -> None:
    count("checkpoint: random bytes")
    _check_all(data, may_succeed=False)


def test_every_truncation_and_extension_of_a_real_file_is_refused() -> None:
    (header_len,) = U32.unpack_from(VALID, len(MAGIC) + 2)
    header_end = len(MAGIC) + 6 + header_len
    for length in range(len(VALID)):
        count("checkpoint: truncation")
        # read_header reads no further than the header, so a file cut after it still has one.
        _check_all(VALID[:length], may_succeed=False, header_ok=length >= header_end)
    for extra in (b"\0", b"x" * 7, VALID):
        count("checkpoint: truncation")
        _check_all(VALID + extra, may_succeed=False, header_ok=True)
    _check_all(VALID, may_succeed=True)


# ------------------------------------------------------------------------------- hostile header

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63, 2**64, -1, 10**300, 0]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["\n", "\x00", "\x1b[31m", "\u202e", "é", "'\"", "\ud800"]),
)
_json = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def hostile_headers(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["field", "raw", "deep", "numbers"]))
    if kind == "field":
        fields = _header()
        key = draw(st.sampled_from(sorted(fields) + ["extra"]))
        if draw(st.booleans()) and key in fields:
            del fields[key]
        else:
            fields[key] = draw(_json)
        text = json.dumps(fields, ensure_ascii=draw(st.booleans()))
        return text.encode("utf-8", "surrogatepass")
    if kind == "raw":
        return draw(st.one_of(st.binary(max_size=300), st.text(max_size=100).map(str.encode)))
    if kind == "deep":
        depth = draw(st.sampled_from([10, 64, 65, 500, 5000, 30000]))
        return json.dumps(_header()).replace('"meta": {}', f'"meta": {{"x": {_deep(depth)}}}').encode()
    number = draw(st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "9" * 5000, "1.0", "true", "-0"]))
    key = draw(st.sampled_from(["round", "format"]))
    return json.dumps(_header(**{key: "@"})).replace('"@"', number).encode()


@fuzz_settings(400)
@given(
    header=hostile_headers(),
    header_len=st.one_of(st.none(), st.sampled_from([0, 1, 2**16, 2**16 + 1, 2**31, 2**32 - 1])),
    ciphertext_len=st.one_of(st.none(), st.sampled_from([0, 15, 16, 2**31, 2**63, 2**64 - 1])),
    signed=st.booleans(),
)
def test_hostile_headers_and_length_fields_are_refused(
    header: bytes, header_len: int | None, ciphertext_len: int | None, signed: bool
) -> None:
    count("checkpoint: hostile header")
    nonce = secrets.token_bytes(12)
    data = bytearray(container(header, b"\0" * 8 + b"{}", nonce) if signed else MAGIC + U16.pack(1))
    if not signed:
        data += U32.pack(len(header)) + header + U64.pack(0) + b"\0" * 64
    if header_len is not None:
        data[len(MAGIC) + 2 : len(MAGIC) + 6] = U32.pack(header_len)
    if ciphertext_len is not None:
        at = len(MAGIC) + 6 + len(header)
        data[at : at + 8] = U64.pack(ciphertext_len)
    # A valid header can only come from the "field" branch drawing a harmless value; the
    # payload is never a valid index, so read_checkpoint must refuse every file here.
    _check_all(bytes(data), may_succeed=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.ckpt"
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError):
            read_checkpoint(path, keyring=KEYRING)


def test_huge_length_fields_are_not_allocated() -> None:
    # Prepare: header and ciphertext lengths that claim gigabytes in a 200-byte file.
    header = json.dumps(_header()).encode()
    base = container(header, b"", secrets.token_bytes(12))
    claims = []
    for header_len, ciphertext_len in ((2**32 - 1, 0), (len(header), 2**40), (len(header), 2**64 - 1)):
        data = bytearray(base)
        data[len(MAGIC) + 2 : len(MAGIC) + 6] = U32.pack(header_len)
        at = len(MAGIC) + 6 + len(header)
        data[at : at + 8] = U64.pack(ciphertext_len)
        claims.append(bytes(data))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.ckpt"
        for data in claims:
            count("checkpoint: hostile header")
            path.write_bytes(data)
            # Execute
            tracemalloc.start()
            with pytest.raises(CheckpointError) as info:
                read_checkpoint(path, keyring=KEYRING)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            # Assert
            assert peak < 1_000_000, f"{peak} bytes allocated for a {len(data)}-byte file"
            assert_one_sentence(str(info.value))


# ------------------------------------------------------------------------------- hostile payload


def _entry(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "w", "dtype": "float32", "shape": [2], "offset": 0, "nbytes": 8}
    entry.update(overrides)
    return entry


_hostile_entry_values = st.one_of(
    _json,
    st.sampled_from([4.0, 8.0, True, False, -8, 2**64, 2**63 - 1, [0, 2**70], [0] * 200, [1] * 200,
                     [2, -1], [2.0], "float32", "float128", "object", "torch.float32", ["float32"],
                     {"x": 1}, ""]),
)


@st.composite
def hostile_payloads(draw: st.DrawFn) -> bytes:
    blob = draw(st.sampled_from([b"", b"\0" * 8, b"\x01" * 7, b"\xff" * 9, struct.pack("<2f", 1.0, 2.0)]))
    kind = draw(st.sampled_from(["entry", "index", "raw", "deep", "length"]))
    index: Any = {"byteorder": "little", "state": {}, "tensors": [_entry()]}
    if kind == "entry":
        entry = _entry()
        key = draw(st.sampled_from(sorted(entry) + ["extra"]))
        if draw(st.booleans()) and key in entry:
            del entry[key]
        else:
            entry[key] = draw(_hostile_entry_values)
        index["tensors"] = draw(st.sampled_from([[entry], [entry, entry], [_entry(), entry]]))
    elif kind == "index":
        key = draw(st.sampled_from(["byteorder", "state", "tensors", "extra"]))
        index[key] = draw(_hostile_entry_values)
    elif kind == "raw":
        index_bytes = draw(st.binary(max_size=200))
        return U64.pack(len(index_bytes)) + index_bytes + blob
    elif kind == "deep":
        depth = draw(st.sampled_from([63, 65, 900, 20000]))
        text = json.dumps(index).replace('"state": {}', f'"state": {{"x": {_deep(depth)}}}')
        return U64.pack(len(text)) + text.encode() + blob
    else:
        index_bytes = json.dumps(index).encode()
        claimed = draw(st.sampled_from([0, len(index_bytes) - 1, len(index_bytes) + 1, 2**63, 2**64 - 1]))
        return U64.pack(claimed) + index_bytes + blob
    text = json.dumps(index, ensure_ascii=draw(st.booleans()))
    index_bytes = text.encode("utf-8", "surrogatepass")
    return U64.pack(len(index_bytes)) + index_bytes + blob


@fuzz_settings(600)
@given(hostile_payloads())
def test_signed_encrypted_files_with_hostile_payload_index_are_refused(payload: bytes) -> None:
    count("checkpoint: hostile payload")
    nonce = secrets.token_bytes(12)
    header = json.dumps(_header(nonce=nonce.hex()), sort_keys=True).encode()
    # Some payloads are valid by chance (e.g. an extra float32 tensor whose bytes all fit):
    # those must read back; every other one must be a one-sentence CheckpointError.
    _check_all(container(header, payload, nonce), may_succeed=True)


def test_a_valid_signed_file_built_here_reads_back() -> None:
    # The container builder above is the real format: without this, the payload fuzz
    # could pass by having every file refused for a reason that has nothing to do with it.
    nonce = secrets.token_bytes(12)
    index = json.dumps({"byteorder": "little", "state": {"a": 1}, "tensors": [_entry()]}).encode()
    payload = U64.pack(len(index)) + index + struct.pack("<2f", 1.0, 2.0)
    header = json.dumps(_header(nonce=nonce.hex())).encode()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.ckpt"
        path.write_bytes(container(header, payload, nonce))
        ckpt = read_checkpoint(path, keyring=KEYRING)

    assert ckpt.state == {"a": 1} and ckpt.tensors["w"].tolist() == [1.0, 2.0]


# ------------------------------------------------------------------------------- odd paths


def test_folders_fifos_missing_and_unreadable_paths_are_one_sentence(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.ckpt"
    os.mkfifo(fifo)
    unreadable = tmp_path / "unreadable.ckpt"
    unreadable.write_bytes(VALID)
    unreadable.chmod(0)
    loop = tmp_path / "loop.ckpt"
    loop.symlink_to(loop)
    paths = [tmp_path, fifo, tmp_path / "missing.ckpt", unreadable, loop, tmp_path / "no" / "x.ckpt"]

    for path in paths:
        count("checkpoint: odd path")
        for call in (
            lambda path=path: read_header(path),
            lambda path=path: verify_checkpoint(path, verify_key=KEYRING.verify_key),
            lambda path=path: read_checkpoint(path, keyring=KEYRING),
        ):
            try:
                call()
            except CheckpointError as err:
                assert_one_sentence(str(err))
            else:
                # Only the chmod-000 file can be read, and only by root.
                assert path == unreadable and os.geteuid() == 0
        for argv in (["checkpoint", "inspect", str(path)], ["checkpoint", "verify", str(path), "--keyring", KEYS]):
            code, out, err = run_cli(main, argv)
            assert_cli_contract(code, out, err)
