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


# The OOD and robustness scenarios and adversarial training ride on the same runs (each run costs
# ~20 s of start-up): FedBN without DP trains adversarially and runs both scenarios; local-only
# with DP-SGD trains adversarially and runs the robustness curves on z-scored images.
SCENARIOS = (
    "adv-train.ratio=0.5 adv-train.steps=1 ood.scores='all' robustness.noise='0,0.05' robustness.rotation='0,10' "
    "attack.kinds='all' attack.eps='0,4' attack.l2-eps='0,0.5' attack.steps=2"
)
DP_ADVERSARIAL = "adv-train.ratio=0.5 adv-train.steps=2 robustness.blur='0,1' attack.kinds='fgsm' attack.eps='0,4'"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp_path = tmp_path_factory.mktemp("domain_shift")
    before = _flower_processes()
    cache = f"cache-dir='{tmp_path / 'cache'}'"
    out = {name: tmp_path / name for name in ("fedbn", "local", "pooled")}
    fedbn = ["--hospitals", "5", "-c", f"{TINY} {FEDBN} {SCENARIOS} {cache}"]
    runs = {
        "fedbn": _start(*fedbn, "-c", f"output-dir='{out['fedbn']}'", log=tmp_path / "fedbn.log"),
        "local": _start("--hospitals", "3", "-c", f"{TINY} {LOCAL} {DP_ADVERSARIAL} {cache} output-dir='{out['local']}'",
                        log=tmp_path / "local.log"),
        "pooled": _start("--hospitals", "3", "-c", f"{TINY} {POOLED} {cache} output-dir='{out['pooled']}'",
                         log=tmp_path / "pooled.log"),
    }
    _finish(runs["local"])  # one round: done first
    # The scenarios on a trained model: resume local-only + DP-SGD from its last round with an OOD
    # and a robustness evaluation it did not have (evaluation-only keys do not bind a resume).
    evaluation = "ood.scores='energy,mahalanobis' ood.sets='noise,shapes' robustness.noise='0,0.1'"
    again = _start("--hospitals", "3", "-c", f"{TINY} {LOCAL} {DP_ADVERSARIAL} {evaluation} {cache}",
                   "-c", f"output-dir='{tmp_path / 'again'}' checkpoint.resume-from='{(out['local'] / 'latest').resolve()}'",
                   log=tmp_path / "again.log")
    for proc in (runs["fedbn"], runs["pooled"], again):
        _finish(proc)
    assert _flower_processes() <= before
    return {name: (path / "latest").resolve() for name, path in {**out, "again": tmp_path / "again"}.items()}


@pytest.mark.e2e
def test_every_strategy_and_mitigation_runs_and_fedbn_keeps_its_layers_local(run: dict[str, Path]) -> None:
    # (That a resume restores FedBN's layers bit for bit: tests/clients/test_local_weights.py;
    # that a resumed run equals an uninterrupted one: tests/test_end_to_end.py.)
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


def _final_test_dice(run_dir: Path) -> pd.Series:
    metrics = _frame(run_dir, "metrics.csv")
    rows = metrics[(metrics["round"] == metrics["round"].max()) & (metrics["split"] == "test")]
    return rows[rows["metric"] == "dice_mean"].set_index("site")["value"]


@pytest.mark.e2e
def test_ood_robustness_and_adversarial_training_run_end_to_end(run: dict[str, Path]) -> None:
    fedbn, local = run["fedbn"], run["local"]
    # --- What was asked of whom: statistics from the training hospitals, scores from everyone ---
    messages = _frame(fedbn, "messages.csv")
    asked = {phase: sorted(set(rows["site"])) for phase, rows in messages.groupby("phase")}
    assert asked["ood-stats"] == ["0", "1", "2"] and asked["robustness"] == ["0", "1", "2"]
    assert asked["ood"] == ["0", "1", "2", "3", "4"]

    # --- OOD: every set and method, metrics in range; per-image Dice is the hospital's own -------
    table = _frame(fedbn, "ood.csv")
    assert set(table["ood_set"]) == {
        "noise", "blur", "strong-noise", "strong-blur", "motion", "inverted", "ct-like", "shapes", "phantom",
        "scanner-sev2", "near-mixed",
    }
    assert table["method"].nunique() == 10
    auroc = table.query("metric == 'auroc'")["value"]
    assert len(auroc) == 11 * 10 and auroc.between(0, 1).all()
    assert table.query("ood_set == 'shapes' and metric == 'dice_accepted'").empty  # no labels, no Dice
    scores = _frame(fedbn, "ood_scores.csv")
    assert set(scores.query("ood_set == 'scanner-sev2'")["site"]) == {"3", "4"}
    assert set(scores.query("ood_set == 'in'")["site"]) == {"0", "1", "2"}
    assert scores.query("ood_set == 'shapes'")["dice"].isna().all()
    dice_in = scores.query("ood_set == 'in' and method == 'energy/foreground'").groupby("site")["dice"].mean()
    final = _final_test_dice(fedbn)
    for site in ("0", "1", "2"):  # the same model (its own BatchNorm layers under FedBN), the same images
        assert dice_in[site] == pytest.approx(final[site], abs=1e-6)

    # --- Robustness: strength 0 and eps 0 are the clean test Dice, for every perturbation -------
    for run_dir, perturbations in ((fedbn, 5), (local, 2)):
        curves = _frame(run_dir, "robustness.csv")
        assert curves["perturbation"].nunique() == perturbations
        clean = curves[curves["strength"] == 0].set_index(["site", "perturbation"])["value"]
        final = _final_test_dice(run_dir)
        for (site, _), value in clean.items():
            if site != "all":
                assert value == pytest.approx(final[site], abs=1e-6)
        assert set(curves["site"]) == ({"0", "1", "2", "all"} if run_dir == fedbn else {"0", "1", "all"})
        for _, rows in curves.groupby(["perturbation", "strength"]):  # "all": the patient-weighted mean
            sites = rows[rows["site"] != "all"]
            pooled = rows[rows["site"] == "all"]["value"].item()
            assert pooled == pytest.approx((sites["value"] * sites["n"]).sum() / sites["n"].sum())

    # --- Adversarial training under DP-SGD: the accounting is the plan's, the budget holds -------
    privacy = _frame(local, "privacy.csv")
    hospitals = privacy[privacy["site"].str.isdigit()]
    assert 0 < hospitals["epsilon_rdp"].max() <= 8.0
    timings = _frame(local, "timings.csv")
    assert set(timings.query("metric == 'train_seconds' and site != 'global'")["site"]) == {"0", "1"}
    assert {"ood_seconds", "robustness_seconds"} <= set(_frame(fedbn, "timings.csv")["metric"])
    report = (fedbn / "privacy_report.html").read_text()
    assert "Out-of-distribution detection" in report and "Robustness" in report


@pytest.mark.e2e
def test_scenarios_run_on_a_trained_model_by_resuming_from_its_last_round(run: dict[str, Path]) -> None:
    trained, again = run["local"], run["again"]
    messages = _frame(again, "messages.csv")
    assert set(messages["phase"]) == {"ood-stats", "ood", "robustness"}  # no hospital trained or evaluated again
    assert _frame(again, "privacy.csv").equals(_frame(trained, "privacy.csv"))  # not one more step spent
    # Each hospital evaluated its own restored local model: strength 0 is the trained run's final Dice.
    curves = _frame(again, "robustness.csv")
    clean = curves[(curves["strength"] == 0) & (curves["site"] != "all")].set_index(["site", "perturbation"])["value"]
    final = _final_test_dice(trained)
    assert len(clean) == 2 * 3  # hospitals 0 and 1 (2 only evaluates), noise, blur and fgsm
    for (site, _), value in clean.items():
        assert value == pytest.approx(final[site], abs=1e-6)
    table = _frame(again, "ood.csv")
    assert set(table["ood_set"]) == {"noise", "shapes", "unseen-scanner", "near-mixed"}
    assert set(table["method"]) == {"energy/foreground", "energy/topk", "mahalanobis/global", "mahalanobis/class",
                                    "mahalanobis/early"}
