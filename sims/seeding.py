"""Deterministic, process-independent random generators.

Every random draw in fedscan comes from a generator derived from a root seed and a
path of keys, e.g. ``(seed, hospital, patient, "scanner")``. Derivation hashes the
keys with SHA-256, so the same keys give the same stream in every process, on every
machine and under every Python version (unlike :func:`hash`, which is salted per
process for strings). Different key paths give statistically independent streams,
and adding a new purpose never shifts the draws of an existing one.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["derive_seed", "make_rng", "make_torch_generator"]

_SEED_BITS = 63
# Field separator and type tags keep ``(1, "2")``, ``("1", 2)`` and ``("12",)`` apart.
_SEP = b"\x1f"


def _encode_key(key: object, what: str) -> bytes:
    if isinstance(key, bool) or not isinstance(key, (int, np.integer, str)):
        raise TypeError(
            f"The {what} of derive_seed must be an int or a str. "
            f"Got {key!r} of type {type(key).__name__} instead."
        )
    if isinstance(key, str):
        return b"s:" + key.encode("utf-8")
    return b"i:" + str(int(key)).encode("ascii")


def derive_seed(seed: int, *keys: int | str) -> int:
    """Derive a child seed from a root seed and a path of keys.

    Parameters
    ----------
    seed : int
        Root seed of the experiment (any Python or NumPy integer, negative allowed).
    *keys : int or str
        Path identifying the consumer, e.g. ``(hospital, patient, "scanner")``.
        ``1`` and ``"1"`` are different keys.

    Returns
    -------
    int
        A non-negative integer below ``2**63``, identical in every process.

    Raises
    ------
    TypeError
        If ``seed`` or a key is not an int / str (``bool`` is rejected).
    """
    parts = [_encode_key(seed, "'seed' parameter")]
    parts += [_encode_key(key, "key") for key in keys]
    digest = hashlib.sha256(_SEP.join(parts)).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - _SEED_BITS)


def make_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """Make a NumPy generator for one purpose.

    Parameters
    ----------
    seed : int
        Root seed of the experiment.
    *keys : int or str
        Path identifying the purpose, see :func:`derive_seed`.

    Returns
    -------
    numpy.random.Generator
        A fresh PCG64 generator seeded with ``SeedSequence(derive_seed(seed, *keys))``.
    """
    return np.random.default_rng(np.random.SeedSequence(derive_seed(seed, *keys)))


def make_torch_generator(seed: int, *keys: int | str) -> torch.Generator:
    """Make a CPU :class:`torch.Generator` for one purpose.

    Parameters
    ----------
    seed : int
        Root seed of the experiment.
    *keys : int or str
        Path identifying the purpose, see :func:`derive_seed`.

    Returns
    -------
    torch.Generator
        A CPU generator seeded with ``derive_seed(seed, *keys)``; the global torch RNG
        is left untouched.
    """
    generator = torch.Generator()
    generator.manual_seed(derive_seed(seed, *keys))
    return generator
