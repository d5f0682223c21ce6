"""Run-config keys of the OOD, robustness and adversarial-training scenarios: parsed and validated."""

from __future__ import annotations

import pytest

from sims.config import ATTACKS, OOD_SCORES, OOD_SETS, ConfigError, config_from_run_config


def test_defaults_switch_everything_off() -> None:
    config = config_from_run_config({})
    assert config.ood.scores == () and not config.robustness.enabled and config.adv_train.ratio == 0.0


def test_lists_parse_sorted_and_all_expands() -> None:
    config = config_from_run_config(
        {
            "ood.scores": "all",
            "ood.sets": "shapes, noise",
            "attack.kinds": "all",
            "attack.eps": "8,0,4,4",
            "robustness.noise": "0.1,0",
            "robustness.rotation": "none",
            "adv-train.ratio": 0.5,
        }
    )
    assert config.ood.scores == OOD_SCORES and config.ood.sets == ("shapes", "noise")
    assert config.robustness.attack_kinds == ATTACKS and config.robustness.attack_eps == (0.0, 4.0, 8.0)
    assert config.robustness.noise == (0.0, 0.1) and config.robustness.rotation == ()
    assert config.robustness.enabled and config.adv_train.ratio == 0.5
    assert config_from_run_config({"ood.sets": "all"}).ood.sets == OOD_SETS


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("attack.eps", "0,-2", "'attack.eps' parameter must be \"none\" or comma-separated L-inf budgets"),
        ("attack.l2-eps", "nan", "'attack.l2-eps' parameter"),
        ("robustness.noise", "0,abc", "'robustness.noise' parameter"),
        ("robustness.rotation", "0,400", "(400 is not)"),
        ("attack.kinds", "fgsm,cw", "Got 'cw' in 'fgsm,cw' instead."),
        ("attack.kinds", "pgd_linf", "Did you mean 'pgd-linf'?"),
        ("ood.scores", "energie", "Did you mean 'energy'?"),
        ("ood.sets", "shape", "Did you mean 'shapes'?"),
        ("ood.scores", 3, "'ood.scores' parameter must be \"none\""),
        ("attack.steps", 0, "'attack.steps' parameter must be an int in [1, 1000]. Got 0 instead."),
        ("adv-train.steps", 0, "'adv-train.steps' parameter must be an int in [1, 100]"),
        ("adv-train.ratio", 1.5, "'adv-train.ratio' parameter must be a float in [0, 1]. Got 1.5 instead."),
        ("adv-train.ratio", -0.1, "'adv-train.ratio' parameter must be a float in [0, 1]"),
        ("adv-train.eps", -4.0, "'adv-train.eps' parameter must be a float in [0, 255]"),
        ("ood.tpr", 1.0, "'ood.tpr' parameter must be a float in (0, 1)"),
        ("attack.step-fraction", 0.0, "'attack.step-fraction' parameter must be a float in (0, 1]"),
        ("attack.random-start", "yes", "'attack.random-start' parameter must be true or false"),
    ],
)
def test_each_mistake_is_one_sentence(key: str, value: object, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_run_config({key: value})
    assert words in str(info.value) and str(info.value).count("\n") == 0


@pytest.mark.parametrize(
    ("run_config", "words"),
    [
        ({"attack.kinds": "pgd-l2", "attack.l2-eps": "none"}, "'attack.l2-eps' parameter must list"),
        ({"attack.kinds": "fgsm", "attack.eps": "none"}, "'attack.eps' parameter must list"),
        ({"adv-train.ratio": 0.5, "adv-train.eps": 0.0}, "'adv-train.eps' parameter must be > 0"),
        (
            {"adv-train.ratio": 0.5, "strategy": "pooled"},
            "'adv-train.ratio' parameter must be 0 with strategy",
        ),
    ],
)
def test_combinations_that_cannot_work(run_config: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        config_from_run_config(run_config)


def test_adversarial_training_binds_a_resume_and_evaluation_only_keys_do_not() -> None:
    # Adversarial training changes the trained numbers: a resume must not mix it. The OOD and
    # robustness keys only choose what is evaluated on the final model: a resume from the last
    # round may ask for another evaluation (the scenarios on a trained model).
    a = config_from_run_config({}).config_hash(4)
    assert config_from_run_config({"adv-train.ratio": 0.5}).config_hash(4) != a
    for key, value in (("attack.kinds", "fgsm"), ("ood.scores", "all"), ("robustness.blur", "0,1"), ("ood.tpr", 0.9)):
        assert config_from_run_config({key: value}).config_hash(4) == a, key
