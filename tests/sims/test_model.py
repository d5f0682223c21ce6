"""The U-Net factory: shapes, determinism, the norm choice, and which norms Opacus accepts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from opacus.validators import ModuleValidator

from privacy.dpsgd import train_dp_round
from sims.evaluation import evaluate_segmentation
from sims.model import NORMS, group_count, make_model
from sims.training import make_loss


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


def test_default_norm_is_the_model_of_every_earlier_run_bit_for_bit() -> None:
    # Prepare: the model exactly as make_model built it before it had a norm argument.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        old = UNet(spatial_dims=2, in_channels=1, out_channels=5, channels=(8, 16, 32), strides=(2, 2),
                   num_res_units=0, norm="instance", act=("relu", {"inplace": False}))

    # Execute
    implicit, explicit = make_model(5, (8, 16, 32), seed=3), make_model(5, (8, 16, 32), seed=3, norm="instance")

    # Assert: same keys, same bytes, same outputs.
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    for model in (implicit, explicit):
        assert list(model.state_dict()) == list(old.state_dict())
        for key, value in old.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key
        assert torch.equal(model(x), old(x))


@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_builds_runs_and_shares_the_seeded_conv_weights(norm: str) -> None:
    reference = dict(make_model(4, (8, 16), seed=2).named_parameters())

    model = make_model(4, (8, 16), seed=2, norm=norm)
    out = model(torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0)))

    assert out.shape == (3, 4, 32, 32) and torch.isfinite(out).all()
    # Norm layers initialise without randomness, so the conv weights do not depend on the norm.
    for name, param in reference.items():
        assert torch.equal(dict(model.named_parameters())[name], param), name
    kinds = {type(m) for m in model.modules() if "Norm" in type(m).__name__}
    expected = {"instance": torch.nn.InstanceNorm2d, "instance-affine": torch.nn.InstanceNorm2d,
                "group": torch.nn.GroupNorm, "batch": torch.nn.BatchNorm2d}[norm]
    assert kinds == {expected}
    learnt = [m for m in model.modules() if isinstance(m, expected) and m.weight is not None]
    assert len(learnt) == (0 if norm == "instance" else 2)  # two norm layers at (8, 16); the output conv has none


def test_group_norm_uses_the_largest_count_up_to_8_that_divides_every_level() -> None:
    assert group_count((16, 32, 64, 128)) == 8
    assert group_count((4, 8)) == 4
    assert group_count((6, 12, 24)) == 6
    assert group_count((5, 7)) == 1

    model = make_model(3, (12, 24, 48), norm="group")

    assert {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)} == {6}


def test_an_unknown_norm_is_refused_with_one_sentence_naming_the_choices() -> None:
    with pytest.raises(ValueError) as err:
        make_model(3, norm="layer")

    assert str(err.value) == ("The 'norm' parameter of make_model must be one of 'instance', 'instance-affine', "
                              "'group', 'batch'. Got 'layer' instead.")


def _clipped_mean_of_per_patient_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                                       c: float) -> list[torch.Tensor]:
    """The oracle: each patient's gradient on its own, clipped to norm ``c``, then averaged."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        grads = torch.autograd.grad(make_loss()(model(x[i : i + 1]), y[i : i + 1]), params)
        factor = min(1.0, c / (float(torch.sqrt(sum((g**2).sum() for g in grads))) + 1e-6))
        for t, g in zip(total, grads, strict=True):
            t += factor * g
    return [t / len(x) for t in total]


@pytest.mark.parametrize("norm", ["instance-affine", "group"])
def test_opacus_trains_affine_norms_with_exact_per_patient_gradients(norm: str) -> None:
    # Prepare: Opacus must have a correct per-sample rule for the norm's weights too, so
    # compare one noiseless DP-SGD step (q = 1, lr 0) with per-patient autograd.
    model, reference = make_model(3, (4, 8), seed=1, norm=norm), make_model(3, (4, 8), seed=1, norm=norm)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 1, 16, 16, generator=g), torch.randint(0, 3, (4, 1, 16, 16), generator=g)
    x[0] *= 40.0  # an outlier whose gradient gets clipped
    expected = _clipped_mean_of_per_patient_grads(reference, x, y, c=0.1)

    # Execute
    result = train_dp_round(
        model, x, y, loss_fn=make_loss(), steps=1, sample_rate=1.0, noise_multiplier=0.0,
        max_grad_norm=0.1, lr=0.0, generator=torch.Generator().manual_seed(0),
    )

    # Assert
    assert ModuleValidator.validate(model, strict=False) == []
    assert result.steps == 1
    norm_weights = [n for n, _ in model.named_parameters() if ".adn.N." in n]
    assert norm_weights  # the norm's own weights are among those checked
    for (name, param), want in zip(model.named_parameters(), expected, strict=True):
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, want, rtol=1e-3, atol=1e-6, msg=name)


def test_opacus_refuses_batch_norm_for_dp_sgd() -> None:
    # BatchNorm mixes the patients of a batch: a per-patient guarantee would not hold. If
    # this ever trains, DP runs with norm="batch" would silently lose their meaning.
    model = make_model(3, (4, 8), seed=1, norm="batch")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 1, 16, 16, generator=g), torch.randint(0, 3, (4, 1, 16, 16), generator=g)

    errors = ModuleValidator.validate(model, strict=False)
    with pytest.raises(NotImplementedError, match="BatchNorm2d"):
        train_dp_round(
            model, x, y, loss_fn=make_loss(), steps=1, sample_rate=1.0, noise_multiplier=1.0,
            max_grad_norm=1.0, lr=1e-2, generator=torch.Generator().manual_seed(0),
        )

    assert len(errors) == 2 and all("BatchNorm cannot support training with differential privacy" in str(e)
                                    for e in errors)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


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
