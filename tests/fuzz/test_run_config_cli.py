"""Fuzzing run configs through ``fedscan run --dry-run`` (validate everything, start nothing).

Hostile values for every declared key (wrong types, NaN/inf, huge and negative ints, empty,
unicode, TOML-breaking quotes, arrays, inline tables, dates), unknown keys, and override
``.toml`` files with random or hostile content. Contract: exit code 0 or 2; on 2 exactly one
stderr line ``fedscan: error: ...``; never a traceback; nothing written anywhere.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.cli import main
from sims.config import KEYS
from tests.fuzz._support import assert_cli_contract, count, fuzz_settings, run_cli

PROJECT = Path(__file__).resolve().parents[2]
DECLARED = sorted(KEYS)
# Keep the valid baseline small and cheap; the fuzzed keys override it.
BASE = ["num-server-rounds=2", "image-size=32", "unet-channels='8,16'", "patients-per-hospital=20",
        "holdout-per-hospital=4"]


def _has_dry_run() -> bool:
    code, out, _ = run_cli(main, ["run", "--help"])
    return "--dry-run" in out


pytestmark = pytest.mark.skipif(not _has_dry_run(), reason="fedscan run --dry-run is not available")


# ------------------------------------------------------------------------------- TOML text


def _toml_string(text: str, quote: str) -> str:
    if quote == "'":  # a literal string cannot hold ' or a newline: TOML-breaking on purpose
        return f"'{text}'"
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + "".join(c if c.isprintable() or c in "\\" else f"\\u{ord(c):04x}" for c in escaped) + '"'


_hostile_text = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "none", "None", "NONE", "sample", "both", "fedavg", "off", "head", "16,32",
                     "8,16", "0,0", "1,2,3,4,5,6,7", "-1,4", "16,,32", "9" * 30, "é", "😀", "\u202e",
                     "\x00", "a\nb", "..", "/", "/dev/null", "/proc/self", "~", "$HOME", "'", '"',
                     "\\", "a'b", 'a"b']),
)


@st.composite
def toml_values(draw: st.DrawFn) -> str:
    """One TOML value as text (sometimes deliberately invalid TOML)."""
    kind = draw(st.sampled_from(["int", "float", "special", "bool", "str", "array", "table", "date", "junk"]))
    if kind == "int":
        return str(draw(st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 1, 2**63 - 1, 2**64]))))
    if kind == "float":
        return repr(draw(st.floats(allow_nan=False, allow_infinity=False)))
    if kind == "special":
        return draw(st.sampled_from(["nan", "+nan", "-nan", "inf", "+inf", "-inf", "1e999", "-0.0", "5e-324",
                                     "1_000", "0x1F", "0o7", "0b1", "1.", ".5", "1e", "1__0"]))
    if kind == "bool":
        return draw(st.sampled_from(["true", "false", "True", "FALSE", "yes"]))
    if kind == "str":
        return _toml_string(draw(_hostile_text), draw(st.sampled_from(['"', "'"])))
    if kind == "array":
        return draw(st.sampled_from(["[]", "[1,2]", "['a']", "[[1],[2]]", "[1,'a']", "[{a=1}]", "[1,"]))
    if kind == "table":
        return draw(st.sampled_from(["{}", "{a=1}", "{mode='sample'}", "{a={b={c=1}}}", "{x=[1,2]}", "{"]))
    if kind == "date":
        return draw(st.sampled_from(["1979-05-27", "07:32:00", "1979-05-27T07:32:00Z",
                                     "1979-05-27T00:32:00.999999-07:00", "1979-05-27 07:32:00"]))
    return draw(st.sampled_from(["", "=", "==", "'unterminated", '"unterminated', '"a"b"', "[", "}", "#",
                                 "\\", "\x00", "😀", "1 2"]))


_unknown_keys = st.one_of(
    st.sampled_from(["lrr", "num-server-round", "privacy.mod", "privacy", "privacy.mode.x", "checkpoint",
                     "Seed", "seed.x", "a b", "'quoted'", '"a.b"', '"a\\nb"', "é", "x" * 200, "tool.flwr",
                     "-", "_", "1"]),
    st.from_regex(r"[a-z][a-z0-9.\-]{0,20}", fullmatch=True),
)


@st.composite
def overrides(draw: st.DrawFn) -> list[str]:
    pairs = []
    for _ in range(draw(st.integers(1, 4))):
        key = draw(st.one_of(st.sampled_from(DECLARED), st.sampled_from(DECLARED), _unknown_keys))
        pairs.append(f"{key}={draw(toml_values())}")
    return pairs


def _dry_run(argv_tail: list[str], tmp: Path) -> None:
    """``fedscan run --dry-run`` in ``tmp`` (relative paths land there); check the contract."""
    before = sorted(p.name for p in tmp.iterdir())
    stage = PROJECT / ".flwr" / "stage" / str(os.getpid())
    with contextlib.chdir(tmp):
        code, out, err = run_cli(main, ["run", str(PROJECT), "--dry-run", "--hospitals", "2", *argv_tail])
    assert_cli_contract(code, out, err)
    assert sorted(p.name for p in tmp.iterdir()) == before, "the dry run wrote files"
    assert not stage.exists(), "the dry run staged the app"
    if code == 0:
        assert "nothing was started" in out


@fuzz_settings(700)
@given(pairs=overrides(), split=st.booleans())
def test_hostile_run_config_values_and_keys(pairs: list[str], split: bool) -> None:
    count("run config: -c values")
    with tempfile.TemporaryDirectory(prefix="fedscan-fuzz-") as tmp:
        # Paths default into tmp so a valid config touches nothing else; fuzzed pairs override.
        paths = [f"output-dir='{tmp}/out'", f"cache-dir='{tmp}/cache'"]
        base = " ".join([*BASE, *paths])
        # One -c with every pair, or one -c per pair (fedscan merges them key by key).
        argv = ["-c", " ".join([base, *pairs])] if not split else [x for p in [base, *pairs] for x in ("-c", p)]
        _dry_run(argv, Path(tmp))
        assert not (Path(tmp) / "out").exists() and not (Path(tmp) / "cache").exists()


@st.composite
def toml_files(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["bytes", "text", "pairs", "tables"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "text":
        return draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    lines = []
    if kind == "pairs":
        for _ in range(draw(st.integers(0, 6))):
            key = draw(st.one_of(st.sampled_from(DECLARED), _unknown_keys))
            if "." in key and draw(st.booleans()):  # dotted keys as a [table] instead
                table, leaf = key.split(".", 1)
                lines += [f"[{table}]", f"{leaf} = {draw(toml_values())}"]
            else:
                lines.append(f"{key} = {draw(toml_values())}")
    else:
        lines += draw(st.lists(st.sampled_from([
            "[privacy]", "mode = 'sample'", "[privacy.deep.er]", "x = 1", "[[privacy]]", "[[a.b]]",
            "[checkpoint]", "every = 1979-05-27", "keep = [1, 2]", "resume-from = {a = 1}", "[]",
            "[privacy", "seed = 0", "seed = 1", "lr = 0.1", "date = 07:32:00", "'key' = 'v'",
            '"privacy.mode" = "sample"', "\ufeffseed = 1", "a.b.c = 1", "=1",
        ]), max_size=8))
    return "\n".join(lines).encode("utf-8", "surrogatepass")


@fuzz_settings(300)
@given(content=toml_files())
def test_hostile_toml_override_files(content: bytes) -> None:
    count("run config: .toml files")
    with tempfile.TemporaryDirectory(prefix="fedscan-fuzz-") as tmp:
        path = Path(tmp) / "overrides.toml"
        path.write_bytes(content)
        _dry_run(["-c", str(path)], Path(tmp))
        assert path.read_bytes() == content


def test_the_baseline_is_valid_so_the_fuzz_reaches_every_key(tmp_path: Path) -> None:
    # Without this, every case could fail on the baseline and the fuzz would test nothing.
    base = " ".join([*BASE, f"output-dir='{tmp_path}/out'", f"cache-dir='{tmp_path}/cache'"])

    with contextlib.chdir(tmp_path):
        code, out, err = run_cli(main, ["run", str(PROJECT), "--dry-run", "--hospitals", "2", "-c", base])

    assert code == 0, err
    assert "num-server-rounds = 2" in out


EDGE_CASES = {
    "nul in output-dir": ['output-dir="a\\u0000b"'],
    "nul in cache-dir": ['cache-dir="\\u0000"'],
    "nul in keyring": ['checkpoint.keyring="k\\u0000"'],
    "nul in resume-from": ['checkpoint.resume-from="r\\u0000"'],
    "newline in an unknown key": ['"a\\nb"=1'],
    "newline in a choice": ['strategy="fed\\navg"'],
    "carriage return in a path": ['output-dir="a\\rb"'],
    "output-dir under a file": ["output-dir='/etc/passwd/x'"],
    "output-dir in /proc": ["output-dir='/proc/self/x'"],
    "resume-from a device": ["checkpoint.resume-from='/dev/null'"],
    "keyring is a file": ["checkpoint.keyring='/etc/passwd'"],
    "huge int": ["seed=" + "9" * 4000],
    "huge float": ["lr=1e999"],
    "deep inline table": ["privacy=" + "{a=" * 200 + "1" + "}" * 200],
    "array of tables key": ["privacy.mode=[{a=1}]"],
    "date": ["num-server-rounds=1979-05-27T07:32:00Z"],
    "unicode key": ["é=1"],
    "empty key": ['""=1'],
}


# Defects found by this fuzzing in files owned elsewhere, reported to the lead: a NUL byte in
# a checkpoint path reaches Path.resolve() (ValueError traceback) and an unknown key is quoted
# raw, so a newline in it splits the error line. strict: the marker must go when fixed.
_KNOWN: dict[str, str] = {}


@pytest.mark.parametrize(
    "pairs",
    [
        pytest.param(pairs, id=name, marks=[pytest.mark.xfail(strict=True, reason=_KNOWN[name])] if name in _KNOWN else [])
        for name, pairs in EDGE_CASES.items()
    ],
)
def test_edge_cases(pairs: list[str], tmp_path: Path) -> None:
    count("run config: edge cases")
    base = " ".join([*BASE, f"output-dir='{tmp_path}/out'", f"cache-dir='{tmp_path}/cache'"])
    _dry_run(["-c", " ".join([base, *pairs])], tmp_path)
