"""Federated adversarial training: the batch transform, and its composition with DP-SGD."""

from __future__ import annotations

import pytest
import torch

from common.validation import InvalidParameterError
from privacy.dpsgd import train_dp_round
from scenarios.adversarial import make_adversary
from sims.model import make_model
from sims.training import make_loss, train_one_round


def _batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g), torch.randint(0, 3, (n, 1, 16, 16), generator=g)


def test_ratio_zero_is_no_adversary_and_bad_values_are_refused() -> None:
    assert make_adversary(ratio=0.0, eps=4 / 255, steps=3) is None
    for kwargs, name in (
        ({"ratio": 1.5, "eps": 0.01, "steps": 3}, "ratio"),
        ({"ratio": -0.1, "eps": 0.01, "steps": 3}, "ratio"),
        ({"ratio": 0.5, "eps": -0.01, "steps": 3}, "eps"),
        ({"ratio": 0.5, "eps": 0.01, "steps": 0}, "steps"),
    ):
        with pytest.raises(InvalidParameterError, match=f"'{name}' parameter of make_adversary"):
            make_adversary(**kwargs)  # type: ignore[arg-type]


def test_replaces_round_ratio_b_images_inside_the_ball_and_raises_their_loss() -> None:
    x, y = _batch(8)
    model = make_model(3, (4, 8), seed=1)
    eps = 8 / 255
    adversary = make_adversary(ratio=0.5, eps=eps, steps=5)
    assert adversary is not None

    out = adversary(model, x, y, torch.Generator().manual_seed(3))

    changed = [i for i in range(8) if not torch.equal(out[i], x[i])]
    assert len(changed) == 4  # round(0.5 * 8), the others untouched, bit for bit
    assert (out - x).abs().max() <= eps + 1e-6 and out.min() >= 0
    assert model.training  # the attack's eval mode was undone
    loss = make_loss()
    model.eval()
    with torch.no_grad():
        for i in changed:
            assert loss(model(out[i : i + 1]), y[i : i + 1]) > loss(model(x[i : i + 1]), y[i : i + 1])


def test_each_adversarial_image_depends_on_its_own_patient_only() -> None:
    # The privacy argument: replacing patient i's image by x_adv(i) keeps the patient the unit only
    # if x_adv(i) is a function of patient i's record (and the model), not of the batch-mates.
    x, y = _batch(6)
    other_x, other_y = _batch(6, seed=9)
    model = make_model(3, (4, 8), seed=1)
    adversary = make_adversary(ratio=0.5, eps=4 / 255, steps=3)
    assert adversary is not None
    a = adversary(model, x, y, torch.Generator().manual_seed(5))
    # Same patients at the chosen positions? Find them, then change every other patient.
    chosen = [i for i in range(6) if not torch.equal(a[i], x[i])]
    mixed_x, mixed_y = other_x.clone(), other_y.clone()
    mixed_x[chosen], mixed_y[chosen] = x[chosen], y[chosen]

    b = adversary(model, mixed_x, mixed_y, torch.Generator().manual_seed(5))

    for i in chosen:
        torch.testing.assert_close(a[i], b[i], rtol=0, atol=1e-6)


def test_dp_sgd_clips_each_patients_adversarial_gradient() -> None:
    """Under DP-SGD the update is the mean of per-patient clipped gradients of the *adversarial*
    batch (the oracle), so the adversarial loss is covered by the clipping and the accounting."""
    x, y = _batch(5)
    x[0] *= 40.0  # an outlier patient with a huge gradient
    model = make_model(3, (4, 8), seed=1)
    reference = make_model(3, (4, 8), seed=1)
    adversary = make_adversary(ratio=0.6, eps=8 / 255, steps=2)
    assert adversary is not None
    # The oracle replays the round's generator: the Poisson mask draw, then the adversary's.
    g = torch.Generator().manual_seed(0)
    torch.rand(5, generator=g)
    x_adv = adversary(reference, x, y, g)
    assert not torch.equal(x_adv, x)
    loss_fn = make_loss()
    params = [p for p in reference.parameters() if p.requires_grad]
    expected = [torch.zeros_like(p) for p in params]
    for i in range(5):
        grads = torch.autograd.grad(loss_fn(reference(x_adv[i : i + 1]), y[i : i + 1]), params)
        norm = torch.sqrt(sum((gr**2).sum() for gr in grads))
        for t, gr in zip(expected, grads, strict=True):
            t += min(1.0, 0.1 / (float(norm) + 1e-6)) * gr / 5

    result = train_dp_round(
        model,
        x,
        y,
        loss_fn=make_loss(),
        steps=1,
        sample_rate=1.0,
        noise_multiplier=0.0,
        max_grad_norm=0.1,
        lr=0.0,
        generator=torch.Generator().manual_seed(0),
        adversary=adversary,
    )

    assert result.steps == 1
    got = [p.grad for p in model.parameters() if p.requires_grad]
    for gr, e in zip(got, expected, strict=True):
        torch.testing.assert_close(gr, e, rtol=1e-3, atol=1e-6)
    # Nothing of Opacus is left behind: a plain backward works and no per-sample state remains.
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    make_loss()(model(x), y).backward()


def test_non_private_training_uses_the_adversary() -> None:
    x, y = _batch(8)
    runs = []
    for adversary in (None, make_adversary(ratio=0.5, eps=8 / 255, steps=2)):
        model = make_model(3, (4, 8), seed=1)
        train_one_round(
            model,
            x.numpy(),
            y.numpy(),
            epochs=1,
            lr=1e-2,
            batch_size=4,
            generator=torch.Generator().manual_seed(0),
            augment=False,
            adversary=adversary,
        )
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(runs[0], runs[1])
