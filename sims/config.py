"""One frozen, validated configuration object for a fedscan run.

Every run-config key is declared, with its default, in ``pyproject.toml`` under
``[tool.flwr.app.config]`` (kebab-case). :func:`config_from_run_config` is the one
place that maps those keys to snake_case Python fields and validates them; the
ServerApp, the ClientApp and the ``fedscan`` CLI all call it on their first line,
and nothing below them reads ``run_config``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from common.validation import InvalidParameterError, check_int, did_you_mean
from sims.faults import CORRUPT_KINDS, FaultSpec
from sims.world import WorldSpec

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedbn", "local", "pooled")
"""``fedbn``: FedAvg whose normalisation layers stay at each hospital (Li et al., ICLR 2021);
``local``: every hospital trains alone, nothing is aggregated; ``pooled``: the hypothetical
centralised upper bound (the training hospitals' train splits pooled at the server)."""
NORMS = ("instance", "instance-affine", "group", "batch")
ARCHETYPES = ("noisy", "blurry", "bias_contrast", "ringing_spikes")  # sims.scanners.SCANNER_ARCHETYPES
LABEL_NOISE_KINDS = ("erode", "dilate", "miss", "mixed")
STANDARDIZE = ("none", "zscore", "histogram")
TTA = ("none", "adabn", "tent")
PRIVACY_MODES = ("off", "sample", "client", "both")
DP_LAYERS = ("all", "head")
LR_SCHEDULES = ("cosine", "constant")


class ConfigError(ValueError):
    """A user-supplied configuration value is invalid (one clear sentence)."""


@dataclass(frozen=True)
class TrainSpec:
    """How each hospital trains and how the server aggregates.

    Parameters
    ----------
    num_server_rounds : int
        Federated rounds, >= 1.
    strategy : str
        One of :data:`STRATEGIES`.
    local_epochs : int
        Passes over the hospital's train split per round, >= 1.
    lr : float
        Local Adam learning rate, in (0, 1] (the peak, with ``lr_schedule="cosine"``).
    lr_schedule : str
        ``"cosine"``: the local learning rate decays over rounds from ``lr`` to
        ``lr / 20`` (half a cosine); ``"constant"``: ``lr`` every round.
    batch_size : int
        Local mini-batch size, >= 1.
    proximal_mu : float
        FedProx proximal weight (used when ``strategy == "fedprox"``), >= 0.
    server_lr : float
        FedAdam server learning rate ``eta`` (used when ``strategy == "fedadam"``).
    unet_channels : tuple of int
        Feature maps per U-Net level; ``len - 1`` down-samplings by 2.
    clients_per_round : int
        Hospitals sampled to train each round, in every privacy mode (0 = all of them, the
        cross-silo default). The same number as ``privacy.clients-per-round``: the two keys
        must agree (see :func:`clients_per_round`).
    """

    num_server_rounds: int = 30
    strategy: str = "fedavg"
    local_epochs: int = 2
    lr: float = 3e-3
    lr_schedule: str = "constant"
    batch_size: int = 8
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    unet_channels: tuple[int, ...] = (16, 32, 64, 128)
    clients_per_round: int = 0
    norm: str = "instance"
    finetune_epochs: int = 0


@dataclass(frozen=True)
class ShiftSpec:
    """Who trains, who only evaluates, and what goes wrong at a hospital (the domain-shift scenario).

    The federation's SuperNodes are hospitals ``0..N-1`` (``partition-id``). The last
    ``unseen_hospitals`` of them never train: each only evaluates the global model on its own
    data, at its own node. So do the first hospitals whose scanner archetype is
    ``holdout_archetype`` (leave-one-scanner-out).

    Parameters
    ----------
    unseen_hospitals : int
        The last this-many SuperNodes evaluate only, >= 0.
    unseen_severities : tuple of float
        Scanner severities of the unseen hospitals, each in ``[0, 3]``; unseen hospital
        ``u`` (0-based) gets ``unseen_severities[(u // 4) % len]``, so four consecutive unseen
        hospitals cover the four scanner archetypes at one severity. Empty: the world's
        ``scanner-severity``.
    holdout_archetype : str
        ``"none"`` or one of :data:`ARCHETYPES`: training-position hospitals with this
        scanner archetype never train (an unseen scanner at the training severity).
    late_join_round : int
        0, or the round from which the last training hospital trains (it evaluates every
        round; before it joins the model has never seen its scanner).
    label_noise_hospital : int
        -1, or the training hospital whose annotations are noisy (every split).
    label_noise_rate : float
        Share of that hospital's patients whose label map is corrupted, in ``[0, 1]``.
    label_noise_kind : str
        One of :data:`LABEL_NOISE_KINDS`.
    """

    unseen_hospitals: int = 0
    unseen_severities: tuple[float, ...] = ()
    holdout_archetype: str = "none"
    late_join_round: int = 0
    label_noise_hospital: int = -1
    label_noise_rate: float = 0.0
    label_noise_kind: str = "mixed"


@dataclass(frozen=True)
class MitigationSpec:
    """Switches that narrow a scanner shift.

    Parameters
    ----------
    standardize : str
        ``"none"``; ``"zscore"``: per-image z-score over the foreground; ``"histogram"``:
        histogram standardisation (Nyul & Udupa) to landmarks learnt federatedly (each
        hospital shares its mean percentile landmarks, never an image).
    scanner_augment : bool
        Random scanner effects (MONAI random intensity transforms) at training time.
    tta : str
        ``"none"``; ``"adabn"``: an unseen hospital re-estimates the BatchNorm statistics
        from its own unlabelled images before it evaluates (needs ``norm = "batch"``);
        ``"tent"``: it also takes one pass of entropy minimisation on the normalisation layers'
        scale and shift (Wang et al., ICLR 2021; needs a norm with them: not ``"instance"``).
    """

    standardize: str = "none"
    scanner_augment: bool = False
    tta: str = "none"

    def label(self) -> str:
        """``"none"`` or the switches that are on, joined with ``+`` (e.g. ``histogram+augment``)."""
        parts = [
            p
            for p in (self.standardize, "augment" if self.scanner_augment else "none", self.tta)
            if p != "none"
        ]
        return "+".join(parts) or "none"


OOD_SCORES = ("msp", "entropy", "energy", "mahalanobis", "tta-variance")  # scenarios.ood_eval.SCORE_FAMILIES
OOD_SETS = (
    "noise",
    "blur",
    "strong-noise",
    "strong-blur",
    "motion",
    "inverted",
    "ct-like",
    "shapes",
    "phantom",
)
"""Generated OOD sets (scenarios.corruptions.OOD_SETS); an unseen hospital's own scanner adds its set by itself."""
ATTACKS = ("fgsm", "pgd-linf", "pgd-l2")


@dataclass(frozen=True)
class OodSpec:
    """Out-of-distribution detection after the last round (the ``ood`` scenario).

    Parameters
    ----------
    scores : tuple of str
        Score families of :data:`OOD_SCORES` to compute at each hospital; empty = no OOD phase.
    sets : tuple of str
        Generated OOD sets of :data:`OOD_SETS`, made at each training hospital from its own test
        images; the test split of an evaluate-only hospital is its own set (``unseen-scanner`` at
        the training severity, ``scanner-sev<S>`` at another).
    tpr : float
        In-distribution true-positive rate of the accept threshold (FPR at this TPR, selective
        prediction), in (0, 1).
    top_percent : float
        Share of pixels (%) the ``topk`` pooling averages, in (0, 100].
    """

    scores: tuple[str, ...] = ()
    sets: tuple[str, ...] = OOD_SETS
    tpr: float = 0.95
    top_percent: float = 10.0


@dataclass(frozen=True)
class RobustnessSpec:
    """Robustness curves after the last round (the ``robustness`` scenario), at each training hospital
    on its own test split: Dice against the strength of each corruption and attack.

    Parameters
    ----------
    noise, salt_pepper, contrast, blur, rotation : tuple of float
        Strengths (empty = skip): Gaussian noise std, salt-and-pepper fraction of pixels,
        ``|log gamma|``, blur sigma (px), rotation (degrees); 0 is the clean image.
    attack_kinds : tuple of str
        Attacks of :data:`ATTACKS` against the segmentation loss (empty = none).
    attack_eps : tuple of float
        L-inf budgets of FGSM and PGD-L-inf, in units of 1/255 (0 = clean).
    attack_l2_eps : tuple of float
        L2 budgets of PGD-L2 (per image, in image units).
    attack_steps : int
        PGD iterations, >= 1.
    attack_step_fraction : float
        PGD step size as a fraction of eps, in (0, 1].
    attack_random_start : bool
        PGD starts from a uniform random point of the eps ball.
    """

    noise: tuple[float, ...] = ()
    salt_pepper: tuple[float, ...] = ()
    contrast: tuple[float, ...] = ()
    blur: tuple[float, ...] = ()
    rotation: tuple[float, ...] = ()
    attack_kinds: tuple[str, ...] = ()
    attack_eps: tuple[float, ...] = (0.0, 2.0, 4.0, 8.0)
    attack_l2_eps: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0)
    attack_steps: int = 10
    attack_step_fraction: float = 0.25
    attack_random_start: bool = True

    @property
    def enabled(self) -> bool:
        return bool(
            self.noise or self.salt_pepper or self.contrast or self.blur or self.rotation or self.attack_kinds
        )


@dataclass(frozen=True)
class AdvTrainSpec:
    """Federated adversarial training (Madry et al., 2018): in every local batch a share ``ratio`` of
    the patients is replaced by its PGD-L-inf example against the current model.

    Replacing (not adding) keeps one record per patient per batch, so under DP-SGD the per-patient
    clipping bounds the adversarial loss and the privacy unit stays the patient.

    Parameters
    ----------
    ratio : float
        Share of each batch made adversarial, in [0, 1]; 0 = off.
    eps : float
        L-inf budget in units of 1/255, >= 0.
    steps : int
        PGD iterations, >= 1 (step size ``2.5 * eps / steps``, random start).
    """

    ratio: float = 0.0
    eps: float = 4.0
    steps: int = 3


@dataclass(frozen=True)
class PrivacySpec:
    """Differential privacy of a run.

    Parameters
    ----------
    mode : str
        ``"off"``; ``"sample"``: DP-SGD (Opacus) inside each hospital, the patient being
        the privacy unit; ``"client"``: client-level DP-FedAvg at the server (Flower's
        server-side clipping wrapper); ``"both"``.
    target_epsilon : float or None
        Per-hospital budget for sample-level DP. Given, each hospital calibrates its noise
        multiplier so the target is met (never exceeded) at the end of the planned run;
        ``None``: ``noise_multiplier`` is used as is and epsilon is only reported.
    delta : float
        In (0, 1), and below 1 / (patients of the smallest hospital).
    noise_multiplier : float
        DP-SGD noise multiplier when no target is given (>= 0; 0 = no privacy, warned).
    max_grad_norm : float
        Per-patient clipping norm C (> 0).
    client_noise_multiplier, client_clipping_norm : float
        Client-level DP: noise multiplier (>= 0) and clipping norm (> 0) of the server-side
        fixed-clipping DP-FedAvg wrapper.
    clients_per_round : int
        Hospitals sampled to train each round (0 = all), in every mode: the older name of
        ``clients-per-round``, which it must agree with; DP-FedAvg is accounted at
        ``q = m / K`` with this ``m``.
    calibrate_noise : bool
        With a ``target_epsilon``: ``True`` calibrates the noise multiplier to meet the
        target at the end of the planned run; ``False`` keeps ``noise_multiplier`` and uses
        the target only as the budget cap of the guard (a hospital declines the round that
        would overshoot it). The same for ``client_target_epsilon`` and
        ``client_noise_multiplier`` (the server stops the federation before the round that
        would overshoot it).
    dp_layers : str
        Which weights DP-SGD trains at the hospitals: ``"all"``, or ``"head"`` (the two
        finest up-sampling blocks of the U-Net, ~7% of the weights; the rest stays as
        pre-trained). Fewer noisy coordinates means less noise per unit of signal.
    pretrain_epochs : int
        Epochs of server-side pre-training on public, un-shifted template slices before
        round 1 (costs no patient privacy).
    client_target_epsilon : float or None
        Client-level (DP-FedAvg) budget, > 0, with the semantics of ``target_epsilon``:
        calibrates ``client_noise_multiplier`` for the planned rounds at client sampling
        rate ``q = clients per round / hospitals`` (with ``calibrate_noise``), or caps it.
        ``None``: the client-level epsilon is only reported.
    """

    mode: str = "off"
    target_epsilon: float | None = None
    delta: float = 1e-5
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    client_noise_multiplier: float = 0.5
    client_clipping_norm: float = 10.0
    clients_per_round: int = 0
    calibrate_noise: bool = True
    dp_layers: str = "all"
    pretrain_epochs: int = 0
    client_target_epsilon: float | None = None

    @property
    def sample_level(self) -> bool:
        return self.mode in ("sample", "both")

    @property
    def client_level(self) -> bool:
        return self.mode in ("client", "both")


@dataclass(frozen=True)
class CheckpointSpec:
    """Encrypted, signed checkpoints and resume.

    Parameters
    ----------
    every : int
        Write a server checkpoint every ``every`` rounds (0 = never).
    keep : int
        Keep the newest ``keep`` server checkpoints.
    keyring : str
        Keyring folder (``fedscan keygen``); ``""`` = a run-local keyring (simulation only).
    resume_from : str
        A checkpoint file or run folder to continue from; ``""`` = a fresh run.
    stop_after : int
        Stop (as if interrupted) after this round; 0 = run all rounds. Not part of the config
        hash, so the stopped run can be resumed.
    """

    every: int = 1
    keep: int = 3
    keyring: str = ""
    resume_from: str = ""
    stop_after: int = 0


@dataclass(frozen=True)
class FedscanConfig:
    """The resolved configuration of one run: the world, training, privacy and paths."""

    world: WorldSpec
    train: TrainSpec
    privacy: PrivacySpec = PrivacySpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    faults: FaultSpec = FaultSpec()
    shift: ShiftSpec = ShiftSpec()
    mitigation: MitigationSpec = MitigationSpec()
    ood: OodSpec = OodSpec()
    robustness: RobustnessSpec = RobustnessSpec()
    adv_train: AdvTrainSpec = AdvTrainSpec()
    scenario: str = "none"
    output_dir: str = "outputs"
    cache_dir: str = ".cache/fedscan"

    @property
    def seed(self) -> int:
        return self.world.seed

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable form (for ``config.json``)."""
        return asdict(self)

    def dp_plan_inputs(self, n_train: int) -> dict[str, Any]:
        """The keyword arguments of :func:`privacy.plan.plan_sample_level` for a hospital with
        ``n_train`` train patients (the hospital and the server's pre-flight plan alike)."""
        t, p = self.train, self.privacy
        return {
            "n_train": n_train,
            "batch_size": t.batch_size,
            "local_epochs": t.local_epochs,
            "num_rounds": t.num_server_rounds,
            "target_epsilon": p.target_epsilon,
            "delta": p.delta,
            "noise_multiplier": p.noise_multiplier,
            "calibrate": p.calibrate_noise,
        }

    def binding(self, num_hospitals: int) -> dict[str, Any]:
        """Everything that shapes the run's numbers, as a flat ``{run-config key: value}``.

        The run config (every key but paths, the ``checkpoint.*`` settings and the evaluation-only
        ``ood.*``, ``robustness.*`` and ``attack.*`` keys, which change no number of the training:
        a resume from the last round may ask for other OOD and robustness evaluations), the number of hospitals (``num-supernodes``: with quantity skew every
        cohort depends on it) and the data generator's format version. A checkpoint carries
        it; a resume whose binding differs is refused, naming the key and both values.
        """
        from sims.hospitals import FORMAT_VERSION

        record = self.to_dict()
        flat: dict[str, Any] = {}
        for key, (section, field, _) in KEYS.items():
            if section in ("paths", "checkpoint", "ood", "robustness"):
                continue
            value = record[field] if section == "top" else record[section][field]
            flat[key] = list(value) if isinstance(value, tuple) else value
        flat["num-supernodes"] = num_hospitals
        flat["data-format-version"] = FORMAT_VERSION
        return flat

    def config_hash(self, num_hospitals: int) -> str:
        """SHA-256 of :meth:`binding`: the same run, whatever its folder, keyring or stop."""
        import hashlib
        import json

        blob = json.dumps(self.binding(num_hospitals), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def round_lr(train: TrainSpec, server_round: int) -> float:
    """The local learning rate of ``server_round`` (1-based) under ``train.lr_schedule``."""
    if train.lr_schedule == "constant" or train.num_server_rounds == 1:
        return train.lr
    progress = (server_round - 1) / (train.num_server_rounds - 1)
    floor = train.lr / 20
    return floor + (train.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- #
# Key table: kebab-case run-config key -> (section, field, parser).           #
# --------------------------------------------------------------------------- #


def _int_in(lo: int, hi: float = math.inf) -> Callable[[str, Any], int]:
    def parse(key: str, value: Any) -> int:
        try:
            return check_int(key, value, low=lo, high=hi)
        except InvalidParameterError as err:
            raise ConfigError(str(err)) from None

    return parse


def _float_in(
    lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> Callable[[str, Any], float]:
    def parse(key: str, value: Any) -> float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok:
            v = float(value)
            ok = math.isfinite(v) or (v == math.inf and hi == math.inf)
            ok = ok and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise ConfigError(f"The '{key}' parameter must be a float in {interval}. Got {value!r} instead.")
        return float(value)

    return parse


def _epsilon_target(key: str, value: Any) -> float | None:
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ConfigError(
            f"The '{key}' parameter must be a float in (0, inf) or \"none\". Got {value!r} instead."
        )
    return float(value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"The '{key}' parameter must be true or false. Got {value!r} instead.")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[str, Any], str]:
    def parse(key: str, value: Any) -> str:
        if value not in options:
            hint = _nearest(str(value), options)
            raise ConfigError(
                f"The '{key}' parameter must be one of {', '.join(options)}. Got {value!r} instead.{hint}"
            )
        return str(value)

    return parse


def _path(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise ConfigError(
            f"The '{key}' parameter must be a non-empty path (no NUL byte). Got {value!r} instead."
        )
    return value


def _optional_path(key: str, value: Any) -> str:
    if not isinstance(value, str) or "\x00" in value:
        raise ConfigError(
            f"The '{key}' parameter must be a path (no NUL byte) or \"\". Got {value!r} instead."
        )
    return value


def _channels(key: str, value: Any) -> tuple[int, ...]:
    try:
        channels = tuple(int(part) for part in str(value).split(","))
    except ValueError:
        channels = ()
    if not 2 <= len(channels) <= 6 or any(not 1 <= c <= 1024 for c in channels):
        raise ConfigError(
            f"The '{key}' parameter must be 2 to 6 comma-separated ints in [1, 1024], "
            f'e.g. "16,32,64,128". Got {value!r} instead.'
        )
    return channels


def _severities(key: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, str) and value.strip().lower() == "same":
        return ()
    try:
        levels = tuple(float(part) for part in str(value).split(","))
    except ValueError:
        levels = ()
    if not levels or any(not (math.isfinite(v) and 0.0 <= v <= 3.0) for v in levels):
        raise ConfigError(
            f'The \'{key}\' parameter must be "same" or comma-separated floats in [0, 3], e.g. "2,3". '
            f"Got {value!r} instead."
        )
    return levels


def _names(options: tuple[str, ...], *, empty: str = "none") -> Callable[[str, Any], tuple[str, ...]]:
    """A comma-separated list of names from ``options`` (``empty`` = none; "all" = every option)."""

    def parse(key: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, str):
            raise ConfigError(
                f"The '{key}' parameter must be \"{empty}\" or comma-separated names from {', '.join(options)}. "
                f"Got {value!r} instead."
            )
        text = value.strip().lower()
        if text in ("none", ""):
            return ()
        if text == "all":
            return options
        names = tuple(part.strip() for part in text.split(","))
        for name in names:
            if name not in options:
                raise ConfigError(
                    f'The \'{key}\' parameter must be "{empty}", "all" or comma-separated names from '
                    f"{', '.join(options)}. Got {name!r} in {value!r} instead.{_nearest(name, options)}"
                )
        return tuple(dict.fromkeys(names))

    return parse


def _levels(hi: float, what: str) -> Callable[[str, Any], tuple[float, ...]]:
    """A comma-separated list of strengths in ``[0, hi]`` (``"none"`` = empty)."""

    def parse(key: str, value: Any) -> tuple[float, ...]:
        if isinstance(value, str) and value.strip().lower() in ("none", ""):
            return ()
        try:
            levels = tuple(float(part) for part in str(value).split(","))
        except ValueError:
            levels = ()
        bad = [v for v in levels if not (math.isfinite(v) and 0.0 <= v <= hi)]
        if not levels or bad or isinstance(value, bool):
            shown = f" ({bad[0]:g} is not)" if bad else ""
            raise ConfigError(
                f"The '{key}' parameter must be \"none\" or comma-separated {what} in [0, {hi:g}]{shown}, "
                f'e.g. "0,1,2". Got {value!r} instead.'
            )
        return tuple(sorted(set(levels)))

    return parse


def _name(key: str, value: Any) -> str:
    import re

    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", value):
        raise ConfigError(
            f"The '{key}' parameter must be \"none\" or a scenario name (lower-case letters, digits, '_' or '-'). "
            f"Got {value!r} instead."
        )
    return value


_Parser = Callable[[str, Any], Any]
KEYS: dict[str, tuple[str, str, _Parser]] = {
    "num-server-rounds": ("train", "num_server_rounds", _int_in(1, 10_000)),
    "seed": ("world", "seed", _int_in(0, 2**32 - 1)),
    "strategy": ("train", "strategy", _choice(STRATEGIES)),
    "local-epochs": ("train", "local_epochs", _int_in(1, 1000)),
    "lr": ("train", "lr", _float_in(0.0, 1.0, lo_open=True)),
    "lr-schedule": ("train", "lr_schedule", _choice(LR_SCHEDULES)),
    "batch-size": ("train", "batch_size", _int_in(1, 4096)),
    "proximal-mu": ("train", "proximal_mu", _float_in(0.0, math.inf)),
    "server-lr": ("train", "server_lr", _float_in(0.0, 10.0, lo_open=True)),
    "unet-channels": ("train", "unet_channels", _channels),
    "clients-per-round": ("train", "clients_per_round", _int_in(0, 10**6)),
    "image-size": ("world", "image_size", _int_in(1, 100_000)),
    "patients-per-hospital": ("world", "patients_per_hospital", _int_in(1, 10**7)),
    "quantity-skew": ("world", "quantity_skew", _float_in(0.0, 1.0)),
    "scanner-severity": ("world", "scanner_severity", _float_in(0.0, 3.0)),
    "label-skew": ("world", "label_skew", _float_in(0.0, 1.0)),
    "lesions": ("world", "lesions", _bool),
    "val-fraction": ("world", "val_fraction", _float_in(0.0, 1.0, lo_open=True, hi_open=True)),
    "test-fraction": ("world", "test_fraction", _float_in(0.0, 1.0, lo_open=True, hi_open=True)),
    "holdout-per-hospital": ("world", "holdout_per_hospital", _int_in(1, 10**6)),
    "server-eval-patients": ("world", "server_eval_patients", _int_in(1, 100_000)),
    "augment": ("world", "augment", _bool),
    "privacy.mode": ("privacy", "mode", _choice(PRIVACY_MODES)),
    "privacy.target-epsilon": ("privacy", "target_epsilon", _epsilon_target),
    "privacy.delta": ("privacy", "delta", _float_in(0.0, 1.0, lo_open=True, hi_open=True)),
    "privacy.noise-multiplier": ("privacy", "noise_multiplier", _float_in(0.0, 1e4)),
    "privacy.max-grad-norm": ("privacy", "max_grad_norm", _float_in(0.0, 1e6, lo_open=True)),
    "privacy.client-noise-multiplier": ("privacy", "client_noise_multiplier", _float_in(0.0, 1e4)),
    "privacy.client-target-epsilon": ("privacy", "client_target_epsilon", _epsilon_target),
    "privacy.client-clipping-norm": ("privacy", "client_clipping_norm", _float_in(0.0, 1e6, lo_open=True)),
    "privacy.clients-per-round": ("privacy", "clients_per_round", _int_in(0, 10**6)),
    "privacy.calibrate-noise": ("privacy", "calibrate_noise", _bool),
    "privacy.dp-layers": ("privacy", "dp_layers", _choice(DP_LAYERS)),
    "privacy.pretrain-epochs": ("privacy", "pretrain_epochs", _int_in(0, 1000)),
    "checkpoint.every": ("checkpoint", "every", _int_in(0, 10**6)),
    "checkpoint.keep": ("checkpoint", "keep", _int_in(1, 10**6)),
    "checkpoint.keyring": ("checkpoint", "keyring", _optional_path),
    "checkpoint.resume-from": ("checkpoint", "resume_from", _optional_path),
    "checkpoint.stop-after": ("checkpoint", "stop_after", _int_in(0, 10**6)),
    "faults.crash-rate": ("faults", "crash_rate", _float_in(0.0, 1.0)),
    "faults.straggle-rate": ("faults", "straggle_rate", _float_in(0.0, 1.0)),
    "faults.corrupt-rate": ("faults", "corrupt_rate", _float_in(0.0, 1.0)),
    "faults.corrupt-kind": ("faults", "corrupt_kind", _choice(CORRUPT_KINDS)),
    "faults.round-timeout": ("faults", "round_timeout", _float_in(0.0, 86_400.0, lo_open=True)),
    "faults.min-available": ("faults", "min_available", _int_in(1, 10**6)),
    "norm": ("train", "norm", _choice(NORMS)),
    "finetune-epochs": ("train", "finetune_epochs", _int_in(0, 1000)),
    "scenario": ("top", "scenario", _name),
    "shift.unseen-hospitals": ("shift", "unseen_hospitals", _int_in(0, 10**6)),
    "shift.unseen-severities": ("shift", "unseen_severities", _severities),
    "shift.holdout-archetype": ("shift", "holdout_archetype", _choice(("none", *ARCHETYPES))),
    "shift.late-join-round": ("shift", "late_join_round", _int_in(0, 10**6)),
    "shift.label-noise-hospital": ("shift", "label_noise_hospital", _int_in(-1, 10**6)),
    "shift.label-noise-rate": ("shift", "label_noise_rate", _float_in(0.0, 1.0)),
    "shift.label-noise-kind": ("shift", "label_noise_kind", _choice(LABEL_NOISE_KINDS)),
    "mitigation.standardize": ("mitigation", "standardize", _choice(STANDARDIZE)),
    "mitigation.scanner-augment": ("mitigation", "scanner_augment", _bool),
    "mitigation.tta": ("mitigation", "tta", _choice(TTA)),
    "ood.scores": ("ood", "scores", _names(OOD_SCORES)),
    "ood.sets": ("ood", "sets", _names(OOD_SETS)),
    "ood.tpr": ("ood", "tpr", _float_in(0.0, 1.0, lo_open=True, hi_open=True)),
    "ood.top-percent": ("ood", "top_percent", _float_in(0.0, 100.0, lo_open=True)),
    "robustness.noise": ("robustness", "noise", _levels(1.0, "noise stds")),
    "robustness.salt-pepper": ("robustness", "salt_pepper", _levels(1.0, "fractions of pixels")),
    "robustness.contrast": ("robustness", "contrast", _levels(3.0, "|log gamma| values")),
    "robustness.blur": ("robustness", "blur", _levels(10.0, "blur sigmas (px)")),
    "robustness.rotation": ("robustness", "rotation", _levels(180.0, "angles (degrees)")),
    "attack.kinds": ("robustness", "attack_kinds", _names(ATTACKS)),
    "attack.eps": ("robustness", "attack_eps", _levels(255.0, "L-inf budgets (units of 1/255)")),
    "attack.l2-eps": ("robustness", "attack_l2_eps", _levels(1000.0, "L2 budgets")),
    "attack.steps": ("robustness", "attack_steps", _int_in(1, 1000)),
    "attack.step-fraction": ("robustness", "attack_step_fraction", _float_in(0.0, 1.0, lo_open=True)),
    "attack.random-start": ("robustness", "attack_random_start", _bool),
    "adv-train.ratio": ("adv_train", "ratio", _float_in(0.0, 1.0)),
    "adv-train.eps": ("adv_train", "eps", _float_in(0.0, 255.0)),
    "adv-train.steps": ("adv_train", "steps", _int_in(1, 100)),
    "output-dir": ("paths", "output_dir", _path),
    "cache-dir": ("paths", "cache_dir", _path),
}


def _nearest(name: str, options: tuple[str, ...] | list[str]) -> str:
    return did_you_mean(name, options)


def check_known_keys(keys: list[str] | tuple[str, ...]) -> None:
    """Raise :class:`ConfigError` for a key fedscan does not declare.

    Raises
    ------
    ConfigError
        Naming the unknown key, the nearest valid name, and where the list is.
    """
    for key in keys:
        if key not in KEYS:
            raise ConfigError(
                f"Unknown run-config key {key!r}.{_nearest(key, list(KEYS))} "
                "Valid keys are declared in pyproject.toml under [tool.flwr.app.config]."
            )


def config_from_run_config(run_config: Mapping[str, Any]) -> FedscanConfig:
    """Validate a Flower ``run_config`` and return the frozen :class:`FedscanConfig`.

    Keys that are absent keep the dataclass defaults (which mirror ``pyproject.toml``).

    Raises
    ------
    ConfigError
        On an unknown key (with the nearest valid name) or an invalid value (naming
        the key, the value and what is allowed).
    """
    check_known_keys(list(run_config))
    sections: dict[str, dict[str, Any]] = {
        "world": {},
        "train": {},
        "privacy": {},
        "checkpoint": {},
        "faults": {},
        "shift": {},
        "mitigation": {},
        "ood": {},
        "robustness": {},
        "adv_train": {},
        "top": {},
        "paths": {},
    }
    for key, value in run_config.items():
        section, field, parse = KEYS[key]
        sections[section][field] = parse(key, value)

    train = TrainSpec(**sections["train"])
    try:
        world = WorldSpec(**sections["world"])
    except ValueError as err:  # WorldSpec names its fields in snake_case
        raise ConfigError(_kebab(str(err))) from None
    _check_image_size(world.image_size, train.unet_channels)
    privacy = PrivacySpec(**sections["privacy"])
    _check_privacy(privacy, world)
    train, privacy = _agree_on_clients_per_round(train, privacy)
    checkpoint = CheckpointSpec(**sections["checkpoint"])
    faults = FaultSpec(**sections["faults"])
    rates = faults.crash_rate + faults.straggle_rate + faults.corrupt_rate
    if rates > 1.0 + 1e-12:
        raise ConfigError(
            "The 'faults.crash-rate', 'faults.straggle-rate' and 'faults.corrupt-rate' parameters must sum "
            f"to at most 1 (each is a share of the hospitals in a round). Got {rates:g} instead."
        )
    shift = ShiftSpec(**sections["shift"])
    mitigation = MitigationSpec(**sections["mitigation"])
    _check_scenario(train, privacy, shift, mitigation)
    ood, robustness, adv_train = (
        OodSpec(**sections["ood"]),
        RobustnessSpec(**sections["robustness"]),
        AdvTrainSpec(**sections["adv_train"]),
    )
    _check_robustness(train, ood, robustness, adv_train)
    return FedscanConfig(
        world=world,
        train=train,
        privacy=privacy,
        checkpoint=checkpoint,
        faults=faults,
        shift=shift,
        mitigation=mitigation,
        ood=ood,
        robustness=robustness,
        adv_train=adv_train,
        **sections["top"],
        **sections["paths"],
    )


def _check_scenario(
    train: TrainSpec, privacy: PrivacySpec, shift: ShiftSpec, mitigation: MitigationSpec
) -> None:
    """Combinations that cannot work, one sentence each (hospital counts: server.preflight)."""
    if train.norm == "batch" and privacy.sample_level:
        raise ConfigError(
            "The 'norm' parameter cannot be \"batch\" with sample-level DP (privacy.mode = "
            f"{privacy.mode!r}): BatchNorm mixes patients in a batch, so per-patient clipping would not bound "
            'one patient\'s influence (Opacus refuses it). Use "group" or "instance-affine".'
        )
    if train.strategy == "fedbn" and train.norm == "instance":
        raise ConfigError(
            "The 'strategy' parameter is \"fedbn\", which keeps normalisation layers local, but 'norm' = "
            '"instance" has no parameters to keep. Set \'norm\' to "batch" (no DP), "group" or '
            '"instance-affine".'
        )
    if mitigation.tta == "tent" and train.norm == "instance":
        raise ConfigError(
            "The 'mitigation.tta' parameter \"tent\" adapts the normalisation layers' scale and shift, and "
            '\'norm\' = "instance" has none. Use "instance-affine", "group" or "batch".'
        )
    if mitigation.tta == "adabn" and train.norm != "batch":
        raise ConfigError(
            "The 'mitigation.tta' parameter \"adabn\" re-estimates BatchNorm statistics and needs 'norm' = "
            f'"batch". Got norm {train.norm!r} instead (instance and group norms need no re-estimation).'
        )
    if train.strategy == "pooled" and privacy.mode != "off":
        raise ConfigError(
            "The 'strategy' parameter \"pooled\" (the centralised, non-private upper bound) needs "
            f"'privacy.mode' = \"off\". Got {privacy.mode!r} instead."
        )
    if train.strategy in ("local", "pooled") and privacy.client_level:
        raise ConfigError(
            f"The 'strategy' parameter {train.strategy!r} aggregates no hospital update, so client-level DP "
            f'(privacy.mode = {privacy.mode!r}) has nothing to protect. Use "off" or "sample".'
        )
    if shift.late_join_round > train.num_server_rounds:
        raise ConfigError(
            f"The 'shift.late-join-round' parameter must be 0 or at most 'num-server-rounds' = "
            f"{train.num_server_rounds}. Got {shift.late_join_round} instead."
        )
    if shift.late_join_round and privacy.client_level:
        raise ConfigError(
            "The 'shift.late-join-round' parameter must be 0 with client-level DP: the accounting assumes m of the "
            f"same K hospitals are sampled every round. Got {shift.late_join_round} with privacy.mode = "
            f"{privacy.mode!r}."
        )
    if train.finetune_epochs and privacy.sample_level:
        raise ConfigError(
            "The 'finetune-epochs' parameter must be 0 with sample-level DP: fine-tuning would spend privacy budget "
            f"that the plan does not account. Got {train.finetune_epochs} with privacy.mode = {privacy.mode!r}."
        )
    if shift.late_join_round and train.clients_per_round:
        raise ConfigError(
            "The 'shift.late-join-round' parameter needs every hospital to train each round "
            f"('clients-per-round' = 0). Got clients-per-round = {train.clients_per_round}."
        )
    if train.finetune_epochs and train.strategy in ("local", "pooled"):
        raise ConfigError(
            "The 'finetune-epochs' parameter fine-tunes the federated model at each hospital; it must be 0 with "
            f"strategy {train.strategy!r}. Got {train.finetune_epochs} instead."
        )


def _check_robustness(
    train: TrainSpec, ood: OodSpec, robustness: RobustnessSpec, adv_train: AdvTrainSpec
) -> None:
    """Combinations of the OOD, robustness and adversarial-training keys that cannot work."""
    if "pgd-l2" in robustness.attack_kinds and not robustness.attack_l2_eps:
        raise ConfigError(
            "The 'attack.l2-eps' parameter must list at least one L2 budget when 'attack.kinds' has \"pgd-l2\". "
            'Got "none" instead.'
        )
    if {"fgsm", "pgd-linf"} & set(robustness.attack_kinds) and not robustness.attack_eps:
        raise ConfigError(
            "The 'attack.eps' parameter must list at least one L-inf budget when 'attack.kinds' has \"fgsm\" or "
            '"pgd-linf". Got "none" instead.'
        )
    if adv_train.ratio > 0 and adv_train.eps == 0:
        raise ConfigError(
            "The 'adv-train.eps' parameter must be > 0 when 'adv-train.ratio' > 0 (an eps-0 attack is the clean "
            f"image). Got eps {adv_train.eps:g} with ratio {adv_train.ratio:g}."
        )
    if adv_train.ratio > 0 and train.strategy == "pooled":
        raise ConfigError(
            "The 'adv-train.ratio' parameter must be 0 with strategy \"pooled\" (the centralised baseline trains "
            f"on clean data only). Got {adv_train.ratio:g}."
        )


def _agree_on_clients_per_round(train: TrainSpec, privacy: PrivacySpec) -> tuple[TrainSpec, PrivacySpec]:
    """One number of hospitals per round, whichever of its two keys set it.

    ``clients-per-round`` and ``privacy.clients-per-round`` (its name from when only
    client-level DP sampled hospitals) must agree when both are set; the one that is set
    is written into both specs, so every reader sees the same value.
    """
    a, b = train.clients_per_round, privacy.clients_per_round
    if a and b and a != b:
        raise ConfigError(
            "The 'clients-per-round' and 'privacy.clients-per-round' parameters must agree (they are the same "
            f"number of hospitals per round; set one, or both to one value). Got {a} and {b} instead."
        )
    m = a or b
    return replace(train, clients_per_round=m), replace(privacy, clients_per_round=m)


def clients_per_round(requested: int, num_hospitals: int) -> int:
    """Hospitals that train each round: ``requested`` (0 = all), at most ``num_hospitals``.

    The one place that turns the ``clients-per-round`` setting into a count; the strategy's
    sampling, the DP-FedAvg wrapper and the client-level accounting (``q = m / K``) all use it.
    """
    return num_hospitals if requested == 0 else min(requested, num_hospitals)


def _check_privacy(privacy: PrivacySpec, world: WorldSpec) -> None:
    if privacy.mode == "off":
        return
    # The smallest hospital's cohort bounds delta: delta >= 1/n lets a mechanism
    # publish one patient's record outright and still claim (epsilon, delta)-DP.
    smallest = min_cohort(world)
    if privacy.delta >= 1.0 / smallest:
        raise ConfigError(
            f"The 'privacy.delta' parameter must be below 1 / (patients in the smallest hospital) = "
            f"1/{smallest} = {1.0 / smallest:.3g}. Got {privacy.delta!r} instead."
        )


def min_cohort(world: WorldSpec) -> int:
    """Lower bound on any hospital's cohort size (quantity skew keeps at least MIN_PATIENTS)."""
    from sims.world import MIN_PATIENTS

    return world.patients_per_hospital if world.quantity_skew == 0 else MIN_PATIENTS


def privacy_warnings(config: FedscanConfig) -> list[str]:
    """Legal but probably unintended settings, one sentence each."""
    p = config.privacy
    notes = []
    if p.sample_level and not (p.target_epsilon and p.calibrate_noise) and p.noise_multiplier == 0:
        notes.append("privacy.noise-multiplier = 0 with sample-level DP on gives no privacy (epsilon = inf).")
    calibrated_client = p.client_target_epsilon is not None and p.calibrate_noise
    if p.client_level and not calibrated_client and p.client_noise_multiplier == 0:
        notes.append(
            "privacy.client-noise-multiplier = 0 with client-level DP on gives no privacy (epsilon = inf)."
        )
    return notes


def _check_image_size(image_size: int, channels: tuple[int, ...]) -> None:
    factor = 2 ** (len(channels) - 1)
    if image_size % factor:
        lower = image_size - image_size % factor
        raise ConfigError(
            f"The 'image-size' parameter must be divisible by {factor} for a U-Net with "
            f"{len(channels)} levels ('unet-channels' = {','.join(map(str, channels))}). "
            f"Got {image_size} instead; try {lower or factor} or {lower + factor}."
        )


def _kebab(message: str) -> str:
    """Rewrite snake_case field names in a WorldSpec message to run-config keys."""
    for key, (_, field, _) in KEYS.items():
        message = message.replace(f"'{field}'", f"'{key}'")
    return message.replace(" of WorldSpec", "")
