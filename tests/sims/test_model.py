"""The U-Net factory: shapes, determinism, and that Opacus accepts the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator

from sims.evaluation import evaluate_segmentation
from sims.model import make_model


@pytest.mark.parametrize(("size", "channels"), [(32, (8, 16)), (64, (16, 32, 64, 128)), (96, (16, 32, 64, 128))])
def test_logits_have_one_channel_per_class_and_input_size(size: int, channels: tuple[int, ...]) -> None:
    model = make_model(5, channels)

    out = model(torch.zeros(2, 1, size, size))

    assert out.shape == (2, 5, size, size)


def test_same_seed_same_weights_without_touching_global_rng() -> None:
    before = torch.random.get_rng_state()

    a, b, c = make_model(4, seed=1), make_model(4, seed=1), make_model(4, seed=2)

    assert torch.equal(torch.random.get_rng_state(), before)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values(), strict=True))


def test_opacus_can_train_it() -> None:
    # No BatchNorm, no in-place activations: the model must pass Opacus' validator as is.
    assert ModuleValidator.validate(make_model(5), strict=False) == []


def test_dice_is_one_for_a_perfect_prediction_and_bounded() -> None:
    labels = np.zeros((3, 1, 16, 16), dtype=np.int64)
    labels[:, :, 4:12, 4:12] = 1
    labels[:, :, 6:10, 6:10] = 2

    class Oracle(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.from_numpy(labels)[:, 0], 3).permute(0, 3, 1, 2).float()

    class Constant(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(x.shape[0], 3, *x.shape[2:])
            out[:, 1] = 1.0
            return out

    images = np.zeros((3, 1, 16, 16), dtype=np.float32)
    perfect = evaluate_segmentation(Oracle(), images, labels, ("background", "a", "b"))
    constant = evaluate_segmentation(Constant(), images, labels, ("background", "a", "b"))

    assert perfect == {"dice_a": 1.0, "dice_b": 1.0, "dice_mean": 1.0}
    # Predicting class a everywhere: a = 2*48/(256+48) per patient, b is missed entirely.
    assert constant["dice_a"] == pytest.approx(2 * 48 / (256 + 48), rel=1e-6)
    assert constant["dice_b"] == 0.0
    assert constant["dice_mean"] == pytest.approx(constant["dice_a"] / 2, rel=1e-6)
