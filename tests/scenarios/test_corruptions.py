"""Graded perturbations (robustness curves) and OOD sets made from a hospital's test images."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import pytest

from common.validation import InvalidParameterError
from scenarios.corruptions import (
    FAR_SETS,
    NEAR_SETS,
    OOD_SETS,
    PERTURBATIONS,
    blur,
    contrast,
    gaussian_noise,
    make_ood_set,
    perturb,
    rotate,
    salt_and_pepper,
    shepp_logan,
)

SIZE = 32
CSF, GREY, WHITE = 0.35, 0.62, 0.85
RANDOM = [name for name, spec in PERTURBATIONS.items() if spec.random]


def _brain(size: int = SIZE, shift: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A brain-like ``(1, H, W)`` disk: white matter, a grey-matter rim, a CSF ventricle; 0 outside.

    Labels 0 background, 1 CSF, 2 grey, 3 white. ``shift`` moves the ventricle right.
    """
    rows, cols = np.mgrid[:size, :size] - (size - 1) / 2.0
    radius = np.hypot(rows, cols)
    label = np.zeros((size, size), dtype=np.uint8)
    label[radius <= 0.38 * size] = 2
    label[radius <= 0.3 * size] = 3
    label[np.hypot(rows, cols - shift) <= 0.1 * size] = 1
    image = np.choose(label, [0.0, CSF, GREY, WHITE]).astype(np.float32)
    return image[None], label[None]


@pytest.fixture
def batch() -> tuple[np.ndarray, np.ndarray]:
    """Three 32 px brains, slightly different from one another, with a little texture."""
    images, labels = zip(*(_brain(shift=s) for s in (-3, 0, 3)), strict=True)
    x = np.stack(images)
    texture = np.random.default_rng(7).uniform(-0.03, 0.03, size=x.shape).astype(np.float32)
    return np.where(x > 0, x + texture, 0.0).astype(np.float32), np.stack(labels)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _middle(name: str) -> float:
    """A strength that changes images visibly, inside the perturbation's range."""
    return {"noise": 0.1, "salt-pepper": 0.1, "contrast": 0.5, "blur": 1.5, "rotation": 30.0}[name]


# ---------------------------------------------------------------- perturbations: shared contract


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_strength_zero_gives_back_the_exact_input(name: str, batch: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = batch

    out, out_labels = perturb(name, images, labels, 0.0, _rng())

    assert np.array_equal(out, images) and out.dtype == np.float32
    assert np.array_equal(out_labels, labels) and out_labels.dtype == labels.dtype
    assert out is not images  # a copy: the caller's array is never aliased


@pytest.mark.parametrize("label_dtype", [np.uint8, np.int64])
@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_perturbations_keep_shape_and_dtypes_and_change_the_images(
    name: str, label_dtype: type, batch: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = batch
    labels = labels.astype(label_dtype)
    before = images.copy()

    out, out_labels = perturb(name, images, labels, _middle(name), _rng())

    assert out.shape == images.shape and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and out.min() >= 0.0
    assert not np.array_equal(out, images)
    assert np.array_equal(images, before)  # the input is not modified in place
    assert out_labels.shape == labels.shape and out_labels.dtype == label_dtype
    if name != "rotation":
        assert out_labels is labels


@pytest.mark.parametrize("name", RANDOM)
def test_random_perturbations_are_reproducible_from_the_generator(
    name: str, batch: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = batch

    first, _ = perturb(name, images, labels, _middle(name), _rng(1))
    again, _ = perturb(name, images, labels, _middle(name), _rng(1))
    other, _ = perturb(name, images, labels, _middle(name), _rng(2))

    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()


def test_deterministic_perturbations_do_not_touch_the_generator(batch: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = batch
    rng = _rng(3)
    state = rng.bit_generator.state

    for name in ("contrast", "blur", "rotation"):
        perturb(name, images, labels, _middle(name), rng)

    assert rng.bit_generator.state == state


def test_registry_names_units_and_bounds() -> None:
    assert list(PERTURBATIONS) == ["noise", "salt-pepper", "contrast", "blur", "rotation"]
    assert [spec.unit for spec in PERTURBATIONS.values()] == [
        "std",
        "fraction of pixels",
        "|log gamma|",
        "sigma (px)",
        "degrees",
    ]
    assert all(spec.name == name and spec.description for name, spec in PERTURBATIONS.items())
    assert RANDOM == ["noise", "salt-pepper"]


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_the_largest_strength_is_accepted(name: str, batch: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = batch

    out, _ = perturb(name, images, labels, PERTURBATIONS[name].max_strength, _rng())

    assert np.all(np.isfinite(out)) and out.min() >= 0.0


# ---------------------------------------------------------------- each perturbation's physics


def test_gaussian_noise_has_the_requested_std() -> None:
    images = np.full((4, 1, 64, 64), 0.5, dtype=np.float32)

    out = gaussian_noise(images, 0.05, _rng())

    residual = out.astype(np.float64) - 0.5
    assert residual.std() == pytest.approx(0.05, rel=0.03)
    assert abs(residual.mean()) < 0.002


def test_gaussian_noise_is_clipped_at_zero() -> None:
    images = np.zeros((2, 1, 32, 32), dtype=np.float32)

    out = gaussian_noise(images, 0.1, _rng())

    assert out.min() == 0.0
    assert np.mean(out == 0.0) == pytest.approx(0.5, abs=0.05)  # the negative half of the noise


@pytest.mark.parametrize("amount", [0.01, 0.1, 0.5, 1.0])
def test_salt_and_pepper_hits_the_requested_fraction_half_each(amount: float) -> None:
    # Distinct values in (0.1, 0.9) and one maximum of 1: any 0 or 1 elsewhere is a hit.
    images = _rng(5).uniform(0.1, 0.9, size=(3, 1, 20, 20)).astype(np.float32)
    images[:, 0, 0, 0] = 1.0

    out = salt_and_pepper(images, amount, _rng())

    hits = round(amount * 400)
    for image, noisy in zip(images[:, 0], out[:, 0], strict=True):
        changed = noisy != image
        assert np.sum(noisy == 0.0) == hits // 2  # the input has no zeros: every 0 is pepper
        # Salt on the maximum itself changes nothing; pepper on it removes one 1.
        assert np.sum(noisy == 1.0) - (hits - hits // 2) in (0, 1)
        assert changed.sum() in (hits - 1, hits)
        assert set(np.unique(noisy[changed]).tolist()) <= {0.0, 1.0}


def test_contrast_keeps_the_maximum_and_the_order_and_darkens_mid_tones(
    batch: tuple[np.ndarray, np.ndarray],
) -> None:
    images, _ = batch
    order = np.argsort(images.reshape(len(images), -1), axis=1, kind="stable")

    mild, strong = contrast(images, 0.3), contrast(images, 1.0)

    for out in (mild, strong):
        flat = out.reshape(len(out), -1)
        assert np.array_equal(flat.max(axis=1), images.reshape(len(images), -1).max(axis=1))
        assert np.all(np.diff(np.take_along_axis(flat, order, axis=1), axis=1) >= 0.0)  # monotone
        assert np.array_equal(out == 0.0, images == 0.0)
    assert np.all(mild <= images + 1e-7) and np.all(strong <= mild + 1e-7)
    grey = np.abs(images - GREY) < 0.05
    expected = images.max() * (GREY / images.max()) ** math.exp(1.0)
    assert np.mean(strong[grey]) == pytest.approx(expected, abs=0.03)


def _high_frequency_energy(images: np.ndarray) -> float:
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(images[:, 0]), axes=(1, 2))) ** 2
    size = images.shape[-1]
    rows, cols = np.mgrid[:size, :size] - size // 2
    return float(spectrum[:, np.hypot(rows, cols) > size / 4].sum())


def test_blur_removes_high_frequencies_monotonically_with_sigma() -> None:
    images = _rng(4).uniform(0.0, 1.0, size=(2, 1, 32, 32)).astype(np.float32)

    energies = [_high_frequency_energy(blur(images, sigma)) for sigma in (0.0, 0.5, 1.0, 2.0, 4.0)]

    assert all(a > b for a, b in zip(energies, energies[1:], strict=False))
    assert energies[-1] < 1e-3 * energies[0]


def test_blur_of_a_point_is_a_normalised_gaussian_of_that_sigma() -> None:
    images = np.zeros((1, 1, 41, 41), dtype=np.float32)
    images[0, 0, 20, 20] = 1.0

    out = blur(images, 2.0)[0, 0].astype(np.float64)

    assert out.sum() == pytest.approx(1.0, abs=1e-5)
    rows = np.arange(41) - 20
    assert np.sqrt(np.sum(out.sum(axis=1) * rows**2)) == pytest.approx(2.0, rel=0.01)


def test_rotation_by_90_degrees_is_rot90(batch: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = batch
    images = images + _rng(6).uniform(0.0, 0.1, size=images.shape).astype(np.float32)  # asymmetric pattern

    out, out_labels = rotate(images, labels, 90.0)

    np.testing.assert_allclose(out, np.rot90(images, axes=(2, 3)), atol=1e-5)
    assert np.array_equal(out_labels, np.rot90(labels, axes=(2, 3)))


def test_rotation_by_360_degrees_is_nearly_the_identity(batch: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = batch

    out, out_labels = rotate(images, labels, 360.0)

    np.testing.assert_allclose(out, images, atol=1e-4)
    assert np.array_equal(out_labels, labels)


def test_rotation_moves_image_and_labels_together_counter_clockwise() -> None:
    images = np.zeros((1, 1, 33, 33), dtype=np.float32)
    labels = np.zeros((1, 1, 33, 33), dtype=np.int64)
    images[0, 0, 15:18, 25:28] = 1.0  # a blob right of the centre (16, 16)
    labels[0, 0, 15:18, 25:28] = 4

    out, out_labels = rotate(images, labels, 30.0)

    rows, cols = np.mgrid[:33, :33]
    weights = out[0, 0]
    centroid = np.array([np.sum(rows * weights), np.sum(cols * weights)]) / weights.sum()
    label_centroid = np.argwhere(out_labels[0, 0] == 4).mean(axis=0)
    # Counter-clockwise as displayed: the blob moves up (smaller row) and stays right.
    angle = math.radians(30.0)
    expected = np.array([16 - 10 * math.sin(angle), 16 + 10 * math.cos(angle)])
    np.testing.assert_allclose(centroid, expected, atol=0.3)
    np.testing.assert_allclose(label_centroid, expected, atol=0.7)
    assert set(np.unique(out_labels)) <= {0, 4}


@pytest.mark.parametrize("degrees", [13.0, 45.0, 137.5, 271.0])
def test_rotated_labels_stay_in_the_label_set(degrees: float, batch: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = batch

    _, out_labels = rotate(images, labels, degrees)

    assert set(np.unique(out_labels)) <= set(np.unique(labels))
    assert np.array_equal(np.unique(out_labels), np.unique(labels))  # every class survives


def test_rotate_without_labels() -> None:
    images, _ = _brain()

    out, none = rotate(images[None], None, 45.0)

    assert none is None and out.shape == (1, 1, SIZE, SIZE)


# ---------------------------------------------------------------- OOD sets


def test_near_and_far_sets_partition_the_registry() -> None:
    assert NEAR_SETS == ("noise", "blur")
    assert FAR_SETS == ("strong-noise", "strong-blur", "motion", "inverted", "ct-like", "shapes", "phantom")
    assert {OOD_SETS[name].kind for name in NEAR_SETS} == {"near"}
    assert {OOD_SETS[name].kind for name in FAR_SETS} == {"far"}
    assert [name for name, spec in OOD_SETS.items() if not spec.has_labels] == ["shapes", "phantom"]
    assert all(spec.name == name and spec.description for name, spec in OOD_SETS.items())


@pytest.mark.parametrize("name", list(OOD_SETS))
def test_each_ood_set_differs_from_the_input_and_keeps_its_shape(
    name: str, batch: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = batch
    before = images.copy()

    out = make_ood_set(name, images, _rng())

    assert out.shape == images.shape and out.dtype == np.float32
    assert np.all(np.isfinite(out)) and out.min() >= 0.0
    assert np.all(np.abs(out - images).reshape(len(images), -1).max(axis=1) > 0.05)  # every image changed
    assert np.array_equal(images, before)


@pytest.mark.parametrize("name", list(OOD_SETS))
def test_ood_sets_are_reproducible_from_the_generator(
    name: str, batch: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = batch

    first, again = make_ood_set(name, images, _rng(1)), make_ood_set(name, images, _rng(1))

    assert first.tobytes() == again.tobytes()
    if name in ("noise", "strong-noise", "motion", "shapes", "phantom"):
        assert first.tobytes() != make_ood_set(name, images, _rng(2)).tobytes()


def test_near_sets_are_the_mild_perturbations_and_far_ones_are_stronger(
    batch: tuple[np.ndarray, np.ndarray],
) -> None:
    images, _ = batch

    assert np.array_equal(make_ood_set("noise", images, _rng(3)), gaussian_noise(images, 0.05, _rng(3)))
    assert np.array_equal(make_ood_set("blur", images, _rng()), blur(images, 1.0))
    for near, far in (("noise", "strong-noise"), ("blur", "strong-blur")):
        near_change = np.abs(make_ood_set(near, images, _rng()) - images).mean()
        assert np.abs(make_ood_set(far, images, _rng()) - images).mean() > 2 * near_change


def test_inverted_makes_csf_bright_and_white_matter_dark(batch: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = batch

    out = make_ood_set("inverted", images, _rng())

    assert images[labels == 1].mean() < images[labels == 3].mean()
    assert out[labels == 1].mean() > out[labels == 2].mean() > out[labels == 3].mean()
    assert np.all(out[labels == 0] == 0.0)
    level = np.percentile(images[0], 99.5)
    np.testing.assert_allclose(out[0][labels[0] == 1], np.clip(level - images[0][labels[0] == 1], 0, None))


def test_ct_like_squeezes_tissue_contrast_and_adds_a_skull_ring(batch: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = batch

    out = make_ood_set("ct-like", images, _rng())

    head = labels > 0
    grey, white, csf = (out[labels == c].mean() for c in (2, 3, 1))
    assert white - grey < 0.3 * (images[labels == 3].mean() - images[labels == 2].mean())
    assert csf < grey - 0.1  # CSF stays dark
    # The ring: every background pixel within 1-2 px of the head is the skull level, farther is 0.
    rows, cols = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2.0
    distance = np.hypot(rows, cols) - 0.38 * SIZE
    for image, flat_out, mask in zip(images[:, 0], out[:, 0], head[:, 0], strict=True):
        level = np.percentile(image, 99.5)
        near = ~mask & (distance < 1.0)
        assert near.sum() > 20 and np.allclose(flat_out[near], level)
        assert np.all(flat_out[distance > 3.5] == 0.0)
        assert flat_out[near].min() > flat_out[mask].max()  # the skull is the brightest


def test_motion_puts_ghosts_into_the_background_and_keeps_the_scale(
    batch: tuple[np.ndarray, np.ndarray],
) -> None:
    images, labels = batch

    out = make_ood_set("motion", images, _rng())

    background = labels == 0
    assert np.all(images[background] == 0.0)
    for image, ghosted, empty in zip(images, out, background, strict=True):
        assert ghosted[empty].mean() > 0.03
        assert np.percentile(ghosted, 99.5) == pytest.approx(np.percentile(image, 99.5), rel=1e-4)


@pytest.mark.parametrize("name", ["shapes", "phantom"])
def test_unlabelled_sets_depend_only_on_the_shape_of_the_input(
    name: str, batch: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = batch
    other = _rng(9).uniform(0.0, 1.0, size=images.shape).astype(np.float32)

    out = make_ood_set(name, images, _rng(5))

    assert np.array_equal(out, make_ood_set(name, other, _rng(5)))
    assert np.array_equal(out, make_ood_set(name, np.zeros_like(images), _rng(5)))
    assert not np.array_equal(out[0], out[1])  # each image is drawn anew


def test_shapes_are_piecewise_constant_blobs_in_the_intensity_range() -> None:
    out = make_ood_set("shapes", np.zeros((20, 1, 32, 32), dtype=np.float32), _rng())

    assert np.median(out[out > 0.15]) > 0.2
    assert out.max() < 1.0 + 5 * 0.02
    foreground = (out > 0.15).reshape(20, -1).mean(axis=1)
    assert np.all(foreground > 0.02) and np.all(foreground < 0.95)


def test_shepp_logan_golden_values() -> None:
    phantom = shepp_logan(201, 201)

    centre = 100
    assert phantom[centre, centre] == pytest.approx(0.2)  # brain: 1 - 0.8, between the two small disks
    assert phantom[centre, centre + 22] == pytest.approx(0.0)  # right ventricle (x = 0.22): 0.2 - 0.2
    assert phantom[centre - 90, centre] == pytest.approx(1.0)  # skull at y = 0.9 (top)
    assert phantom[centre - 35, centre] == pytest.approx(0.3)  # the ellipse at y = 0.35: 0.2 + 0.1
    assert phantom[0, 0] == 0.0


def test_phantom_set_is_a_jittered_rotated_shepp_logan(batch: tuple[np.ndarray, np.ndarray]) -> None:
    images, _ = batch

    out = make_ood_set("phantom", images, _rng())

    reference = shepp_logan(SIZE, SIZE)
    for image in out[:, 0]:
        assert not np.array_equal(image, reference)
        head = image[image > 0.05]
        assert np.mean(np.abs(head - 0.2) < 0.03) > 0.4  # mostly "brain" at 1 - 0.8, times the gain
        assert np.mean(image > 0.6) < 0.25  # a thin bright skull
        assert image.max() == pytest.approx(1.0, abs=0.15)
        assert np.all(image[:, 0] == 0.0)  # scale <= 1: the phantom stays inside the frame


# ---------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda x, y: gaussian_noise(x, -0.1, _rng()),
            "The 'std' parameter of gaussian_noise must be a float in [0, 1]. Got -0.1 instead.",
        ),
        (
            lambda x, y: gaussian_noise(x, float("nan"), _rng()),
            "The 'std' parameter of gaussian_noise must be a float in [0, 1]. Got nan instead.",
        ),
        (
            lambda x, y: salt_and_pepper(x, 1.5, _rng()),
            "The 'amount' parameter of salt_and_pepper must be a float in [0, 1]. Got 1.5 instead.",
        ),
        (
            lambda x, y: contrast(x, float("inf")),
            "The 'strength' parameter of contrast must be a float in [0, 3]. Got inf instead.",
        ),
        (
            lambda x, y: blur(x, True),
            "The 'sigma' parameter of blur must be a float in [0, 10]. Got True instead.",
        ),
        (
            lambda x, y: rotate(x, y, "90"),  # type: ignore[call-overload]
            "The 'degrees' parameter of rotate must be a float in [0, 360]. Got '90' instead.",
        ),
        (
            lambda x, y: perturb("noise", x, y, -1, _rng()),
            "The 'strength' parameter of perturb('noise') must be a float in [0, 1]. Got -1 instead.",
        ),
        (
            lambda x, y: perturb("rotation", x, y, 400, _rng()),
            "The 'strength' parameter of perturb('rotation') must be a float in [0, 360]. Got 400 instead.",
        ),
        (
            lambda x, y: perturb("nois", x, y, 0.1, _rng()),
            "The 'name' parameter of perturb must be one of 'noise', 'salt-pepper', 'contrast', 'blur', "
            "'rotation'. Got 'nois' instead. Did you mean 'noise'?",
        ),
        (
            lambda x, y: perturb("Rotation", x, y, 10, _rng()),
            "The 'name' parameter of perturb must be one of 'noise', 'salt-pepper', 'contrast', 'blur', "
            "'rotation'. Got 'Rotation' instead. Did you mean 'rotation'?",
        ),
        (
            lambda x, y: make_ood_set("ct_like", x, _rng()),
            "The 'name' parameter of make_ood_set must be one of 'noise', 'blur', 'strong-noise', "
            "'strong-blur', 'motion', 'inverted', 'ct-like', 'shapes', 'phantom'. Got 'ct_like' instead. "
            "Did you mean 'ct-like'?",
        ),
        (
            lambda x, y: make_ood_set("inverted", x[:, 0], _rng()),
            "The 'images' parameter of make_ood_set must be of shape (N, 1, H, W) with N >= 1 and H, W >= 2. "
            "Got shape (3, 32, 32) instead.",
        ),
        (
            lambda x, y: gaussian_noise(x.tolist(), 0.1, _rng()),
            "The 'images' parameter of gaussian_noise must be a numeric numpy array of shape (N, 1, H, W). "
            "Got type list instead.",
        ),
        (
            lambda x, y: blur(np.where(x > 0.5, np.nan, x), 1.0),
            "The 'images' parameter of blur must be finite. Got NaN or inf values instead.",
        ),
        (
            lambda x, y: contrast(x - 0.5, 1.0),
            "The 'images' parameter of contrast must be non-negative (magnitude images: corrupt them before "
            "any z-score). Got a minimum of -0.5 instead.",
        ),
        (
            lambda x, y: rotate(x, y[:, :, :16], 10.0),
            "The 'labels' parameter of rotate must be of the images' shape (3, 1, 32, 32). "
            "Got shape (3, 1, 16, 32) instead.",
        ),
        (
            lambda x, y: perturb("rotation", x, y.astype(np.float32), 10.0, _rng()),
            "The 'labels' parameter of perturb('rotation') must be an integer numpy array or None. "
            "Got an array of dtype float32 instead.",
        ),
        (
            lambda x, y: shepp_logan(32, 32, scale=0.0),
            "The 'scale' parameter of shepp_logan must be a float in (0, 10]. Got 0.0 instead.",
        ),
        (
            lambda x, y: gaussian_noise(x, 0.1, 0),  # type: ignore[arg-type]
            "The 'rng' parameter of gaussian_noise must be a numpy.random.Generator. Got type int instead.",
        ),
        (
            lambda x, y: make_ood_set("motion", x, np.random.RandomState(0)),  # type: ignore[arg-type]
            "The 'rng' parameter of make_ood_set must be a numpy.random.Generator. Got type RandomState instead.",
        ),
    ],
)
def test_hostile_input_gets_one_clear_sentence(
    call: Callable[[np.ndarray, np.ndarray], object], message: str, batch: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = batch

    with pytest.raises(InvalidParameterError, match=re.escape(message) + "$"):
        call(images, labels)
