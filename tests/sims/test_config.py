"""Config validation: every bad value stops with one sentence naming key, value and rule."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from sims.config import KEYS, ConfigError, FedscanConfig, config_from_run_config

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def declared() -> dict:
    from flwr.common.config import flatten_dict

    return flatten_dict(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])


def test_every_declared_key_is_known_and_defaults_validate() -> None:
    defaults = declared()

    config = config_from_run_config(defaults)

    assert set(defaults) == set(KEYS)
    assert isinstance(config, FedscanConfig)
    assert config.train.strategy == "fedavg"
    assert config.world.image_size == defaults["image-size"]


def test_dataclass_defaults_mirror_pyproject() -> None:
    # An empty run_config must mean the same run as pyproject's defaults.
    assert config_from_run_config({}) == config_from_run_config(declared())


def test_config_is_frozen() -> None:
    config = config_from_run_config({})
    with pytest.raises(AttributeError):
        config.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("strategy", "fedsgd", r"The 'strategy' parameter must be one of fedavg, fedprox, fedadam, fedbn, local, pooled\. Got 'fedsgd'"),
        ("strategy", "fedavgg", r"Did you mean 'fedavg'\?"),
        ("lr", -0.1, r"The 'lr' parameter must be a float in \(0, 1\]\. Got -0\.1 instead\."),
        ("lr", "fast", r"'lr' .* Got 'fast'"),
        ("num-server-rounds", 0, r"'num-server-rounds' parameter must be an int in \[1, 10000\]\. Got 0"),
        ("batch-size", 2.5, r"'batch-size' parameter must be an int"),
        ("image-size", 100, r"'image-size' parameter must be an int divisible by 8 in \[32, 256\]\. Got 100 instead\. Try 96 or 104"),
        ("lesions", "yes", r"'lesions' parameter must be true or false"),
        ("unet-channels", "16,x", r"'unet-channels' parameter must be 2 to 6 comma-separated ints"),
        ("quantity-skew", 1.5, r"'quantity-skew' parameter must be a float in \[0, 1\]\. Got 1\.5"),
    ],
)
def test_invalid_values_name_key_value_and_rule(key: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        config_from_run_config({key: value})


def test_typo_in_key_suggests_nearest_name() -> None:
    with pytest.raises(ConfigError, match=r"Unknown run-config key 'num-server-round'\. Did you mean 'num-server-rounds'\?"):
        config_from_run_config({"num-server-round": 3})


def test_image_size_must_match_unet_depth() -> None:
    # 40 is divisible by 8 but not by 16 (a 5-level U-Net halves four times).
    with pytest.raises(ConfigError, match=r"divisible by 16"):
        config_from_run_config({"image-size": 40, "unet-channels": "8,16,32,64,128"})
    assert config_from_run_config({"image-size": 48, "unet-channels": "8,16,32,64,128"}).world.image_size == 48


def test_world_errors_use_run_config_key_names() -> None:
    with pytest.raises(ConfigError, match=r"'image-size'"):
        config_from_run_config({"image-size": 8})


def test_cosine_schedule_runs_from_lr_to_a_twentieth_and_constant_is_flat() -> None:
    from sims.config import TrainSpec, round_lr

    cosine = TrainSpec(num_server_rounds=5, lr=0.01, lr_schedule="cosine")
    constant = TrainSpec(num_server_rounds=5, lr=0.01, lr_schedule="constant")

    values = [round_lr(cosine, r) for r in range(1, 6)]

    assert values[0] == pytest.approx(0.01) and values[-1] == pytest.approx(0.0005)
    assert values[2] == pytest.approx((0.01 + 0.0005) / 2)
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert [round_lr(constant, r) for r in range(1, 6)] == [0.01] * 5


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"privacy.mode": "sampel"}, r"Did you mean 'sample'\?"),
        ({"privacy.target-epsilon": 0}, r"The 'privacy.target-epsilon' parameter must be a float in \(0, inf\) or \"none\"\. Got 0 instead\."),
        ({"privacy.target-epsilon": -1.0}, r"Got -1.0 instead"),
        ({"privacy.delta": 1.5}, r"The 'privacy.delta' parameter must be a float in \(0, 1\)\. Got 1.5 instead\."),
        ({"privacy.noise-multiplier": -0.1}, r"'privacy.noise-multiplier' parameter must be a float in \[0, 10000\]"),
        ({"privacy.max-grad-norm": 0.0}, r"'privacy.max-grad-norm' parameter must be a float in \(0, 1e\+06\]\. Got 0.0"),
        (
            {"privacy.mode": "sample", "privacy.delta": 0.01, "patients-per-hospital": 150},
            r"'privacy.delta' parameter must be below 1 / \(patients in the smallest hospital\) = 1/150",
        ),
        (
            {"privacy.mode": "sample", "privacy.delta": 0.2, "quantity-skew": 0.5},
            r"1/10",
        ),
    ],
)
def test_privacy_values_are_validated(overrides: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        config_from_run_config(overrides)


def test_privacy_defaults_and_none_target() -> None:
    from sims.config import privacy_warnings

    off = config_from_run_config({})
    sample = config_from_run_config({"privacy.mode": "sample", "privacy.target-epsilon": 8})
    no_noise = config_from_run_config({"privacy.mode": "both", "privacy.noise-multiplier": 0.0})

    assert off.privacy.mode == "off" and off.privacy.target_epsilon is None and off.privacy.delta == 1e-5
    assert sample.privacy.sample_level and not sample.privacy.client_level
    assert sample.privacy.target_epsilon == 8.0
    assert privacy_warnings(off) == []
    assert privacy_warnings(no_noise) == [
        "privacy.noise-multiplier = 0 with sample-level DP on gives no privacy (epsilon = inf)."
    ]
