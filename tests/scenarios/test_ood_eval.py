"""OOD scores, features and feature statistics of a fedscan U-Net (scenarios.ood_eval)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from scenarios.ood import FeatureStats, energy_score, entropy_score, mahalanobis_score, msp_score
from scenarios.ood_eval import (
    METHODS,
    SCORE_FAMILIES,
    block_stats,
    bottleneck,
    feature_blocks,
    feature_stats,
    image_features_and_logits,
    methods_for,
    score_images,
    stats_from_lists,
    stats_to_lists,
)
from sims.evaluation import evaluate_segmentation, per_patient_dice
from sims.model import make_model

CHANNELS = (4, 8, 16)
CLASSES = ("background", "c1", "c2", "c3", "lesion")
LESION = 4


def toy_scans(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 32x32 scans: a bright disc (classes 1-3 in rings) on noise, a small lesion in every other one."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    images = rng.normal(0.0, 0.2, size=(n, 1, 32, 32)).astype(np.float32)
    labels = np.zeros((n, 1, 32, 32), dtype=np.uint8)
    for i in range(n):
        cy, cx = rng.integers(12, 20, size=2)
        r = np.hypot(yy - cy, xx - cx)
        labels[i, 0][r < 10] = 1
        labels[i, 0][r < 7] = 2
        labels[i, 0][r < 4] = 3
        if i % 2:
            labels[i, 0][np.hypot(yy - cy - 2, xx - cx + 3) < 2] = LESION
        images[i, 0] += labels[i, 0] * 0.5
    return images, labels


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_model(len(CLASSES), CHANNELS, seed=3)


@pytest.fixture(scope="module")
def scans() -> tuple[np.ndarray, np.ndarray]:
    return toy_scans(12)


def no_hooks_left(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --------------------------------------------------------------------------- bottleneck and features


@pytest.mark.parametrize("channels", [(4, 8), (4, 8, 16), (2, 4, 6, 10)])
def test_bottleneck_is_the_deepest_block_and_gives_the_last_channel_count(channels: tuple[int, ...]) -> None:
    # Prepare
    model = make_model(3, channels)
    side = 2 ** len(channels)
    images = np.random.default_rng(0).normal(size=(3, 1, side, side)).astype(np.float32)

    # Execute
    block = bottleneck(model)
    features, logits = image_features_and_logits(model, images, batch_size=2)

    # Assert: the only block seeing the coarsest grid, side / 2 ** (levels - 1).
    shapes: list[tuple[int, ...]] = []
    handle = block.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    with torch.no_grad():
        model(torch.from_numpy(images))
    handle.remove()
    coarsest = side // 2 ** (len(channels) - 1)
    assert shapes == [(3, channels[-1], coarsest, coarsest)]
    assert features.shape == (3, channels[-1] + 2 * channels[0]) and features.dtype == np.float64
    assert feature_blocks(model) == {
        "bottleneck": slice(0, channels[-1]), "early": slice(channels[-1], channels[-1] + 2 * channels[0])
    }
    assert logits.shape == (3, 3, side, side)


def test_features_equal_a_manual_forward_pass_pooled_and_are_deterministic(
    model: torch.nn.Module, scans: tuple[np.ndarray, np.ndarray]
) -> None:
    # Prepare: the U-Net by hand, down, down, bottom (Sequential(down, Skip(Sequential(down, Skip(bottom), up)), up)).
    images, _ = scans
    model.eval()
    levels: Any = model.model  # MONAI's nesting, untyped
    with torch.no_grad():
        x = torch.from_numpy(images)
        bottom = levels[1].submodule[1].submodule(levels[1].submodule[0](levels[0](x)))
        early = levels[0].conv(x)  # the first convolution, before its normalisation
        expected = torch.cat([bottom.mean(dim=(2, 3)), early.mean(dim=(2, 3)), early.std(dim=(2, 3))], 1)
        expected = expected.double().numpy()
        expected_logits = model(x).numpy()

    # Execute
    first, logits = image_features_and_logits(model, images, batch_size=len(images))
    again, _ = image_features_and_logits(model, images, batch_size=len(images))

    # Assert
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(logits, expected_logits)


def test_not_a_unet_is_refused_with_one_sentence() -> None:
    with pytest.raises(
        ValueError, match=r"The 'model' parameter of bottleneck must be a fedscan U-Net.*Got Sequential"
    ):
        bottleneck(torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Conv2d(3, 3, 3)))
    with pytest.raises(ValueError, match="Got Conv2d instead"):
        image_features_and_logits(torch.nn.Conv2d(1, 3, 3), np.zeros((1, 1, 8, 8), dtype=np.float32))


@pytest.mark.parametrize("call", ["features", "scores", "stats"])
def test_hook_removed_and_training_flag_restored_even_when_the_forward_raises(call: str) -> None:
    # Prepare: 30 is not divisible by 4, so the up-sampled 16x16 map cannot join the 15x15 skip.
    model = make_model(len(CLASSES), CHANNELS)
    model.train()
    images, labels = np.zeros((2, 1, 30, 30), dtype=np.float32), np.zeros((2, 1, 30, 30), dtype=np.int64)

    # Execute
    with pytest.raises(RuntimeError):
        if call == "features":
            image_features_and_logits(model, images)
        elif call == "scores":
            score_images(model, images, labels, families=["msp", "tta-variance"], class_names=CLASSES)
        else:
            feature_stats(model, images, labels, lesion_class=LESION)

    # Assert
    assert no_hooks_left(model)
    assert all(m.training for m in model.modules())


def test_eval_mode_is_kept_and_no_hook_left_after_success(
    model: torch.nn.Module, scans: tuple[np.ndarray, np.ndarray]
) -> None:
    model.eval()
    stats = feature_stats(model, *scans, lesion_class=LESION)
    score_images(model, *scans, families=SCORE_FAMILIES, class_names=CLASSES, stats=stats)
    assert no_hooks_left(model)
    assert not any(m.training for m in model.modules())


# --------------------------------------------------------------------------- scores


def test_logit_scores_equal_scenarios_ood_on_the_models_logits(
    model: torch.nn.Module, scans: tuple[np.ndarray, np.ndarray]
) -> None:
    # Prepare
    images, _ = scans
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(images))

    # Execute: batches of 5 split the 12 images unevenly.
    scored = score_images(
        model,
        images,
        families=("msp", "entropy", "energy"),
        class_names=CLASSES,
        top_percent=7.0,
        batch_size=5,
    )

    # Assert
    assert tuple(scored.scores) == methods_for(("msp", "entropy", "energy"))
    assert scored.dice is None
    for name, function in {"msp": msp_score, "entropy": entropy_score, "energy": energy_score}.items():
        for pool in ("foreground", "topk"):
            expected = function(logits, pool=pool, top_percent=7.0)
            np.testing.assert_allclose(scored.scores[f"{name}/{pool}"], expected, rtol=1e-6, atol=1e-9)


def test_tta_variance_is_the_softmax_variance_between_the_image_and_its_flip(
    model: torch.nn.Module, scans: tuple[np.ndarray, np.ndarray]
) -> None:
    # Prepare: the oracle, written out per image.
    images, _ = scans
    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(images)
        logits = model(x).double()
        p = torch.softmax(logits, dim=1).numpy()
        q = torch.softmax(model(torch.flip(x, dims=[3])).double(), dim=1).numpy()[..., ::-1]
    foreground = logits.argmax(dim=1).numpy() != 0
    pixel = np.var(np.stack([p, q]), axis=0).mean(axis=1)  # (N, H, W)
    expected = [pix[fg].mean() if fg.any() else pix.mean() for pix, fg in zip(pixel, foreground, strict=True)]

    # Execute
    scored = score_images(
        model, images, families=["tta-variance"], class_names=CLASSES, batch_size=len(images)
    )
    plain, _ = image_features_and_logits(model, images, batch_size=len(images))

    # Assert: and the flipped pass leaves the image features alone.
    np.testing.assert_allclose(scored.scores["tta-variance/foreground"], expected, rtol=1e-5)
    assert np.all(scored.scores["tta-variance/foreground"] > 0)  # a U-Net is not exactly flip-equivariant
    np.testing.assert_array_equal(scored.features, plain)


def test_mahalanobis_scores_use_global_and_class_statistics(
    model: torch.nn.Module, scans: tuple[np.ndarray, np.ndarray]
) -> None:
    # Prepare
    train_images, train_labels = scans
    test_images, _ = toy_scans(6, seed=1)
    stats = feature_stats(model, train_images, train_labels, lesion_class=LESION)

    # Execute
    scored = score_images(model, test_images, families=["mahalanobis"], class_names=CLASSES, stats=stats)
    lesion_free = score_images(
        model,
        test_images,
        families=["mahalanobis"],
        class_names=CLASSES,
        stats=feature_stats(model, train_images, train_labels, lesion_class=None),
    )

    # Assert
    assert tuple(scored.scores) == ("mahalanobis/global", "mahalanobis/class", "mahalanobis/early")
    blocks = feature_blocks(model)
    deep, early = blocks["bottleneck"], blocks["early"]
    train_features = image_features_and_logits(model, train_images)[0]
    global_stats = FeatureStats.from_features(train_features[:, deep])
    np.testing.assert_allclose(
        scored.scores["mahalanobis/global"], mahalanobis_score(scored.features[:, deep], global_stats), rtol=1e-9
    )
    np.testing.assert_allclose(
        scored.scores["mahalanobis/class"], mahalanobis_score(scored.features[:, deep], block_stats(stats, deep)),
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        scored.scores["mahalanobis/early"],
        mahalanobis_score(scored.features[:, early], FeatureStats.from_features(train_features[:, early])),
        rtol=1e-6,
    )
    assert not np.allclose(scored.scores["mahalanobis/class"], scored.scores["mahalanobis/global"])
    assert tuple(lesion_free.scores) == ("mahalanobis/global", "mahalanobis/early")  # no classes, no class-conditional score
    np.testing.assert_allclose(
        lesion_free.scores["mahalanobis/global"], scored.scores["mahalanobis/global"], rtol=1e-9
    )


def test_mahalanobis_without_stats_is_refused(
    model: torch.nn.Module, scans: tuple[np.ndarray, np.ndarray]
) -> None:
    with pytest.raises(
        ValueError, match="The 'stats' parameter of score_images must be a FeatureStats.*Got NoneType"
    ):
        score_images(model, scans[0], families=["msp", "mahalanobis"], class_names=CLASSES)


def test_per_image_dice_matches_evaluate_segmentation(
    model: torch.nn.Module, scans: tuple[np.ndarray, np.ndarray]
) -> None:
    # Execute
    scored = score_images(model, *scans, families=["msp"], class_names=CLASSES, batch_size=5)
    per_patient = per_patient_dice(model, *scans, CLASSES, batch_size=5)
    summary = evaluate_segmentation(model, *scans, CLASSES, batch_size=5)

    # Assert
    assert scored.dice is not None and scored.dice.shape == (12,)
    np.testing.assert_array_equal(scored.dice, per_patient.mean(axis=1))
    assert scored.dice.mean() == pytest.approx(summary["dice_mean"], rel=1e-6)


def test_class_names_must_match_the_model_outputs(
    model: torch.nn.Module, scans: tuple[np.ndarray, np.ndarray]
) -> None:
    with pytest.raises(ValueError, match="one class per model output. Got 3 names for 5 outputs"):
        score_images(model, scans[0], families=["msp"], class_names=CLASSES[:3])
    assert no_hooks_left(model)


# --------------------------------------------------------------------------- families


def test_methods_for_expands_families_in_method_order() -> None:
    assert methods_for(SCORE_FAMILIES) == METHODS
    assert methods_for(["energy", "msp", "energy"]) == (
        "msp/foreground",
        "msp/topk",
        "energy/foreground",
        "energy/topk",
    )
    assert methods_for([]) == ()
    assert {m.split("/")[0] for m in METHODS} == set(SCORE_FAMILIES)


@pytest.mark.parametrize(
    ("families", "message"),
    [
        (["energie"], r"must list names from 'msp'.*Got 'energie' instead. Did you mean 'energy'\?"),
        (["msp", "mahalanobis-class"], r"Got 'mahalanobis-class' instead. Did you mean 'mahalanobis'\?"),
        ("msp", r"must be a list of names.*Got 'msp' instead"),
    ],
)
def test_unknown_family_is_refused_with_a_suggestion(families: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        methods_for(families)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- statistics


def test_statistics_of_two_hospitals_merge_into_those_of_the_pooled_images(
    model: torch.nn.Module, scans: tuple[np.ndarray, np.ndarray]
) -> None:
    # Prepare: hospital B has no lesion at all, yet must merge (two classes always).
    images, labels = scans
    lesion_free = labels[::2]
    a_images, a_labels = images[1::2], labels[1::2]

    # Execute
    merged = FeatureStats.merge(
        [
            feature_stats(model, a_images, a_labels, lesion_class=LESION),
            feature_stats(model, images[::2], lesion_free, lesion_class=LESION, batch_size=4),
        ]
    )
    pooled = feature_stats(
        model,
        np.concatenate([a_images, images[::2]]),
        np.concatenate([a_labels, lesion_free]),
        lesion_class=LESION,
    )

    # Assert
    assert merged.count == pooled.count == 12
    np.testing.assert_array_equal(merged.class_counts, [6, 6])
    np.testing.assert_array_equal(pooled.class_counts, [6, 6])
    for field in ("total", "outer", "class_totals"):
        np.testing.assert_allclose(getattr(merged, field), getattr(pooled, field), rtol=1e-12, atol=1e-12)


def test_image_classes_mark_images_that_contain_the_lesion(
    model: torch.nn.Module, scans: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = scans
    features, _ = image_features_and_logits(model, images)
    stats = feature_stats(model, images, labels, lesion_class=LESION)
    assert stats.class_totals is not None
    np.testing.assert_allclose(
        stats.class_totals, [features[::2].sum(axis=0), features[1::2].sum(axis=0)], rtol=1e-12
    )
    assert feature_stats(model, images, labels, lesion_class=None).class_counts is None


def test_stats_round_trip_through_lists_is_exact(
    model: torch.nn.Module, scans: tuple[np.ndarray, np.ndarray]
) -> None:
    for lesion_class in (LESION, None):
        # Prepare
        stats = feature_stats(model, *scans, lesion_class=lesion_class)

        # Execute
        lists = stats_to_lists(stats)
        back = stats_from_lists(lists)

        # Assert
        # Plain Python numbers, what Flower records hold.
        assert all(type(x) in (int, float) for v in lists.values() if isinstance(v, list) for x in v)
        assert type(lists["count"]) is int
        assert back.count == stats.count
        np.testing.assert_array_equal(back.total, stats.total)
        np.testing.assert_array_equal(back.outer, stats.outer)
        if lesion_class is None:
            assert back.class_counts is None and back.class_totals is None
        else:
            np.testing.assert_array_equal(back.class_counts, stats.class_counts)
            np.testing.assert_array_equal(back.class_totals, stats.class_totals)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"outer": [1.0] * 15}, r"The 'outer' entry .* must be a list of 16 finite floats \(D \* D with D=4"),
        ({"count": 0}, r"The 'count' entry .* must be an int >= 1. Got 0"),
        ({"class_totals": None}, r"both 'class_counts' and 'class_totals' or neither. Got only class_counts"),
        ({"class_counts": [2, 2]}, r"adding up to count=5. Got \[2, 2\]"),
        (
            {"class_totals": [0.0] * 7},
            r"The 'class_totals' entry .* list of 8 finite floats \(K \* D with K=2, D=4\)",
        ),
        ({"total": [0.0, float("nan"), 0.0, 0.0]}, r"The 'total' entry .* finite floats"),
    ],
)
def test_malformed_lists_are_refused_with_one_sentence(change: dict[str, object], message: str) -> None:
    rng = np.random.default_rng(0)
    lists: dict[str, object] = dict(
        stats_to_lists(
            FeatureStats.from_features(rng.normal(size=(5, 4)), np.array([0, 1, 1, 0, 1]), num_classes=2)
        )
    )
    for key, value in change.items():
        if value is None:
            del lists[key]
        else:
            lists[key] = value
    with pytest.raises(ValueError, match=message):
        stats_from_lists(lists)
