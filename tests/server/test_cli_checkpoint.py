"""`fedscan keygen` and `fedscan checkpoint verify|inspect|export`.

The checkpoints are written with :func:`privacy.checkpoint.write_checkpoint` in the layout a
run leaves (`<run>/checkpoints/round-NNNN.ckpt` with `arrays/`, `strategy/` and `rng/`
tensors as :class:`server.checkpointing.ServerCheckpointer` writes them, hospital state in
`<run>/hospitals/hospital-NNNN/round-RRRR.ckpt` under `<run>/keys/hospital-NNNN/`, and
`<run>/config.json`), so the CLI finds keys and model shape as it does for a real run.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from privacy.checkpoint import write_checkpoint
from privacy.keys import generate_keyring, load_keyring
from server.cli import EXIT_USER_ERROR, main
from server.launcher import project_defaults
from sims.anatomy import class_names
from sims.config import config_from_run_config
from sims.model import make_model

ROOT = Path(__file__).resolve().parents[2]
CHANNELS = (8, 16)


@dataclass
class Run:
    folder: Path
    server: Path  # <run>/checkpoints/round-0002.ckpt
    hospital: Path  # <run>/hospitals/hospital-0001/round-0002.ckpt
    model: torch.nn.Module  # the weights in `server`


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedscan: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture()
def run(tmp_path: Path) -> Run:
    folder = tmp_path / "outputs" / "20260101-000000-run7"
    config = config_from_run_config({**project_defaults(ROOT), "unet-channels": "8,16", "image-size": 32})
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"config": config.to_dict(), "num_hospitals": 2}))
    keyring = generate_keyring(folder / "keys")
    hospital_keys = generate_keyring(folder / "keys" / "hospital-0001")
    model = make_model(len(class_names(config.world.lesions)), CHANNELS, seed=3)
    tensors = {f"arrays/{k}": v for k, v in model.state_dict().items()}
    tensors["strategy/m_t/0"] = torch.zeros(3)
    tensors["rng/numpy"] = torch.arange(624, dtype=torch.int64)
    server = write_checkpoint(
        folder / "checkpoints" / "round-0002.ckpt", keyring=keyring, kind="server", run_id="7", round=2,
        config_hash="h", tensors=tensors, state={"metrics": []}, meta={"strategy": "fedavg", "privacy": "off"},
    )
    hospital = write_checkpoint(
        folder / "hospitals" / "hospital-0001" / "round-0002.ckpt", keyring=hospital_keys, kind="hospital",
        run_id="hospital-1", round=2, config_hash="h", tensors={}, state={"ledger": []},
    )
    return Run(folder, server, hospital, model)


# ----------------------------------------------------------------------------- keygen


def test_keygen_writes_private_files_0600_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    assert main(["keygen", str(keys)]) == 0

    again = main(["keygen", str(keys)])

    assert stat.S_IMODE((keys / "encryption.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((keys / "signing.key").stat().st_mode) == 0o600
    assert again == EXIT_USER_ERROR and "Pass --overwrite" in _one_error_line(capsys.readouterr().err)


def test_keygen_hospitals_makes_one_private_keyring_per_hospital(tmp_path: Path) -> None:
    keys = tmp_path / "keys"

    code = main(["keygen", str(keys), "--hospitals", "3"])

    assert code == 0
    ids = set()
    for site in range(3):
        folder = keys / f"hospital-{site:04d}"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE((folder / "encryption.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((folder / "signing.key").stat().st_mode) == 0o600
        ids.add(load_keyring(folder).key_id)
    ids.add(load_keyring(keys).key_id)
    assert len(ids) == 4  # every hospital has keys of its own
    assert not (keys / "hospital-0003").exists()


def test_keygen_refusal_leaves_nothing_half_made(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    generate_keyring(keys / "hospital-0001")

    code = main(["keygen", str(keys), "--hospitals", "2"])

    assert code == EXIT_USER_ERROR and "hospital-0001" in _one_error_line(capsys.readouterr().err)
    assert not (keys / "encryption.key").exists() and not (keys / "hospital-0000").exists()
    assert main(["keygen", str(tmp_path / "k2"), "--hospitals", "-1"]) == EXIT_USER_ERROR


# ----------------------------------------------------------------------------- verify


def test_verify_finds_the_runs_own_keys_for_server_and_hospital_files(
    run: Run, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()

    codes = [main(["checkpoint", "verify", str(run.server)]), main(["checkpoint", "verify", str(run.hospital)])]

    out = capsys.readouterr().out.splitlines()
    assert codes == [0, 0]
    assert "signature and GCM tag valid" in out[0] and str(run.folder / "keys") in out[0]
    assert "hospital" in out[1] and str(run.folder / "keys" / "hospital-0001") in out[1]


def test_verify_with_only_the_public_key(run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    public = tmp_path / "shared" / "verify.pub"  # what a hospital would hand out: no secret keys
    public.parent.mkdir()
    public.write_bytes((run.folder / "keys" / "verify.pub").read_bytes())
    capsys.readouterr()

    code = main(["checkpoint", "verify", str(run.server), "--verify-key", str(public)])

    assert code == 0 and "signature valid" in capsys.readouterr().out
    # The run's keyring holding only verify.pub (secret keys moved away) still verifies.
    (run.folder / "keys" / "encryption.key").unlink()
    (run.folder / "keys" / "signing.key").unlink()
    assert main(["checkpoint", "verify", str(run.server)]) == 0
    assert "signature valid" in capsys.readouterr().out


def test_verify_with_the_keyring_option_also_for_a_hospital_file(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    keys = str(run.folder / "keys")

    codes = [
        main(["checkpoint", "verify", str(run.server), "--keyring", keys]),
        main(["checkpoint", "verify", str(run.hospital), "--keyring", keys]),  # its hospital-0001 sub-folder
    ]

    assert codes == [0, 0]
    assert capsys.readouterr().out.count("signature and GCM tag valid") == 2


def test_verify_refuses_hostile_input_with_one_sentence_naming_a_command(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lonely = tmp_path / "copied.ckpt"  # outside any run folder: no keys to find
    lonely.write_bytes(run.server.read_bytes())
    tampered = tmp_path / "outputs" / "20260101-000000-run7" / "checkpoints" / "round-0003.ckpt"
    data = bytearray(run.server.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key")
    server_pub = str(run.folder / "keys" / "verify.pub")
    cases = [
        (["checkpoint", "verify", str(lonely)], "--verify-key"),
        (["checkpoint", "verify", str(run.hospital), "--verify-key", server_pub], "hospital-0001/verify.pub"),
        (["checkpoint", "verify", str(run.server), "--verify-key", str(run.folder / "keys")], "a folder"),
        (["checkpoint", "verify", str(run.server), "--verify-key", str(tmp_path / "none.pub")], "fedscan keygen"),
        (["checkpoint", "verify", str(run.server), "--verify-key", str(garbage)], "not a PEM public key"),
        (["checkpoint", "verify", str(tampered)], "signature"),
        (["checkpoint", "verify", str(run.folder / "checkpoints")], "is a folder"),
        (["checkpoint", "verify", str(run.server), "--keyring", str(tmp_path / "nope")], "fedscan keygen DIR"),
        (["checkpoint", "verify", str(run.server), "--keyring", "k", "--verify-key", "v"], "not allowed with"),
    ]
    capsys.readouterr()

    for argv, expected in cases:
        code = main(argv)

        line = _one_error_line(capsys.readouterr().err)
        assert code == EXIT_USER_ERROR and expected in line, (argv, line)


def test_verify_without_verify_pub_in_the_run_keys(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    (run.folder / "keys" / "verify.pub").unlink()

    code = main(["checkpoint", "verify", str(run.server)])

    assert code == EXIT_USER_ERROR and "`fedscan checkpoint verify" in _one_error_line(capsys.readouterr().err)


def test_inspect_shows_the_header_and_no_weights(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()

    assert main(["checkpoint", "inspect", str(run.server)]) == 0

    header = json.loads(capsys.readouterr().out)
    assert header["round"] == 2 and header["run_id"] == "7" and header["kind"] == "server"
    assert "arrays" not in json.dumps(header)


# ----------------------------------------------------------------------------- export


def test_export_writes_a_state_dict_that_make_model_loads_as_is(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model.pt"
    capsys.readouterr()

    code = main(["checkpoint", "export", str(run.server), str(out)])

    printed = capsys.readouterr().out
    assert code == 0
    classes = len(class_names(True))
    assert f"make_model({classes}, {CHANNELS})" in printed  # from the run's config.json
    fresh = make_model(classes, CHANNELS, seed=99)
    fresh.load_state_dict(torch.load(out, weights_only=True))  # strict: no extra, no missing key
    for name, value in run.model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value)


def test_export_reads_the_model_shape_from_the_header_when_there_is_no_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    keyring = generate_keyring(keys)
    model = make_model(4, (8, 16, 32))
    path = write_checkpoint(
        tmp_path / "loose.ckpt", keyring=keyring, kind="server", run_id="1", round=1, config_hash="h",
        tensors={f"arrays/{k}": v for k, v in model.state_dict().items()}, state={},
        meta={"num_classes": 4, "unet_channels": [8, 16, 32]},
    )

    code = main(["checkpoint", "export", str(path), str(tmp_path / "m.pt"), "--keyring", str(keys)])

    assert code == 0 and "make_model(4, (8, 16, 32))" in capsys.readouterr().out
    make_model(4, (8, 16, 32)).load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))


def test_export_refuses_hostile_input_and_writes_nothing(
    run: Run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exists = tmp_path / "exists.pt"
    exists.write_bytes(b"keep me")
    other = tmp_path / "other-keys"
    generate_keyring(other)
    lonely = tmp_path / "copied.ckpt"
    lonely.write_bytes(run.server.read_bytes())
    new = tmp_path / "new.pt"
    cases = [
        (["checkpoint", "export", str(run.server), str(exists)], "Refusing to overwrite"),
        (["checkpoint", "export", str(run.server), str(tmp_path)], "it is a folder"),
        (["checkpoint", "export", str(run.hospital), str(new)], "holds no model"),
        (["checkpoint", "export", str(run.server), str(new), "--keyring", str(other)], "signed by key"),
        (["checkpoint", "export", str(lonely), str(new)], "--keyring DIR"),
        (["checkpoint", "export", str(run.server), str(tmp_path / "no" / "such" / "x.pt")], "does not exist"),
        (["checkpoint", "export", str(run.folder / "checkpoints"), str(new)], "is a folder"),
    ]
    capsys.readouterr()

    for argv, expected in cases:
        code = main(argv)

        line = _one_error_line(capsys.readouterr().err)
        assert code == EXIT_USER_ERROR and expected in line, (argv, line)
    assert exists.read_bytes() == b"keep me" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copied.ckpt", "exists.pt", "other-keys", "outputs"]
