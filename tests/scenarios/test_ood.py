"""OOD scores, their federated statistics and their metrics (scenarios.ood)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from scenarios.ood import (
    FeatureStats,
    accept_threshold,
    energy_score,
    entropy_score,
    mahalanobis_score,
    msp_score,
    ood_metrics,
    selective_dice,
)

SCORES = (msp_score, entropy_score, energy_score)


def sklearn_fpr_at_tpr(scores_in: np.ndarray, scores_out: np.ndarray, tpr: float = 0.95) -> float:
    """The oracle: FPR at the first point of scikit-learn's ROC curve whose TPR reaches ``tpr``."""
    labels = np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))]
    fpr, tprs, _ = roc_curve(labels, np.r_[scores_in, scores_out], drop_intermediate=False)
    return float(fpr[np.argmax(tprs >= tpr)])


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_ood_metrics_equal_scikit_learn(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    scores_in = rng.normal(0.0, 1.0, size=int(rng.integers(5, 60)))
    scores_out = rng.normal(1.0, 1.0, size=int(rng.integers(5, 60)))
    if ties:  # coarse scores put in- and out-of-distribution images on the same values
        scores_in, scores_out = np.round(scores_in), np.round(scores_out)
    labels = np.r_[np.zeros(len(scores_in)), np.ones(len(scores_out))]

    metrics = ood_metrics(scores_in, scores_out)

    assert metrics["auroc"] == pytest.approx(roc_auc_score(labels, np.r_[scores_in, scores_out]), abs=1e-12)
    assert metrics["aupr"] == pytest.approx(
        average_precision_score(labels, np.r_[scores_in, scores_out]), abs=1e-12
    )
    assert metrics["fpr_at_95_tpr"] == pytest.approx(sklearn_fpr_at_tpr(scores_in, scores_out), abs=1e-12)


@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=30), st.lists(st.integers(0, 6), min_size=1, max_size=30)
)
@settings(max_examples=60, deadline=None)
def test_fpr_at_95_tpr_equals_roc_curve_for_any_ties(scores_in: list[int], scores_out: list[int]) -> None:
    assert ood_metrics(scores_in, scores_out)["fpr_at_95_tpr"] == pytest.approx(
        sklearn_fpr_at_tpr(np.array(scores_in, float), np.array(scores_out, float)), abs=1e-12
    )


def test_perfectly_separated_scores_give_auroc_1_and_fpr_0() -> None:
    metrics = ood_metrics(np.linspace(0, 1, 20), np.linspace(2, 3, 20))

    assert metrics == {"auroc": 1.0, "aupr": 1.0, "fpr_at_95_tpr": 0.0}


def test_reversed_scores_flag_every_in_distribution_image() -> None:
    metrics = ood_metrics(np.linspace(2, 3, 20), np.linspace(0, 1, 20))

    assert metrics["auroc"] == 0.0
    assert metrics["fpr_at_95_tpr"] == 1.0


def test_accept_threshold_accepts_95_percent_of_in_distribution() -> None:
    scores_in = np.arange(100.0)[::-1]  # 0..99, unsorted input

    threshold = accept_threshold(scores_in)

    assert threshold == 94.0
    assert np.mean(scores_in <= threshold) == 0.95
    assert accept_threshold([3.0]) == 3.0


def test_selective_dice_keeps_the_lowest_scores() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.3])
    dice = np.array([0.2, 1.0, 0.6, 0.8])

    curve = selective_dice(scores, dice, [0.25, 0.5, 0.75, 1.0, 0.01])

    np.testing.assert_allclose(curve, [1.0, 0.9, 0.8, 0.65, 1.0])


def test_selective_dice_rounds_coverage_up_without_float_noise() -> None:
    dice = np.arange(10) / 10.0

    curve = selective_dice(np.arange(10.0), dice, [0.3, 0.31])  # 0.3 * 10 is 3.0000000000000004

    np.testing.assert_allclose(curve, [dice[:3].mean(), dice[:4].mean()])


# --------------------------------------------------------------------------- logit scores


def confident_and_uniform_logits(size: int = 8) -> np.ndarray:
    logits = np.zeros((2, 3, size, size))
    logits[0, 1] = 12.0  # image 0: every pixel confidently class 1
    return logits  # image 1: all zeros, the uniform softmax


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("pool", ["foreground", "topk"])
def test_uniform_logits_score_higher_than_confident_ones(score, pool: str) -> None:
    values = score(confident_and_uniform_logits(), pool=pool)

    assert values.shape == (2,)
    assert values[1] > values[0]


def test_scores_of_uniform_logits_have_their_closed_forms() -> None:
    uniform = np.zeros((1, 4, 4, 4))

    assert msp_score(uniform)[0] == pytest.approx(0.75)
    assert entropy_score(uniform)[0] == pytest.approx(np.log(4))
    assert energy_score(uniform)[0] == pytest.approx(-np.log(4))


def test_scores_accept_torch_tensors() -> None:
    logits = np.random.default_rng(0).normal(size=(3, 2, 8, 8))

    np.testing.assert_allclose(
        entropy_score(torch.from_numpy(logits).float()), entropy_score(logits), atol=1e-6
    )


def test_foreground_pool_averages_the_predicted_foreground_only() -> None:
    logits = np.zeros((1, 2, 4, 4))
    logits[0, 0] = 10.0  # background everywhere, confidently ...
    logits[0, 1, 0, :2] = np.array([10.0, 11.0])  # ... but two foreground pixels (one a tie: background wins)
    logits[0, 1, 1, 0] = 12.0
    p_fg = 1.0 / (1.0 + np.exp(-1.0))  # softmax of the 11-vs-10 pixel; the 12-vs-10 one below
    p_fg2 = 1.0 / (1.0 + np.exp(-2.0))

    value = msp_score(logits, pool="foreground")[0]

    assert value == pytest.approx(((1 - p_fg) + (1 - p_fg2)) / 2)


def test_foreground_pool_falls_back_to_all_pixels() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 6, 6))
    logits[:, 0] += 20.0  # every pixel predicted background

    np.testing.assert_allclose(
        entropy_score(logits, pool="foreground"), entropy_score(logits, pool="topk", top_percent=100)
    )


def test_topk_pool_averages_the_most_uncertain_pixels() -> None:
    logits = np.zeros((1, 2, 10, 10))
    logits[0, 0] = np.linspace(0, 9.9, 100).reshape(10, 10)  # pixel margins 0.0 .. 9.9
    pixel = 1 - 1 / (1 + np.exp(-np.linspace(0, 9.9, 100)))

    top = msp_score(logits, pool="topk", top_percent=7)[0]  # ceil(7 % of 100) = 7 pixels

    assert top == pytest.approx(np.sort(pixel)[-7:].mean())
    assert msp_score(logits, pool="topk", top_percent=0.1)[0] == pytest.approx(pixel.max())  # at least one


# --------------------------------------------------------------------------- Mahalanobis


@given(
    seed=st.integers(0, 2**32 - 1),
    cuts=st.lists(st.integers(1, 59), max_size=5, unique=True),
    with_classes=st.booleans(),
)
@settings(max_examples=40, deadline=None)
def test_merged_hospital_statistics_equal_the_pooled_ones(
    seed: int, cuts: list[int], with_classes: bool
) -> None:
    rng = np.random.default_rng(seed)
    features = rng.normal(2.0, 3.0, size=(60, 5))
    labels = rng.integers(0, 3, size=60) if with_classes else None
    num_classes = 3 if with_classes else None
    bounds = [0, *sorted(cuts), 60]
    hospitals = [
        FeatureStats.from_features(
            features[a:b], None if labels is None else labels[a:b], num_classes=num_classes
        )
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]

    merged = FeatureStats.merge(hospitals)
    pooled = FeatureStats.from_features(features, labels, num_classes=num_classes)

    assert merged.count == pooled.count == 60
    np.testing.assert_allclose(merged.total, pooled.total, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(merged.outer, pooled.outer, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(merged.covariance(), pooled.covariance(), rtol=1e-10, atol=1e-10)
    if with_classes:
        assert merged.class_counts is not None and pooled.class_counts is not None
        np.testing.assert_array_equal(merged.class_counts, pooled.class_counts)
        np.testing.assert_allclose(merged.class_totals, pooled.class_totals, rtol=1e-10, atol=1e-10)
    probe = rng.normal(size=(4, 5))
    np.testing.assert_allclose(mahalanobis_score(probe, merged), mahalanobis_score(probe, pooled), rtol=1e-9)


def test_statistics_give_numpys_covariance() -> None:
    rng = np.random.default_rng(2)
    features = rng.normal(size=(200, 4)) @ rng.normal(size=(4, 4))
    labels = np.repeat([0, 1], 100)
    features[labels == 1] += 5.0
    within = np.concatenate([features[labels == k] - features[labels == k].mean(0) for k in (0, 1)])

    np.testing.assert_allclose(
        FeatureStats.from_features(features).covariance(), np.cov(features.T, bias=True)
    )
    np.testing.assert_allclose(
        FeatureStats.from_features(features, labels).covariance(), within.T @ within / 200
    )


def test_mahalanobis_is_zero_at_the_mean_and_grows_with_distance() -> None:
    rng = np.random.default_rng(3)
    features = rng.normal(size=(500, 3)) * np.array([1.0, 2.0, 0.5])
    stats = FeatureStats.from_features(features)
    direction = np.array([1.0, 1.0, 1.0])
    probes = stats.mean + np.outer([0.0, 0.5, 1.0, 2.0, 4.0], direction)

    scores = mahalanobis_score(probes, stats)

    assert scores[0] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.diff(scores) > 0)
    assert scores[4] == pytest.approx(16 * scores[2])  # squared distance: quadratic in the offset


def test_mahalanobis_with_identity_covariance_is_squared_euclidean() -> None:
    features = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]) * np.sqrt(2)  # covariance I

    scores = mahalanobis_score([[3.0, 4.0]], FeatureStats.from_features(features), shrinkage=0.0)

    assert scores[0] == pytest.approx(25.0)


def test_mahalanobis_uses_the_nearest_class_mean() -> None:
    rng = np.random.default_rng(4)
    features = np.concatenate([rng.normal(-5, 1, size=(100, 2)), rng.normal(5, 1, size=(100, 2))])
    labels = np.repeat([0, 1], 100)
    with_classes = FeatureStats.from_features(features, labels)

    scores = mahalanobis_score(with_classes.class_means(), with_classes)

    np.testing.assert_allclose(scores, 0.0, atol=1e-12)
    assert mahalanobis_score([[0.0, 0.0]], with_classes)[0] > 10.0  # between the classes: far from both


def test_shrinkage_makes_a_singular_covariance_usable() -> None:
    features = np.random.default_rng(5).normal(size=(3, 10))  # N < D: rank 2

    with pytest.raises(ValueError, match="invertible covariance.*shrinkage > 0"):
        mahalanobis_score(features, FeatureStats.from_features(features), shrinkage=0.0)
    assert np.all(np.isfinite(mahalanobis_score(features, FeatureStats.from_features(features))))


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: msp_score(np.zeros((2, 3, 4))),
            r"'logits' parameter of msp_score .*\(B, C, H, W\).*shape \(2, 3, 4\)",
        ),
        (lambda: energy_score(np.zeros((2, 1, 4, 4))), r"C >= 2 .*Got shape \(2, 1, 4, 4\)"),
        (lambda: entropy_score(np.full((1, 2, 2, 2), np.nan)), r"'logits' .* must be finite"),
        (lambda: msp_score(np.zeros((1, 2, 2, 2)), pool="fg"), r"'pool' .* one of 'foreground', 'topk'"),
        (
            lambda: msp_score(np.zeros((1, 2, 2, 2)), pool="topk", top_percent=0),
            r"'top_percent' .*\(0, 100\]",
        ),
        (lambda: msp_score("logits"), r"'logits' .*Got str instead"),
        (lambda: ood_metrics([], [1.0]), r"'scores_in' parameter of ood_metrics .*Got shape \(0,\)"),
        (lambda: ood_metrics([[1.0]], [1.0]), r"'scores_in' .*\(N,\).*Got shape \(1, 1\)"),
        (lambda: ood_metrics([1.0], [1.0], tpr=1.5), r"'tpr' parameter of ood_metrics"),
        (lambda: selective_dice([1.0, 2.0], [0.5], [1.0]), r"shape of 'scores' \(2,\)\. Got shape \(1,\)"),
        (lambda: selective_dice([1.0], [1.5], [1.0]), r"'dice' .* \[0, 1\]"),
        (lambda: selective_dice([1.0], [0.5], [0.0]), r"'coverages' .* \(0, 1\]"),
        (
            lambda: FeatureStats.from_features(np.zeros((3, 2)), [0, 1]),
            r"'labels' .*shape \(3,\).*Got shape \(2,\)",
        ),
        (lambda: FeatureStats.from_features(np.zeros((2, 2)), [0, 3], num_classes=2), r"\[0, num_classes\)"),
        (lambda: FeatureStats.merge([]), r"'stats_list' parameter of merge"),
        (
            lambda: FeatureStats.merge(
                [FeatureStats.from_features(np.ones((2, 2))), FeatureStats.from_features(np.ones((2, 3)))]
            ),
            r"one layout",
        ),
        (
            lambda: mahalanobis_score(np.zeros((1, 3)), FeatureStats.from_features(np.eye(2))),
            r"shape \(B, 2\) to match 'stats' \(D=2\)\. Got shape \(1, 3\)",
        ),
        (
            lambda: mahalanobis_score(np.zeros((1, 2)), FeatureStats.from_features(np.ones((4, 2)))),
            r"features that vary: .*zero variance",
        ),
    ],
)
def test_bad_inputs_raise_one_sentence(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
