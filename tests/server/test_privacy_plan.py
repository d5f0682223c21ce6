"""The run's DP plan from its config: one plan for hospitals, pre-flight, strategy and log."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.hospital import Hospital
from privacy.plan import plan_sample_level
from server.cli import EXIT_USER_ERROR, main
from server.preflight import preflight
from server.privacy_log import PrivacyLog
from server.privacy_plan import client_noise_multiplier
from server.site_metrics import SiteMetrics
from server.strategies import make_strategy
from sims.config import ConfigError, config_from_run_config
from sims.hospitals import make_federation, split_sizes

ROOT = Path(__file__).resolve().parents[2]
TINY = {"image-size": 32, "unet-channels": "8,16", "patients-per-hospital": 40, "holdout-per-hospital": 2}
ISSUE = {
    "privacy.mode": "both",
    "privacy.target-epsilon": 5.0,
    "privacy.client-noise-multiplier": 1.2,
    "num-server-rounds": 4,
}


def test_the_hospital_and_the_server_plan_with_the_same_function_and_numbers(tmp_path: Path) -> None:
    config = config_from_run_config({**TINY, **ISSUE, "cache-dir": str(tmp_path), "privacy.delta": 1e-3})
    spec = make_federation(config.world, 2)[1]
    t, p = config.train, config.privacy

    hospital_plan = Hospital(config=config, spec=spec).dp_plan()
    server_plan = plan_sample_level(
        n_train=split_sizes(config.world, spec)["train"],
        batch_size=t.batch_size,
        local_epochs=t.local_epochs,
        num_rounds=t.num_server_rounds,
        target_epsilon=p.target_epsilon,
        delta=p.delta,
        noise_multiplier=p.noise_multiplier,
        calibrate=p.calibrate_noise,
    )

    assert hospital_plan == server_plan


def test_preflight_accepts_a_client_target_that_calibration_can_meet() -> None:
    config = config_from_run_config({**ISSUE, "privacy.client-target-epsilon": 5.0})

    preflight(config, 3)

    assert client_noise_multiplier(config.privacy, 3, 3, 4) > 1.2


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"privacy.client-target-epsilon": 2.0, "privacy.calibrate-noise": False},
            "The 'privacy.client-target-epsilon' parameter (2) cannot be met: one round of DP-FedAvg "
            "(noise 1.2, q = 1, delta 1e-05) already spends client-level epsilon 3.84.",
        ),
        (
            {"privacy.client-target-epsilon": 1e-4, "num-server-rounds": 10_000},
            "The 'privacy.client-target-epsilon' parameter (0.0001) cannot be met with 10000 rounds at "
            "client sampling rate q = 3/3: The target_epsilon=0.0001 of calibrate_noise_multiplier cannot "
            "be met",
        ),
    ],
)
def test_preflight_refuses_a_client_target_that_cannot_be_met(
    overrides: dict[str, object], expected: str
) -> None:
    config = config_from_run_config({**ISSUE, "privacy.target-epsilon": "none", **overrides})

    with pytest.raises(ConfigError) as caught:
        preflight(config, 3)

    assert str(caught.value).startswith(expected)


def test_fedscan_run_refuses_it_with_one_line_and_exit_code_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)

    code = main(
        [
            "run",
            "--hospitals",
            "3",
            "-c",
            "privacy.mode='client' privacy.client-target-epsilon=2 privacy.calibrate-noise=false "
            "privacy.client-noise-multiplier=1.2",
        ]
    )

    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR
    assert "The 'privacy.client-target-epsilon' parameter (2) cannot be met: one round of DP-FedAvg" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("bad", [0, -1.0, "lots"])
def test_the_client_target_key_is_validated(bad: object) -> None:
    with pytest.raises(
        ConfigError,
        match=r"The 'privacy.client-target-epsilon' parameter must be a float in \(0, inf\) or \"none\"\.",
    ):
        config_from_run_config({"privacy.client-target-epsilon": bad})


def test_the_strategy_adds_the_noise_the_log_accounts(tmp_path: Path) -> None:
    config = config_from_run_config({**ISSUE, "privacy.client-target-epsilon": 5.0})

    strategy = make_strategy(config.train, 3, SiteMetrics(lambda rows: None), config.privacy)
    log = PrivacyLog(tmp_path, config.privacy, 3, num_rounds=config.train.num_server_rounds)

    assert strategy.noise_multiplier == log.client_plan.noise_multiplier  # type: ignore[attr-defined]
