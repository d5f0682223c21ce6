"""FGSM and PGD on the segmentation loss: they raise it, stay in the ball, and leave the model alone."""

from __future__ import annotations

import pytest
import torch

from common.validation import InvalidParameterError
from scenarios.attacks import fgsm, pgd
from sims.model import make_model
from sims.training import make_loss

_EPS = 8 / 255


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_model(5, (8, 16), seed=0)


def _batch(n: int = 3, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, size, size, generator=g) * 1.2  # non-negative, a little above 1 like the scanners
    labels = torch.randint(0, 5, (n, 1, size, size), generator=g)
    return images, labels


def _loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(make_loss()(model(images), labels))


def _pgd(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, **kwargs: object) -> torch.Tensor:
    args: dict[str, object] = {"eps": _EPS, "steps": 5, "step_size": 2.5 * _EPS / 5, "norm": "linf",
                               "generator": torch.Generator().manual_seed(1)}
    args.update(kwargs)
    return pgd(model, images, labels, **args)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the attack works


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attacks_raise_the_loss(model: torch.nn.Module, norm: str) -> None:
    images, labels = _batch()
    eps = _EPS if norm == "linf" else 1.0  # an L2 ball of radius 1 over 1024 pixels: ~0.03 per pixel

    clean = _loss(model, images, labels)
    after_fgsm = _loss(model, fgsm(model, images, labels, eps=_EPS), labels)
    after_pgd = _loss(model, _pgd(model, images, labels, eps=eps, step_size=2.5 * eps / 5, norm=norm), labels)

    assert after_fgsm > clean
    assert after_pgd > clean
    if norm == "linf":
        assert after_pgd >= after_fgsm  # more steps in the same ball find at least as much


def test_a_bigger_budget_raises_the_loss_more(model: torch.nn.Module) -> None:
    images, labels = _batch()

    losses = [_loss(model, _pgd(model, images, labels, eps=e, step_size=2.5 * e / 5), labels)
              for e in (2 / 255, 8 / 255, 32 / 255)]

    assert losses[0] < losses[1] < losses[2]


# ---------------------------------------------------------------- the budget holds


@pytest.mark.parametrize("random_start", [True, False])
def test_linf_stays_in_the_ball_and_the_clip(model: torch.nn.Module, random_start: bool) -> None:
    images, labels = _batch()
    images[0, 0, :4] = 0.0  # pixels at the clip's floor: the attack must not push them below

    adv_pgd = _pgd(model, images, labels, step_size=_EPS, steps=4, random_start=random_start)
    adv_fgsm = fgsm(model, images, labels, eps=_EPS)

    for adv in (adv_pgd, adv_fgsm):
        assert float((adv - images).abs().max()) <= _EPS + 1e-6
        assert float(adv.min()) >= 0.0
        assert adv.shape == images.shape and adv.dtype == images.dtype
        assert not adv.requires_grad
    assert float((adv_fgsm - images).abs().max()) == pytest.approx(_EPS, abs=1e-6)  # FGSM uses its full budget


@pytest.mark.parametrize("random_start", [True, False])
def test_l2_stays_in_the_per_image_ball(model: torch.nn.Module, random_start: bool) -> None:
    images, labels = _batch(n=4)
    eps = 0.5

    adv = _pgd(model, images, labels, eps=eps, step_size=eps, steps=4, norm="l2", random_start=random_start)

    norms = (adv - images).flatten(1).norm(dim=1)
    assert torch.all(norms <= eps + 1e-5)
    assert torch.all(norms > 0.5 * eps)  # step_size = eps: every image moves well into its ball
    assert float(adv.min()) >= 0.0


def test_l2_projection_only_shrinks(model: torch.nn.Module) -> None:
    images, labels = _batch()
    images = images + 0.5  # far from the clip's floor, so clipping cannot shorten the step
    eps, step = 1.0, 0.05

    adv = _pgd(model, images, labels, eps=eps, step_size=step, steps=1, norm="l2", random_start=False)

    norms = (adv - images).flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, step), atol=1e-5)  # one normalised step, not pushed to eps


def test_an_upper_clip_bounds_the_images(model: torch.nn.Module) -> None:
    images, labels = _batch()
    images = images.clamp(max=1.0)

    adv = _pgd(model, images, labels, eps=0.2, step_size=0.1, clip=(0.0, 1.0))

    assert 0.0 <= float(adv.min()) and float(adv.max()) <= 1.0


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eps_zero_gives_back_the_input_exactly(model: torch.nn.Module, norm: str) -> None:
    images, labels = _batch()

    adv_pgd = _pgd(model, images, labels, eps=0.0, norm=norm)
    adv_fgsm = fgsm(model, images, labels, eps=0.0)

    assert torch.equal(adv_pgd, images)
    assert torch.equal(adv_fgsm, images)
    assert adv_pgd.data_ptr() != images.data_ptr()  # a copy: changing it leaves the caller's images alone


# ---------------------------------------------------------------- randomness and side effects


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_same_generator_same_images(model: torch.nn.Module, norm: str) -> None:
    images, labels = _batch()
    eps = _EPS if norm == "linf" else 0.5

    def run(seed: int) -> torch.Tensor:
        return _pgd(model, images, labels, eps=eps, step_size=eps / 4, steps=2, norm=norm,
                    generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))  # the start really is random


def test_no_random_start_needs_no_generator(model: torch.nn.Module) -> None:
    images, labels = _batch()

    first = pgd(model, images, labels, eps=_EPS, steps=2, step_size=_EPS / 2, random_start=False)
    second = pgd(model, images, labels, eps=_EPS, steps=2, step_size=_EPS / 2, random_start=False)

    assert torch.equal(first, second)


@pytest.mark.parametrize("training", [True, False])
def test_the_model_is_left_as_it_was(training: bool) -> None:
    model = make_model(5, (8, 16), seed=0, norm="batch")  # BatchNorm: eval mode matters (running stats)
    model.train(training)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    images, labels = _batch()
    seen_modes: list[bool] = []
    handle = model.register_forward_pre_hook(lambda module, args: seen_modes.append(module.training))

    with torch.no_grad():  # as an evaluation loop would call it
        pgd(model, images, labels, eps=_EPS, steps=2, step_size=_EPS, generator=torch.Generator().manual_seed(0))
        fgsm(model, images, labels, eps=_EPS)
    handle.remove()

    assert seen_modes == [False, False, False]  # attacked in eval mode
    assert model.training is training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and running statistics
    assert all(p.grad is None for p in model.parameters())


def test_a_custom_loss_is_the_one_maximised(model: torch.nn.Module) -> None:
    images, labels = _batch()

    def background_logit(logits: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
        return logits[:, 0].mean()

    adv = fgsm(model, images, labels, eps=_EPS, loss_fn=background_logit)

    model.eval()
    with torch.no_grad():
        assert float(model(adv)[:, 0].mean()) > float(model(images)[:, 0].mean())


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eps": -1}, "The 'eps' parameter of pgd must be a float in [0, inf). Got -1 instead."),
        ({"eps": float("nan")}, "The 'eps' parameter of pgd must be a float in [0, inf). Got nan instead."),
        ({"steps": 0}, "The 'steps' parameter of pgd must be an int in [1, inf). Got 0 instead."),
        ({"steps": 2.0}, "The 'steps' parameter of pgd must be an int in [1, inf). Got 2.0 instead."),
        ({"step_size": 0.0}, "The 'step_size' parameter of pgd must be a float in (0, inf). Got 0.0 instead."),
        ({"norm": "L2"}, "The 'norm' parameter of pgd must be one of 'linf', 'l2'. Got 'L2' instead. "
                         "Did you mean 'l2'?"),
        ({"norm": "lin"}, "Did you mean 'linf'?"),
        ({"generator": None}, "The 'generator' parameter of pgd must be a torch.Generator when random_start is "
                              "True. Got None instead."),
        ({"generator": 0}, "The 'generator' parameter of pgd must be a torch.Generator or None. Got 0 instead."),
        ({"random_start": 1}, "The 'random_start' parameter of pgd must be a bool. Got 1 instead."),
        ({"clip": (1.0, 0.0)}, "The 'clip' parameter of pgd must be a pair (low, high) of floats or None with "
                               "low <= high. Got (1.0, 0.0) instead."),
        ({"clip": 0.0}, "The 'clip' parameter of pgd must be a pair"),
    ],
)
def test_bad_pgd_arguments_raise_one_sentence(model: torch.nn.Module, kwargs: dict[str, object], message: str) -> None:
    images, labels = _batch(n=1)

    with pytest.raises(InvalidParameterError) as error:
        _pgd(model, images, labels, **kwargs)

    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_images_and_labels_raise_one_sentence(model: torch.nn.Module) -> None:
    images, labels = _batch(n=2)

    cases = [
        ((images[:, 0], labels), "The 'images' parameter of fgsm must be a float tensor of shape (B, 1, H, W). "
                                 "Got (2, 32, 32) instead."),
        ((images.numpy(), labels), "Got 'ndarray' instead."),
        ((images, labels.float()), "The 'labels' parameter of fgsm must be an integer tensor. "
                                   "Got 'torch.float32' instead."),
        ((images, labels[:1]), "The 'labels' parameter of fgsm must be of shape (2, 1, 32, 32) to match images "
                               "of shape (2, 1, 32, 32). Got (1, 1, 32, 32) instead."),
        ((images - 0.5, labels), "The 'images' parameter of fgsm must be inside clip [0, inf]."),
    ]
    for (x, y), message in cases:
        with pytest.raises(InvalidParameterError) as error:
            fgsm(model, x, y, eps=_EPS)  # type: ignore[arg-type]
        assert message in str(error.value)
    with pytest.raises(InvalidParameterError, match=r"The 'eps' parameter of fgsm must be a float in \[0, inf\)"):
        fgsm(model, images, labels, eps=-0.1)
