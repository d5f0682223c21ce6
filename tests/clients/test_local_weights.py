"""What stays at a hospital under FedBN and local-only training, without a Flower run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import RecordDict

from clients.client_app import LOCAL_KEY, _keep_local, _local_weights
from clients.hospital import Hospital
from scenarios.normalization import local_state_names
from sims.config import config_from_run_config

TINY = {"image-size": 32, "unet-channels": "8,16", "patients-per-hospital": 20, "holdout-per-hospital": 2}


def _hospital(tmp_path: Path, **keys: object) -> Hospital:
    return Hospital.from_partition(config_from_run_config({**TINY, "cache-dir": str(tmp_path), **keys}), 0, 2)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter and running statistic moved, as local training would."""
    with torch.no_grad():
        for i, value in enumerate(model.state_dict().values()):
            value.add_(0.1 * (i + 1) if value.is_floating_point() else 3)
    return model


@pytest.mark.parametrize("norm", ["batch", "group", "instance-affine"])
def test_fedbn_sends_back_what_it_received_for_its_norm_layers_and_keeps_its_own(tmp_path: Path, norm: str) -> None:
    hospital = _hospital(tmp_path, strategy="fedbn", norm=norm)
    context = SimpleNamespace(state=RecordDict())
    model = hospital.new_model()
    received = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trained = _perturbed(model)
    names = local_state_names(trained)

    outgoing = _keep_local(hospital, trained, received, context)  # type: ignore[arg-type]

    assert names and set(outgoing) == set(received)
    for name, value in outgoing.items():
        expected = received[name] if name in names else trained.state_dict()[name]
        assert torch.equal(value, expected), name  # bit for bit
    kept = context.state.array_records[LOCAL_KEY].to_torch_state_dict()
    assert sorted(kept) == sorted(names)
    assert all(torch.equal(kept[n], trained.state_dict()[n]) for n in names)

    # The next message brings the global model; the hospital's own layers go back in, bit for bit.
    fresh = hospital.new_model()
    fresh.load_state_dict(received)
    _local_weights(hospital, fresh, context)  # type: ignore[arg-type]
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, kept[name] if name in names else received[name]), name


def test_local_only_keeps_its_whole_model_and_uses_it_instead_of_the_global_one(tmp_path: Path) -> None:
    hospital = _hospital(tmp_path, strategy="local")
    context = SimpleNamespace(state=RecordDict())
    model = hospital.new_model()
    received = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trained = _perturbed(model)

    outgoing = _keep_local(hospital, trained, received, context)  # type: ignore[arg-type]
    fresh = hospital.new_model()
    fresh.load_state_dict(received)
    _local_weights(hospital, fresh, context)  # type: ignore[arg-type]

    assert all(torch.equal(outgoing[k], v) for k, v in trained.state_dict().items())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in trained.state_dict().items())


def test_fedavg_keeps_nothing_local(tmp_path: Path) -> None:
    hospital = _hospital(tmp_path, norm="batch")
    context = SimpleNamespace(state=RecordDict())
    model = hospital.new_model()
    received = {k: v.detach().clone() for k, v in model.state_dict().items()}

    outgoing = _keep_local(hospital, _perturbed(model), received, context)  # type: ignore[arg-type]

    assert LOCAL_KEY not in context.state.array_records
    assert all(torch.equal(outgoing[k], v) for k, v in model.state_dict().items())


def test_fedbn_layers_survive_a_resume_bit_for_bit_through_the_encrypted_state(tmp_path: Path) -> None:
    from flwr.app import ConfigRecord

    from clients.client_app import _persist, _restore_if_resuming, _status
    from clients.hospital_state import state_path

    hospital = _hospital(tmp_path / "cache", strategy="fedbn", norm="batch")
    node = {"partition-id": 0, "num-partitions": 2}
    before = SimpleNamespace(state=RecordDict(), node_config=node)
    model = hospital.new_model()
    received = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _keep_local(hospital, _perturbed(model), received, before)  # type: ignore[arg-type]
    _status(before)["trained-round"] = 1  # type: ignore[arg-type]
    run, keys = tmp_path / "run", tmp_path / "run" / "keys"
    saved = ConfigRecord({"run-dir": str(run), "key-root": str(keys), "key-create": 1, "kept-rounds": "1"})
    _persist(hospital, before, saved, 1)  # type: ignore[arg-type]

    # A resumed run: a fresh context, the state read back from the hospital's encrypted file.
    after = SimpleNamespace(state=RecordDict(), node_config=node)
    resume = ConfigRecord({"resume-dir": str(run), "resume-key-root": str(keys), "resume-round": 1, "run-dir": ""})
    _restore_if_resuming(hospital, after, resume)  # type: ignore[arg-type]

    kept = before.state.array_records[LOCAL_KEY].to_torch_state_dict()
    back = after.state.array_records[LOCAL_KEY].to_torch_state_dict()
    assert sorted(back) == sorted(kept) == sorted(local_state_names(model))
    assert all(torch.equal(back[n], kept[n]) and back[n].dtype == kept[n].dtype for n in kept)
    blob = state_path(run, 0, 1).read_bytes()
    assert kept["model.0.adn.N.running_var"].numpy().tobytes() not in blob  # encrypted at rest
