"""`fedscan keygen` and `fedscan checkpoint verify|inspect|export`."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch

from privacy.checkpoint import write_checkpoint
from privacy.keys import load_keyring
from server.cli import EXIT_USER_ERROR, main


@pytest.fixture()
def signed(tmp_path: Path) -> tuple[Path, Path]:
    keys = tmp_path / "keys"
    assert main(["keygen", str(keys)]) == 0
    path = write_checkpoint(
        tmp_path / "round-3.ckpt", keyring=load_keyring(keys), kind="server", run_id="run1", round=3,
        config_hash="abc", tensors={"w": torch.arange(6.0).reshape(2, 3)}, state={"round": 3},
    )
    return keys, path


def test_keygen_writes_private_files_0600_and_refuses_to_overwrite(
    signed: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    keys, _ = signed

    again = main(["keygen", str(keys)])

    assert stat.S_IMODE((keys / "encryption.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((keys / "signing.key").stat().st_mode) == 0o600
    assert again == EXIT_USER_ERROR and "Pass --overwrite" in capsys.readouterr().err


def test_verify_inspect_export_round_trip(signed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys, path = signed
    capsys.readouterr()

    assert main(["checkpoint", "verify", str(path), "--keyring", str(keys)]) == 0
    assert main(["checkpoint", "inspect", str(path)]) == 0
    header = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert header["round"] == 3 and header["run_id"] == "run1" and "w" not in json.dumps(header["meta"])
    assert main(["checkpoint", "export", str(path), str(tmp_path / "w.pt"), "--keyring", str(keys)]) == 0
    exported = torch.load(tmp_path / "w.pt", weights_only=True)
    assert torch.equal(exported["w"], torch.arange(6.0).reshape(2, 3))


def test_tampered_file_and_wrong_keyring_fail_with_one_line(
    signed: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys, path = signed
    other = tmp_path / "other-keys"
    main(["keygen", str(other)])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered = tmp_path / "tampered.ckpt"
    tampered.write_bytes(bytes(data))
    capsys.readouterr()

    codes = [
        main(["checkpoint", "verify", str(tampered), "--keyring", str(keys)]),
        main(["checkpoint", "verify", str(path), "--keyring", str(other)]),
        main(["checkpoint", "export", str(path), str(tmp_path / "x.pt"), "--keyring", str(other)]),
    ]

    err = capsys.readouterr().err.strip().splitlines()
    assert codes == [EXIT_USER_ERROR] * 3
    assert len(err) == 3 and all(line.startswith("fedscan: error: ") for line in err)
    assert not (tmp_path / "x.pt").exists()
