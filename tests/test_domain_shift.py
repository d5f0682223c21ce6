"""End to end: the domain-shift scenario's strategies, baselines and mitigations in real Flower runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from privacy.checkpoint import read_checkpoint
from privacy.keys import load_keyring
from scenarios.normalization import local_state_names
from sims.anatomy import class_names
from sims.model import make_model
from tests.test_end_to_end import _finish, _flower_processes, _start

TINY = (
    "image-size=32 unet-channels='8,16' patients-per-hospital=20 holdout-per-hospital=4 server-eval-patients=8 "
    "scenario='domain_shift'"
)
# 5 hospitals: 0-2 train (2 joins in round 2; 0 annotates noisily), 3-4 evaluate only (severity 2).
FEDBN = (
    "num-server-rounds=2 strategy='fedbn' norm='batch' mitigation.tta='adabn' mitigation.standardize='histogram' "
    "mitigation.scanner-augment=true finetune-epochs=1 shift.unseen-hospitals=2 shift.unseen-severities='2' "
    "shift.late-join-round=2 shift.label-noise-hospital=0 shift.label-noise-rate=0.5"
)
# 3 hospitals: 0-1 train, 2 evaluates only; one round.
LOCAL = (
    "num-server-rounds=1 strategy='local' norm='instance-affine' mitigation.standardize='zscore' "
    "privacy.mode='sample' privacy.target-epsilon=8 privacy.delta=1e-3 shift.unseen-hospitals=1"
)
POOLED = "num-server-rounds=1 strategy='pooled' norm='group' shift.unseen-hospitals=1"


def _frame(run: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(run / name, dtype={"site": str})


@pytest.mark.e2e
def test_every_strategy_and_mitigation_runs_and_fedbn_keeps_its_layers_local(tmp_path: Path) -> None:
    # (That a resume restores FedBN's layers bit for bit: tests/clients/test_local_weights.py;
    # that a resumed run equals an uninterrupted one: tests/test_end_to_end.py.)
    before = _flower_processes()
    cache = f"cache-dir='{tmp_path / 'cache'}'"
    out = {name: tmp_path / name for name in ("fedbn", "local", "pooled")}
    fedbn = ["--hospitals", "5", "-c", f"{TINY} {FEDBN} {cache}"]
    runs = {
        "fedbn": _start(*fedbn, "-c", f"output-dir='{out['fedbn']}'", log=tmp_path / "fedbn.log"),
        "local": _start("--hospitals", "3", "-c", f"{TINY} {LOCAL} {cache} output-dir='{out['local']}'",
                        log=tmp_path / "local.log"),
        "pooled": _start("--hospitals", "3", "-c", f"{TINY} {POOLED} {cache} output-dir='{out['pooled']}'",
                         log=tmp_path / "pooled.log"),
    }
    for proc in runs.values():
        _finish(proc)
    run = {name: (path / "latest").resolve() for name, path in out.items()}

    # --- FedBN with every mitigation, a late joiner and a noisy annotator ------------------
    messages = _frame(run["fedbn"], "messages.csv")
    trained = messages[messages["message_type"] == "train"]
    assert set(trained.query("round == 1")["site"]) == {"0", "1"}  # the late joiner waits
    assert set(trained.query("round == 2")["site"]) == {"0", "1", "2"}
    unseen = messages[messages["phase"] == "evaluate-unseen"]
    assert sorted(unseen["site"]) == ["3", "3", "4", "4"]  # asked to evaluate, never to train
    metrics = _frame(run["fedbn"], "metrics.csv")
    assert set(metrics.query("split == 'train' and site != 'global'")["site"]) == {"0", "1", "2"}  # none from 3, 4
    final = metrics.query("round == 2 and metric == 'dice_mean'").set_index(["site", "split"])["value"]
    for site, split in [("3", "unseen"), ("4", "unseen"), ("3", "unseen-tta"), ("global", "unseen-tta"),
                        ("0", "finetuned"), ("global", "finetuned"), ("2", "test")]:
        assert 0.0 <= final[site, split] <= 1.0
    assert set(metrics.query("split == 'shift'")["site"]) == {"0", "1", "2", "3", "4"}
    # What left each hospital before round 1, as the server received it: its id, 11 landmarks
    # (histogram standardisation) and a 48-bin histogram (the shift measure). Numbers, no image.
    summaries = json.loads((run["fedbn"] / "summaries.json").read_text())
    assert sorted(summaries) == ["0", "1", "2", "3", "4"]
    for site, sent in summaries.items():
        assert sorted(sent) == ["histogram", "landmarks", "site"] and sent["site"] == int(site)
        assert len(sent["landmarks"]) == 11 and len(sent["histogram"]) == 48
        assert np.isclose(sum(sent["histogram"]), 1.0) and np.all(np.diff(sent["landmarks"]) >= 0)
    roles = json.loads((run["fedbn"] / "config.json").read_text())["roles"]
    assert [r["role"] for r in roles] == ["train"] * 3 + ["unseen"] * 2
    assert roles[2]["join_round"] == 2 and roles[0]["label_noise_rate"] == 0.5 and roles[3]["severity"] == 2.0

    # The normalisation layers never left the hospitals: the global model still holds their
    # initial values (up to the float32 rounding of Flower's weighted mean of equal values),
    # while each hospital's encrypted state holds its own, trained.
    model = make_model(len(class_names(True)), (8, 16), seed=0, norm="batch")
    names = local_state_names(model)
    initial = model.state_dict()
    server = read_checkpoint(run["fedbn"] / "checkpoints" / "round-0002.ckpt", keyring=load_keyring(run["fedbn"] / "keys"))
    for name in names:
        kept = server.tensors[f"arrays/{name}"].to(initial[name].dtype)
        assert torch.allclose(kept, initial[name], rtol=0, atol=1e-6), name
    state = read_checkpoint(run["fedbn"] / "hospitals" / "hospital-0000" / "round-0002.ckpt",
                            keyring=load_keyring(run["fedbn"] / "keys" / "hospital-0000"))
    assert sorted(state.tensors) == sorted(names)
    moved = [n for n in names if n.endswith("running_mean") and not torch.equal(state.tensors[n], initial[n])]
    assert moved and all(torch.isfinite(state.tensors[n]).all() for n in names)

    # --- Local-only with DP-SGD: the site-by-site matrix, an epsilon per training hospital -------
    local = _frame(run["local"], "metrics.csv")
    cross = local[local["split"].str.startswith("model-") & (local["metric"] == "dice_mean")]
    pairs = {(split, site) for split, site in zip(cross["split"], cross["site"], strict=True) if site != "global"}
    assert pairs == {("model-0", "1"), ("model-0", "2"), ("model-1", "0"), ("model-1", "2")}
    assert "unseen" not in set(local["split"])  # a local-only run has no global model to show them
    privacy = _frame(run["local"], "privacy.csv")
    hospitals = privacy[privacy["site"].str.isdigit()]
    assert set(hospitals["site"]) == {"0", "1"} and 0 < hospitals["epsilon_rdp"].max() <= 8.0

    # --- Pooled: no hospital is asked to train; the server trains on the pooled splits --------
    pooled = _frame(run["pooled"], "messages.csv")
    assert "train" not in set(pooled["message_type"])
    rows = _frame(run["pooled"], "metrics.csv")
    assert rows.query("split == 'train'")["site"].tolist() == ["pooled"]
    assert np.isfinite(rows.query("split == 'unseen'")["value"]).all()
    assert _flower_processes() <= before
