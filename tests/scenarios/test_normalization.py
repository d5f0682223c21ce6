"""FedBN's local entries, their split and merge, AdaBN's re-estimated statistics and TENT's step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scenarios.normalization import (
    adapt_batch_norm,
    entropy_minimization,
    local_state_names,
    merge_local,
    split_local,
)
from sims.model import NORMS, make_model

_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n, 1, size, size)) * 3.0 + 0.5).astype(np.float32)  # not the init's mean 0, var 1


# ---------------------------------------------------------------- local_state_names


@pytest.mark.parametrize("norm", NORMS)
def test_local_names_are_exactly_the_norm_layers_state(norm: str) -> None:
    model = make_model(3, (8, 16, 32), norm=norm)
    norm_types = (torch.nn.InstanceNorm2d, torch.nn.GroupNorm, torch.nn.BatchNorm2d)

    names = local_state_names(model)

    expected = [key for key in model.state_dict()
                if isinstance(model.get_submodule(key.rsplit(".", 1)[0]), norm_types)]
    assert names == expected
    assert not any(isinstance(model.get_submodule(n.rsplit(".", 1)[0]), torch.nn.modules.conv._ConvNd) for n in names)
    if norm == "instance":
        assert names == []  # nothing to keep local: FedBN is FedAvg
    else:
        layers = 4  # 3 down + 1 up block with a norm at (8, 16, 32); the output conv has none
        suffixes = ("weight", "bias", *_STATS) if norm == "batch" else ("weight", "bias")
        assert len(names) == layers * len(suffixes)
        assert {n.rsplit(".", 1)[1] for n in names} == set(suffixes)


def test_local_names_follow_module_types_not_their_names() -> None:
    model = torch.nn.Sequential()
    model.add_module("norm", torch.nn.Conv2d(1, 2, 3))  # named like a norm, is a conv
    model.add_module("conv", torch.nn.BatchNorm2d(2))  # named like a conv, is a norm
    model.add_module("block", torch.nn.Sequential(torch.nn.GroupNorm(1, 2), torch.nn.InstanceNorm2d(2, affine=True),
                                                  torch.nn.InstanceNorm2d(2), torch.nn.LayerNorm(5)))

    names = local_state_names(model)

    assert names == ["conv.weight", "conv.bias", "conv.running_mean", "conv.running_var", "conv.num_batches_tracked",
                     "block.0.weight", "block.0.bias", "block.1.weight", "block.1.bias",
                     "block.3.weight", "block.3.bias"]


# ---------------------------------------------------------------- split / merge


@pytest.mark.parametrize("as_numpy", [False, True])
def test_split_then_merge_gives_back_every_entry_bitwise(as_numpy: bool) -> None:
    # Prepare: a hospital's state and the server's global state differ everywhere.
    mine, server = make_model(3, (8, 16), seed=1, norm="batch"), make_model(3, (8, 16), seed=2, norm="batch")
    adapt_batch_norm(mine, _images(4))  # non-trivial running statistics
    names = local_state_names(mine)

    def state(model: torch.nn.Module) -> dict:
        sd = model.state_dict()
        return {k: v.numpy().copy() for k, v in sd.items()} if as_numpy else sd

    equal = np.array_equal if as_numpy else torch.equal

    # Execute
    shared, local = split_local(state(mine), names)
    merged = merge_local(state(server), local)
    # The hospital's shared entries as the server sends them back, around the server's norm entries:
    round_trip = merge_local({k: state(server)[k] if k in local else shared[k] for k in state(mine)}, local)

    # Assert: a partition in order; the merge takes the local entries from the hospital
    # and everything else from the server, keeping the server's key order.
    assert list(shared) + list(local) == [k for k in state(mine) if k not in local] + names
    assert list(local) == names and not set(shared) & set(local)
    assert list(merged) == list(state(server))
    for key in merged:
        source = state(mine) if key in names else state(server)
        assert equal(merged[key], source[key]), key
        assert type(merged[key]) is type(source[key]) and merged[key].dtype == source[key].dtype
    assert list(round_trip) == list(state(mine))
    assert all(equal(round_trip[key], value) for key, value in state(mine).items())
    torch_merged = {k: torch.as_tensor(v) for k, v in merged.items()}
    fresh = make_model(3, (8, 16), norm="batch")
    fresh.load_state_dict(torch_merged)  # loads as is: nothing missing, nothing extra


def test_merge_converts_local_tensors_to_the_global_container_type() -> None:
    model = make_model(3, (8, 16), norm="group")
    names = local_state_names(model)
    as_numpy = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    _, local = split_local(model.state_dict(), names)  # tensors

    merged = merge_local(as_numpy, local)

    assert all(isinstance(v, np.ndarray) for v in merged.values())
    assert all(np.array_equal(merged[k], local[k].numpy()) for k in names)


def test_split_and_merge_refuse_foreign_entries_with_a_clear_message() -> None:
    batch = make_model(3, (8, 16), norm="batch").state_dict()
    group = make_model(3, (8, 16), norm="group").state_dict()
    wide = make_model(3, (16, 32), norm="group").state_dict()

    with pytest.raises(KeyError, match=r"local entries \['model.0.adn.N.num_batches_tracked'"):
        split_local(group, local_state_names(make_model(3, (8, 16), norm="batch")))
    with pytest.raises(KeyError, match="are not in the global state"):
        merge_local(group, split_local(batch, local_state_names(make_model(3, (8, 16), norm="batch")))[1])
    _, wide_local = split_local(wide, local_state_names(make_model(3, (16, 32), norm="group")))
    with pytest.raises(ValueError, match=r"'model.0.adn.N.weight' has shape \(16,\) but the global one has shape \(8,\)"):
        merge_local(group, wide_local)


# ---------------------------------------------------------------- AdaBN


class _Tiny(torch.nn.Module):
    """conv -> dropout -> BN -> ReLU -> 1x1 conv -> BN: small enough to recompute by hand."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1, self.drop, self.bn1 = torch.nn.Conv2d(1, 3, 3), torch.nn.Dropout(0.5), torch.nn.BatchNorm2d(3)
        self.conv2, self.bn2 = torch.nn.Conv2d(3, 2, 1), torch.nn.BatchNorm2d(2, momentum=0.3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            for bn in (self.bn1, self.bn2):  # stale statistics from a "source domain"
                bn.running_mean.fill_(5.0)
                bn.running_var.fill_(9.0)
                bn.num_batches_tracked.fill_(123)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.drop(self.conv1(x))))))


def test_adabn_statistics_are_the_target_activations_mean_and_variance() -> None:
    # Prepare
    model = _Tiny()
    images = _images(6, size=8)
    x = torch.from_numpy(images)

    # Execute: one batch holds every image.
    adapted = adapt_batch_norm(model, images, batch_size=64)

    # Assert: statistics recomputed independently (no dropout: AdaBN runs the rest in eval).
    with torch.no_grad():
        a1 = model.conv1(x)
        mean1, var1 = a1.mean(dim=(0, 2, 3)), a1.var(dim=(0, 2, 3), unbiased=True)
        normed = (a1 - mean1[None, :, None, None]) / torch.sqrt(a1.var(dim=(0, 2, 3), unbiased=False) + 1e-5)[None, :, None, None]
        a2 = model.conv2(torch.relu(normed * model.bn1.weight[None, :, None, None] + model.bn1.bias[None, :, None, None]))
        mean2, var2 = a2.mean(dim=(0, 2, 3)), a2.var(dim=(0, 2, 3), unbiased=True)
    assert adapted == 2
    torch.testing.assert_close(model.bn1.running_mean, mean1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.bn1.running_var, var1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.bn2.running_mean, mean2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.bn2.running_var, var2, rtol=1e-4, atol=1e-5)
    assert int(model.bn1.num_batches_tracked) == int(model.bn2.num_batches_tracked) == 1
    # Momenta and training flags are given back.
    assert (model.bn1.momentum, model.bn2.momentum) == (0.1, 0.3)
    assert all(m.training for m in model.modules())


def test_adabn_over_equal_batches_averages_them() -> None:
    model = _Tiny()
    images = _images(6, size=8)
    x = torch.from_numpy(images)

    adapt_batch_norm(model, images, batch_size=2)

    with torch.no_grad():
        a1 = model.conv1(x)
        per_batch_var = torch.stack([a1[i : i + 2].var(dim=(0, 2, 3)) for i in range(0, 6, 2)]).mean(0)
    torch.testing.assert_close(model.bn1.running_mean, a1.mean(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.bn1.running_var, per_batch_var, rtol=1e-5, atol=1e-5)
    assert int(model.bn1.num_batches_tracked) == 3


def test_adabn_changes_only_the_running_statistics_of_a_batch_norm_unet() -> None:
    # Prepare: a U-Net in eval mode except one block, so that the flags must be restored one by one.
    model = make_model(3, (8, 16), seed=4, norm="batch")
    model.eval()
    model.model[0].train()
    flags = {name: m.training for name, m in model.named_modules()}
    before = _snapshot(model)

    # Execute
    adapted = adapt_batch_norm(model, _images(10), batch_size=4)

    # Assert
    after = model.state_dict()
    assert adapted == 2
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.endswith(_STATS)}
    assert all(p.grad is None for p in model.parameters())
    assert {name: m.training for name, m in model.named_modules()} == flags
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("norm", ["instance", "instance-affine", "group"])
def test_adabn_on_a_model_without_running_statistics_is_a_no_op(norm: str) -> None:
    model = make_model(3, (8, 16), seed=4, norm=norm)
    model.train()
    before = _snapshot(model)

    adapted = adapt_batch_norm(model, _images(5))
    empty = adapt_batch_norm(model, _images(0))

    assert adapted == empty == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(m.training for m in model.modules())


def test_adabn_refuses_a_bad_batch_size_and_no_images_without_touching_the_model() -> None:
    model = _Tiny()
    before = _snapshot(model)

    with pytest.raises(ValueError) as bad_size:
        adapt_batch_norm(model, _images(3, size=8), batch_size=0)
    with pytest.raises(ValueError, match="at least one image"):
        adapt_batch_norm(model, _images(0, size=8))

    assert str(bad_size.value) == ("The 'batch_size' parameter of adapt_batch_norm must be an int in [1, inf). "
                                   "Got 0 instead.")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ---------------------------------------------------------------- TENT


def test_tent_takes_one_adam_step_down_the_entropy_on_the_norm_weights_only() -> None:
    # Prepare: the oracle step, from an identical copy (dropout off, BN on batch statistics).
    model, oracle = _Tiny(), _Tiny()
    images = _images(4, size=8)
    before = _snapshot(model)
    oracle.eval()
    oracle.bn1.train()
    oracle.bn2.train()
    norm_params = [oracle.bn1.weight, oracle.bn1.bias, oracle.bn2.weight, oracle.bn2.bias]
    log_p = torch.log_softmax(oracle(torch.from_numpy(images)), dim=1)
    entropy = -(log_p.exp() * log_p).sum(dim=1).mean()
    grads = torch.autograd.grad(entropy, norm_params)
    lr = 1e-2
    # Adam's first step moves each weight by lr * g / (|g| + eps) (bias-corrected moments).
    expected = [p.detach() - lr * g / (g.abs() + 1e-8) for p, g in zip(norm_params, grads, strict=True)]

    # Execute
    entropies = entropy_minimization(model, images, lr=lr, batch_size=8)

    # Assert
    assert entropies == [pytest.approx(float(entropy.detach()), rel=1e-6)]
    got = [model.bn1.weight, model.bn1.bias, model.bn2.weight, model.bn2.bias]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.detach(), e, rtol=1e-5, atol=1e-6)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"}  # stats, convs untouched
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules()) and model.bn2.momentum == 0.3


@pytest.mark.parametrize("norm", ["batch", "group", "instance-affine"])
def test_tent_lowers_the_entropy_of_a_unet_and_changes_only_its_norm_weights(norm: str) -> None:
    model = make_model(3, (8, 16), seed=4, norm=norm)
    before = _snapshot(model)

    entropies = entropy_minimization(model, _images(4), epochs=8, lr=1e-2, batch_size=4)

    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert len(entropies) == 8 and entropies[-1] < entropies[0]
    assert changed and changed <= {n for n in local_state_names(model) if n.endswith(("weight", "bias"))}


def test_tent_is_a_no_op_without_norm_weights_and_refuses_bad_settings() -> None:
    model = make_model(3, (8, 16), seed=4, norm="instance")
    before = _snapshot(model)

    assert entropy_minimization(model, _images(4)) == []
    assert entropy_minimization(_Tiny(), _images(0, size=8)) == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match=r"The 'epochs' parameter of entropy_minimization .* Got 0 instead"):
        entropy_minimization(model, _images(4), epochs=0)
    with pytest.raises(ValueError, match=r"The 'lr' parameter of entropy_minimization .* Got -1.0 instead"):
        entropy_minimization(model, _images(4), lr=-1.0)
