from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sims.hospitals import (
    HOLDOUT_OFFSET,
    PUBLIC_HOSPITAL_ID,
    PUBLIC_SCANNERS,
    SPLITS,
    HospitalSpec,
    WorldSpec,
    cache_key,
    load_holdout_pool,
    load_hospital,
    load_public_eval,
    make_federation,
    make_patient,
    make_public_cohort,
    public_eval_patients,
    split_indices,
    split_sizes,
)
from sims.scanners import IDENTITY_SCANNER

# Small worlds keep the suite fast: 32 px images, 10-patient cohorts.
SMALL = WorldSpec(image_size=32, patients_per_hospital=10, holdout_per_hospital=2)


def spec_with(prevalence: float, scanner=IDENTITY_SCANNER) -> HospitalSpec:
    return HospitalSpec(
        hospital_id=0,
        num_patients=10,
        lesion_prevalence=prevalence,
        lesion_radius=(4.0, 6.0),
        scanner=scanner,
    )


# ----------------------------------------------------------------------------- WorldSpec


# fmt: off
INVALID_WORLDS: list[tuple[dict, str]] = [
    ({"image_size": 50}, "The 'image_size' parameter of WorldSpec must be an int divisible by 8 in [32, 256]. Got 50 instead. Try 48 or 56."),
    ({"image_size": 264}, "The 'image_size' parameter of WorldSpec must be an int divisible by 8 in [32, 256]. Got 264 instead. Try 256."),
    ({"image_size": 96.0}, "The 'image_size' parameter of WorldSpec must be an int divisible by 8 in [32, 256]. Got 96.0 instead."),
    ({"seed": -1}, "The 'seed' parameter of WorldSpec must be an int in [0, inf). Got -1 instead."),
    ({"seed": True}, "The 'seed' parameter of WorldSpec must be an int in [0, inf). Got True instead."),
    ({"patients_per_hospital": 9}, "The 'patients_per_hospital' parameter of WorldSpec must be an int in [10, inf). Got 9 instead."),
    ({"quantity_skew": 1.5}, "The 'quantity_skew' parameter of WorldSpec must be a float in [0, 1]. Got 1.5 instead."),
    ({"scanner_severity": 3.5}, "The 'scanner_severity' parameter of WorldSpec must be a float in [0, 3]. Got 3.5 instead."),
    ({"label_skew": -0.1}, "The 'label_skew' parameter of WorldSpec must be a float in [0, 1]. Got -0.1 instead."),
    ({"lesions": "yes"}, "The 'lesions' parameter of WorldSpec must be a bool. Got 'yes' instead."),
    ({"val_fraction": 0.0}, "The 'val_fraction' parameter of WorldSpec must be a float in (0, 1). Got 0.0 instead."),
    ({"val_fraction": 0.5, "test_fraction": 0.4}, "The 'val_fraction' and 'test_fraction' parameters of WorldSpec must sum to at most 0.8 so that the train split keeps patients. Got 0.5 + 0.4 instead."),
    ({"holdout_per_hospital": -1}, "The 'holdout_per_hospital' parameter of WorldSpec must be an int in [0, inf). Got -1 instead."),
    ({"server_eval_patients": 0}, "The 'server_eval_patients' parameter of WorldSpec must be an int in [1, 100000]. Got 0 instead."),
]
# fmt: on


@pytest.mark.parametrize(("kwargs", "message"), INVALID_WORLDS)
def test_world_spec_validation_names_parameter_range_and_value(kwargs: dict, message: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        WorldSpec(**kwargs)


def test_world_spec_defaults_are_valid_and_frozen() -> None:
    # Prepare
    world = WorldSpec()

    # Execute / Assert
    assert (world.image_size, world.patients_per_hospital, world.holdout_per_hospital) == (96, 150, 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        world.seed = 1  # type: ignore[misc]


def test_hospital_spec_validation() -> None:
    # Execute / Assert
    expected = r"'lesion_radius' parameter of HospitalSpec .* Got \(6.0, 4.0\) instead"
    with pytest.raises(ValueError, match=expected):
        HospitalSpec(0, 10, 0.5, (6.0, 4.0), IDENTITY_SCANNER)


# ----------------------------------------------------------------------------- federation


def test_no_quantity_skew_gives_equal_cohorts() -> None:
    # Execute
    specs = make_federation(WorldSpec(quantity_skew=0.0), 5)

    # Assert
    assert [s.num_patients for s in specs] == [150] * 5
    assert [s.hospital_id for s in specs] == [0, 1, 2, 3, 4]


def test_quantity_skew_makes_cohorts_unequal_and_keeps_the_total() -> None:
    # Execute
    sizes = [s.num_patients for s in make_federation(WorldSpec(quantity_skew=1.0), 5)]

    # Assert
    assert sum(sizes) == 750
    assert min(sizes) >= 10
    assert max(sizes) > 4 * min(sizes)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    skew=st.floats(0.0, 1.0),
    patients=st.integers(10, 500),
    hospitals=st.integers(1, 20),
)
def test_cohorts_always_sum_to_the_total_with_at_least_ten_each(
    seed: int, skew: float, patients: int, hospitals: int
) -> None:
    # Prepare
    world = WorldSpec(seed=seed, quantity_skew=skew, patients_per_hospital=patients)

    # Execute
    specs = make_federation(world, hospitals)

    # Assert
    sizes = [s.num_patients for s in specs]
    assert sum(sizes) == patients * hospitals
    assert min(sizes) >= 10
    for spec in specs:  # every split keeps at least one patient
        assert min(v for k, v in split_sizes(world, spec).items() if k != "holdout") >= 1


def test_label_skew_spreads_lesion_prevalence() -> None:
    # Execute
    flat = [s.lesion_prevalence for s in make_federation(WorldSpec(label_skew=0.0), 8)]
    spread = [s.lesion_prevalence for s in make_federation(WorldSpec(label_skew=1.0), 8)]

    # Assert
    assert flat == [0.5] * 8
    assert np.std(spread) > 0.1
    assert all(0.05 <= p <= 0.95 for p in spread)


def test_no_lesions_means_zero_prevalence() -> None:
    # Execute
    specs = make_federation(WorldSpec(lesions=False), 3)

    # Assert
    assert [s.lesion_prevalence for s in specs] == [0.0] * 3


def test_federation_is_deterministic_and_hospitals_are_stable() -> None:
    # Prepare
    world = WorldSpec(seed=5, quantity_skew=0.5)

    # Execute
    first, again = make_federation(world, 4), make_federation(world, 4)
    other_seed = make_federation(dataclasses.replace(world, seed=6), 4)
    larger = make_federation(dataclasses.replace(world, quantity_skew=0.0), 6)

    # Assert
    assert first == again
    assert first != other_seed
    # prevalence, lesion size and scanner of a hospital do not depend on the federation size
    for small, big in zip(first, larger, strict=False):
        assert small.lesion_prevalence == big.lesion_prevalence
        assert small.lesion_radius == big.lesion_radius
        assert small.scanner == big.scanner


def test_lesion_radius_scales_with_image_size() -> None:
    # Execute
    at_96 = make_federation(WorldSpec(image_size=96), 1)[0].lesion_radius
    at_192 = make_federation(WorldSpec(image_size=192), 1)[0].lesion_radius

    # Assert
    assert at_96[0] >= 4.0
    assert at_192 == pytest.approx((2 * at_96[0], 2 * at_96[1]))


def test_make_federation_rejects_zero_hospitals() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"'num_hospitals' parameter of make_federation .* Got 0 instead"):
        make_federation(WorldSpec(), 0)


# ----------------------------------------------------------------------------- splits


def test_splits_partition_the_cohort_and_holdout_is_disjoint() -> None:
    # Prepare
    world = WorldSpec(patients_per_hospital=40)
    spec = make_federation(world, 1)[0]

    # Execute
    sizes, indices = split_sizes(world, spec), split_indices(world, spec)

    # Assert
    assert sizes == {"train": 28, "val": 6, "test": 6, "holdout": 16}
    cohort = np.concatenate([indices["train"], indices["val"], indices["test"]])
    np.testing.assert_array_equal(np.sort(cohort), np.arange(40))
    np.testing.assert_array_equal(indices["holdout"], np.arange(HOLDOUT_OFFSET, HOLDOUT_OFFSET + 16))
    assert {k: len(v) for k, v in indices.items()} == sizes


# ----------------------------------------------------------------------------- patients


def test_make_patient_shapes_types_and_ranges() -> None:
    # Prepare
    world = WorldSpec(image_size=64)
    spec = make_federation(world, 1)[0]

    # Execute
    image, label = make_patient(world, spec, 3)

    # Assert
    assert image.shape == label.shape == (1, 64, 64)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert image.min() >= 0.0 and image.max() == pytest.approx(1.0)
    assert set(np.unique(label).tolist()) >= {0, 1, 2, 3}
    assert label.max() <= 4


def test_make_patient_is_deterministic_and_keyed_by_seed_hospital_patient() -> None:
    # Prepare
    world = WorldSpec(image_size=48)
    specs = make_federation(world, 2)
    reseeded = dataclasses.replace(world, seed=1)

    # Execute
    first = make_patient(world, specs[0], 0)
    again = make_patient(world, specs[0], 0)
    variants = [
        make_patient(reseeded, make_federation(reseeded, 1)[0], 0),
        make_patient(world, specs[1], 0),
        make_patient(world, specs[0], 1),
    ]

    # Assert
    assert first[0].tobytes() == again[0].tobytes()
    assert first[1].tobytes() == again[1].tobytes()
    for image, _ in variants:
        assert not np.array_equal(image, first[0])


def test_image_and_label_agree_on_the_brain() -> None:
    # Prepare: a perfect scanner, no lesions, so intensities are pure tissue
    world = WorldSpec(image_size=64, lesions=False)
    spec = spec_with(0.0)

    # Execute
    image, label = make_patient(world, spec, 7)
    means = [float(image[label == k].mean()) for k in range(4)]

    # Assert: T1 contrast: background < CSF < grey matter < white matter
    assert means[0] < 0.02
    assert means[0] < means[1] < means[2] < means[3]


@pytest.mark.parametrize(
    ("prevalence", "lesions", "expected"), [(1.0, True, 10), (0.0, True, 0), (1.0, False, 0)]
)
def test_lesions_follow_prevalence_and_the_lesions_switch(
    prevalence: float, lesions: bool, expected: int
) -> None:
    # Prepare
    world = WorldSpec(image_size=32, lesions=lesions)
    spec = spec_with(prevalence)

    # Execute
    with_lesion = sum(int((make_patient(world, spec, p)[1] == 4).any()) for p in range(10))

    # Assert
    assert with_lesion == expected


def test_lesions_are_painted_where_labelled() -> None:
    # Prepare
    world = WorldSpec(image_size=96)
    spec = spec_with(1.0)

    # Execute
    image, label = make_patient(world, spec, 0)

    # Assert: a lesion differs from the surrounding white matter by more than 10 %
    lesion = image[label == 4].mean()
    white = np.median(image[label == 3])
    assert (label == 4).sum() >= 30
    assert abs(lesion - white) > 0.1 * white


def test_make_patient_rejects_negative_index() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"'patient' parameter of make_patient .* Got -1 instead"):
        make_patient(SMALL, make_federation(SMALL, 1)[0], -1)


# ----------------------------------------------------------------------------- cache


def assert_same_data(left: dict, right: dict) -> None:
    assert list(left) == list(right) == list(SPLITS)
    for name in SPLITS:
        for a, b in zip(left[name], right[name], strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_load_hospital_shapes_match_split_sizes() -> None:
    # Prepare
    spec = make_federation(SMALL, 1)[0]

    # Execute
    data = load_hospital(SMALL, spec, cache_dir=None)

    # Assert
    for name, count in split_sizes(SMALL, spec).items():
        images, labels = data[name]
        assert images.shape == labels.shape == (count, 1, 32, 32)
        assert images.dtype == np.float32 and labels.dtype == np.uint8


def test_cache_round_trip_is_exact_and_second_load_reads_the_file(tmp_path: Path) -> None:
    # Prepare
    spec = make_federation(SMALL, 1)[0]
    fresh = load_hospital(SMALL, spec, cache_dir=None)

    # Execute
    first = load_hospital(SMALL, spec, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npz"))
    # Overwrite the cached file with a marker: if the second load regenerated, it would
    # not see the marker.
    marked = {name: (images + 7.0, labels) for name, (images, labels) in first.items()}
    arrays = {f"{n}_images": images for n, (images, _) in marked.items()}
    arrays |= {f"{n}_labels": labels.astype(np.uint8) for n, (_, labels) in marked.items()}
    np.savez(files[0], **arrays)
    second = load_hospital(SMALL, spec, cache_dir=tmp_path)

    # Assert
    assert [f.name for f in files] == [f"hospital-000-{cache_key(SMALL, spec)}.npz"]
    assert_same_data(first, fresh)
    assert_same_data(second, marked)
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_cache_is_regenerated(tmp_path: Path) -> None:
    # Prepare
    spec = make_federation(SMALL, 1)[0]
    path = tmp_path / f"hospital-000-{cache_key(SMALL, spec)}.npz"
    path.write_bytes(b"not a zip file")

    # Execute
    data = load_hospital(SMALL, spec, cache_dir=tmp_path)

    # Assert
    assert_same_data(data, load_hospital(SMALL, spec, cache_dir=None))
    assert_same_data(load_hospital(SMALL, spec, cache_dir=tmp_path), data)


def test_cache_key_ignores_augment_and_tracks_everything_else() -> None:
    # Prepare
    spec = make_federation(SMALL, 1)[0]

    # Execute
    key = cache_key(SMALL, spec)

    # Assert
    assert cache_key(dataclasses.replace(SMALL, augment=False), spec) == key
    assert cache_key(dataclasses.replace(SMALL, server_eval_patients=7), spec) == key  # not hospital data
    assert cache_key(dataclasses.replace(SMALL, seed=1), spec) != key
    assert cache_key(dataclasses.replace(SMALL, scanner_severity=2.0), spec) != key
    assert cache_key(SMALL, dataclasses.replace(spec, lesion_prevalence=0.9)) != key


def test_holdout_pool_concatenates_every_hospital(tmp_path: Path) -> None:
    # Prepare
    specs = make_federation(SMALL, 3)

    # Execute
    images, labels = load_holdout_pool(SMALL, specs, cache_dir=tmp_path)

    # Assert
    assert images.shape == labels.shape == (6, 1, 32, 32)
    # Only the holdout patients were generated and cached, not the whole cohorts...
    assert len(list(tmp_path.glob("holdout-*.npz"))) == 3
    assert not list(tmp_path.glob("hospital-*.npz"))
    # ...and they are the same patients as the holdout split of the full hospital.
    np.testing.assert_array_equal(images[2:4], load_hospital(SMALL, specs[1], tmp_path)["holdout"][0])
    np.testing.assert_array_equal(labels[2:4], load_hospital(SMALL, specs[1], None)["holdout"][1])


def test_holdout_pool_does_not_depend_on_cohort_sizes() -> None:
    # Prepare
    world = dataclasses.replace(SMALL, patients_per_hospital=20)
    skewed_world = dataclasses.replace(world, quantity_skew=1.0)
    equal, skewed = make_federation(world, 2), make_federation(skewed_world, 2)

    # Execute
    pool_equal = load_holdout_pool(world, equal, cache_dir=None)
    pool_skewed = load_holdout_pool(skewed_world, skewed, cache_dir=None)

    # Assert
    assert [s.num_patients for s in equal] != [s.num_patients for s in skewed]
    np.testing.assert_array_equal(pool_equal[0], pool_skewed[0])


def test_public_cohorts_are_not_hospitals_and_cover_every_scanner_archetype() -> None:
    from sims.hospitals import PUBLIC_HOSPITAL_ID, make_public_cohort
    from sims.scanners import IDENTITY_SCANNER, scanner_archetype

    world = WorldSpec()
    cohorts = [make_public_cohort(world, index=k) for k in range(5)]
    hospitals = make_federation(world, 8)

    assert cohorts[0].scanner == IDENTITY_SCANNER
    assert all(c.scanner != IDENTITY_SCANNER for c in cohorts[1:])
    assert {c.hospital_id for c in cohorts}.isdisjoint(h.hospital_id for h in hospitals)
    assert all(c.hospital_id >= PUBLIC_HOSPITAL_ID for c in cohorts)
    assert {scanner_archetype(world.seed, c.hospital_id) for c in cohorts[1:]} == {
        "noisy", "blurry", "bias_contrast", "ringing_spikes"
    }
    assert all(c.scanner != h.scanner for c in cohorts for h in hospitals)


# ----------------------------------------------------------------------------- federation cache


def test_make_federation_is_computed_once_per_world_and_size() -> None:
    # Prepare: two equal but distinct WorldSpec objects, as two messages would build them.
    world, same_world = WorldSpec(seed=11, quantity_skew=0.7), WorldSpec(seed=11, quantity_skew=0.7)
    assert world is not same_world

    # Execute
    first = make_federation(world, 50)
    again = make_federation(same_world, 50)
    other = make_federation(world, 51)

    # Assert: the second lookup returns the very same tuple; another size is another federation.
    assert again is first
    assert other is not first and len(other) == 51
    with pytest.raises(ValueError, match=r"'num_hospitals' parameter of make_federation .* Got 1.5 instead"):
        make_federation(world, 1.5)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- public evaluation set


def test_public_eval_set_has_the_configured_size_uint8_labels_and_public_patients() -> None:
    # Prepare
    world = dataclasses.replace(SMALL, server_eval_patients=7)
    public = [make_public_cohort(world, index=k) for k in range(PUBLIC_SCANNERS)]

    # Execute
    images, labels = load_public_eval(world)
    members = public_eval_patients(world)

    # Assert: size and types.
    assert images.shape == labels.shape == (7, 1, 32, 32)
    assert images.dtype == np.float32 and labels.dtype == np.uint8
    # Every patient comes from a public cohort (cycling through all five scanners), and is
    # exactly that cohort's patient: no hospital's spec or scanner is involved.
    assert [cohort for cohort, _ in members] == [public[i % PUBLIC_SCANNERS] for i in range(7)]
    assert all(cohort.hospital_id >= PUBLIC_HOSPITAL_ID for cohort, _ in members)
    for row, (cohort, patient) in enumerate(members):
        image, label = make_patient(world, cohort, patient)
        np.testing.assert_array_equal(images[row], image)
        np.testing.assert_array_equal(labels[row], label)


def test_public_eval_patients_are_disjoint_from_pretraining_and_from_every_hospital() -> None:
    # Prepare
    world = dataclasses.replace(SMALL, server_eval_patients=40)
    hospitals = make_federation(world, 12)

    # Execute
    members = public_eval_patients(world)

    # Assert: not a pre-training patient (pre-training uses the public cohorts' splits)...
    for k in range(PUBLIC_SCANNERS):
        cohort = make_public_cohort(world, index=k)
        used = np.concatenate(list(split_indices(world, cohort).values()))
        chosen = [patient for c, patient in members if c == cohort]
        assert len(chosen) == 8 and set(chosen).isdisjoint(used.tolist())
    # ...and no hospital's id (the random streams) or scanner.
    assert {c.hospital_id for c, _ in members}.isdisjoint(h.hospital_id for h in hospitals)
    assert all(c.scanner != h.scanner for c, _ in members for h in hospitals)


def test_public_eval_set_grows_by_extension_and_ignores_cohort_settings() -> None:
    # Prepare
    small = dataclasses.replace(SMALL, server_eval_patients=3)
    large = dataclasses.replace(SMALL, server_eval_patients=6)
    other_cohorts = dataclasses.replace(small, patients_per_hospital=40, quantity_skew=1.0, label_skew=1.0)

    # Execute
    few, more, same = load_public_eval(small), load_public_eval(large), load_public_eval(other_cohorts)

    # Assert
    np.testing.assert_array_equal(more[0][:3], few[0])
    np.testing.assert_array_equal(few[0], same[0])
    np.testing.assert_array_equal(few[1], same[1])


def test_uint8_labels_give_the_same_dice_and_loss_as_int64() -> None:
    """Every consumer of labels (Dice metric, DiceCE loss) widens uint8 itself, per batch."""
    import torch

    from sims.anatomy import class_names
    from sims.evaluation import evaluate_segmentation
    from sims.model import make_model
    from sims.training import make_loss

    # Prepare
    world = dataclasses.replace(SMALL, server_eval_patients=5)
    images, labels = load_public_eval(world)
    classes = class_names(world.lesions)
    model = make_model(len(classes), (8, 16), seed=0)

    # Execute
    dice_uint8 = evaluate_segmentation(model, images, labels, classes, batch_size=2)
    dice_int64 = evaluate_segmentation(model, images, labels.astype(np.int64), classes, batch_size=2)
    with torch.no_grad():
        logits = model(torch.from_numpy(images))
        loss_uint8 = make_loss()(logits, torch.from_numpy(labels))
        loss_int64 = make_loss()(logits, torch.from_numpy(labels.astype(np.int64)))

    # Assert
    assert dice_uint8 == dice_int64
    assert float(loss_uint8) == float(loss_int64)
