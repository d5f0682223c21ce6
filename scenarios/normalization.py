"""Normalisation layers across hospitals: FedBN's local layers, AdaBN and TENT test-time adaptation.

Scanners shift intensity statistics, and normalisation layers are where a network stores
them. Three remedies act on those layers only:

- **FedBN** (Li et al., "FedBN: Federated learning on non-IID features via local batch
  normalization", ICLR 2021): each hospital keeps its normalisation layers (weights, biases
  and running statistics) local and federates the rest. :func:`local_state_names` names
  those entries; :func:`split_local` and :func:`merge_local` take them out of and put them
  back into a state dict.
- **AdaBN** (Li et al., "Revisiting batch normalization for practical domain adaptation",
  ICLR workshop 2017 / Pattern Recognition 2018): before testing on a new domain, recompute
  every BatchNorm's running statistics on that domain's unlabelled images
  (:func:`adapt_batch_norm`).
- **TENT** (Wang et al., ICLR 2021): a few steps on the normalisation layers' affine weights
  that lower the entropy of the predictions on unlabelled target images
  (:func:`entropy_minimization`).

Pure functions on torch modules and state dicts, Flower-free: a hospital calls them on its
own model and data; only the shared entries travel.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

import numpy as np
import torch
from torch.nn.modules.batchnorm import _NormBase

Array = TypeVar("Array", torch.Tensor, np.ndarray)

# Modules whose parameters and buffers describe one site's intensity statistics. _NormBase
# covers BatchNorm{1,2,3}d, SyncBatchNorm and InstanceNorm{1,2,3}d (the last only hold
# state with affine=True or track_running_stats=True, and then it is theirs to keep).
_NORM_TYPES: tuple[type[torch.nn.Module], ...] = (_NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def local_state_names(model: torch.nn.Module) -> list[str]:
    """The ``state_dict`` keys FedBN keeps at the hospital: every normalisation entry.

    Normalisation modules are found by type (BatchNorm, InstanceNorm, GroupNorm, LayerNorm),
    not by name, and contribute all their persistent state: ``weight``, ``bias`` and, for
    BatchNorm, ``running_mean``, ``running_var`` and ``num_batches_tracked``.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    list of str
        In ``model.state_dict()`` order. Empty for a model whose norm layers hold no state
        (``make_model(..., norm="instance")``): FedBN then equals FedAvg.
    """
    local: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, _NORM_TYPES):
            prefix = f"{name}." if name else ""
            local.update(module.state_dict(prefix=prefix, keep_vars=True))
    return [key for key in model.state_dict(keep_vars=True) if key in local]


def split_local(
    state: Mapping[str, Array], names: Iterable[str]
) -> tuple[dict[str, Array], dict[str, Array]]:
    """Split a state dict into ``(shared, local)`` by key; values are not copied.

    Parameters
    ----------
    state : mapping of str to Tensor or ndarray
        ``model.state_dict()`` or the numpy contents of a Flower ``ArrayRecord``.
    names : iterable of str
        The local keys, usually :func:`local_state_names` of the model.

    Returns
    -------
    shared, local : dict, dict
        Both in ``state``'s order; together they hold every entry exactly once.

    Raises
    ------
    KeyError
        If a name is not a key of ``state``.
    """
    names = set(names)
    missing = sorted(names - set(state))
    if missing:
        raise KeyError(
            f"split_local: the local entries {missing} are not in the state dict (it has "
            f"{len(state)} entries); were the names taken from a model with another norm or channels?"
        )
    shared = {k: v for k, v in state.items() if k not in names}
    local = {k: v for k, v in state.items() if k in names}
    return shared, local


def merge_local(
    global_state: Mapping[str, Array], local_state: Mapping[str, torch.Tensor | np.ndarray]
) -> dict[str, Array]:
    """The global state with the hospital's local entries put back in place.

    Parameters
    ----------
    global_state : mapping of str to Tensor or ndarray
        The complete state received from the server (its local entries are ignored).
    local_state : mapping of str to Tensor or ndarray
        The hospital's own entries (see :func:`split_local`). Each value is converted to
        the container type of the global entry it replaces (tensor or ndarray), so the
        result is all tensors or all arrays, as ``global_state`` is; the dtype and the
        device follow too.

    Returns
    -------
    dict
        A new dict in ``global_state``'s order; neither input is modified, and values
        whose type, dtype and device already match are not copied (load them into a
        model, or copy, before changing either input in place).

    Raises
    ------
    KeyError
        If a local key is not in ``global_state``.
    ValueError
        If a local entry's shape differs from the global one it replaces.
    """
    missing = sorted(set(local_state) - set(global_state))
    if missing:
        raise KeyError(
            f"merge_local: the local entries {missing} are not in the global state; the "
            "global model must have the same architecture and norm as the local one."
        )
    merged = dict(global_state)
    for key, value in local_state.items():
        reference = global_state[key]
        if tuple(value.shape) != tuple(reference.shape):
            raise ValueError(
                f"merge_local: the local entry {key!r} has shape {tuple(value.shape)} but the global "
                f"one has shape {tuple(reference.shape)}."
            )
        merged[key] = _like(value, reference)
    return merged


def _like(value: torch.Tensor | np.ndarray, reference: Array) -> Array:
    """``value`` as the container type, dtype and device of ``reference``."""
    if isinstance(reference, torch.Tensor):
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))
        return tensor.to(dtype=reference.dtype, device=reference.device)
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return array.astype(reference.dtype, copy=False)


def _running_stat_layers(model: torch.nn.Module) -> list[_NormBase]:
    return [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]


def adapt_batch_norm(model: torch.nn.Module, images: np.ndarray, *, batch_size: int = 32) -> int:
    """AdaBN: re-estimate every BatchNorm's running statistics on unlabelled target images.

    Each normalisation layer with running statistics (BatchNorm; InstanceNorm with
    ``track_running_stats=True``) is reset and then fed ``images`` in train mode with
    ``momentum=None``, so its statistics become the cumulative average over the batches
    (exactly the mean of the images' activations when ``batch_size >= len(images)``; with
    several batches, the running variance is the mean of the per-batch unbiased variances).
    Only those statistics change (``running_mean``, ``running_var``,
    ``num_batches_tracked``): no gradient is taken, every other module stays in eval mode
    (dropout off), and each module's momentum and training flag are restored afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        Adapted in place.
    images : ndarray, shape (N, C, H, W)
        The target domain's images, as the model takes them (N >= 1).
    batch_size : int
        Images per forward pass (only memory; see above for the effect on the variance).

    Returns
    -------
    int
        The number of layers adapted; 0 for a model without running statistics, which is
        left untouched.

    Raises
    ------
    ValueError
        If ``batch_size`` is not a positive integer, or ``images`` is empty while there is
        something to adapt.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(
            f"The 'batch_size' parameter of adapt_batch_norm must be an int in [1, inf). Got {batch_size!r} instead."
        )
    layers = _running_stat_layers(model)
    if not layers:
        return 0
    if len(images) == 0:
        raise ValueError("adapt_batch_norm needs at least one image: got an empty array, which would "
                         "reset the running statistics to mean 0, variance 1.")
    training = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    reference = next(iter(model.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    dtype = reference.dtype if reference is not None else torch.float32
    try:
        model.eval()
        for layer in layers:
            layer.reset_running_stats()
            layer.momentum = None  # cumulative moving average: every batch weighs the same
            layer.train()
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = torch.as_tensor(np.asarray(images[start : start + batch_size]))
                model(batch.to(device=device, dtype=dtype))
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        for module, flag in training.items():
            module.training = flag
    return len(layers)


def entropy_minimization(
    model: torch.nn.Module, images: np.ndarray, *, epochs: int = 1, lr: float = 1e-3, batch_size: int = 32
) -> list[float]:
    """TENT: adapt the normalisation layers' affine weights by minimising prediction entropy.

    Wang et al., "Tent: Fully test-time adaptation by entropy minimization", ICLR 2021. For
    each batch of unlabelled target images, in order, one Adam step lowers the mean per-pixel
    entropy of the softmax over classes (dim 1), updating only the ``weight`` and ``bias`` of
    the normalisation layers (BatchNorm, affine InstanceNorm, GroupNorm, LayerNorm). As in
    TENT, BatchNorm normalises with the batch's own statistics while adapting; its running
    statistics are left as they were (run :func:`adapt_batch_norm` first to replace them).
    Every other module stays in eval mode (dropout off); training flags are restored and no
    ``.grad`` is left on any parameter.

    Parameters
    ----------
    model : torch.nn.Module
        Returns logits ``(B, K, ...)``; adapted in place.
    images : ndarray, shape (N, C, H, W)
    epochs : int
        Passes over ``images`` (TENT proper is one online pass).
    lr : float
        Adam's learning rate (TENT's ImageNet setting used SGD at 2.5e-4; Adam 1e-3 is its
        CIFAR setting).
    batch_size : int
        Images per adaptation step.

    Returns
    -------
    list of float
        The mean entropy (nats per pixel) of each batch before its step; empty, with the
        model untouched, when there is no normalisation weight to adapt or no image.

    Raises
    ------
    ValueError
        If ``epochs`` or ``batch_size`` is not a positive integer, or ``lr`` is not a
        positive finite float.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"The {name!r} parameter of entropy_minimization must be an int in [1, inf). Got {value!r} instead."
            )
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < float("inf"):
        raise ValueError(
            f"The 'lr' parameter of entropy_minimization must be a float in (0, inf). Got {lr!r} instead."
        )
    params = [
        p
        for m in model.modules()
        if isinstance(m, _NORM_TYPES)
        for p in (getattr(m, "weight", None), getattr(m, "bias", None))
        if isinstance(p, torch.nn.Parameter)
    ]
    if not params or len(images) == 0:
        return []
    layers = _running_stat_layers(model)
    stats = {m: {k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in layers}
    training = {m: m.training for m in model.modules()}
    optimizer = torch.optim.Adam(params, lr=lr)
    device, dtype = params[0].device, params[0].dtype
    entropies: list[float] = []
    try:
        model.eval()
        for layer in layers:
            layer.train()  # normalise with the test batch's statistics, as TENT does
        for _ in range(epochs):
            for start in range(0, len(images), batch_size):
                batch = torch.as_tensor(np.asarray(images[start : start + batch_size]))
                log_p = torch.log_softmax(model(batch.to(device=device, dtype=dtype)), dim=1)
                entropy = -(log_p.exp() * log_p).sum(dim=1).mean()
                # autograd.grad, not backward: no other parameter gets a .grad
                grads = torch.autograd.grad(entropy, params)
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                optimizer.step()
                entropies.append(float(entropy.detach()))
    finally:
        for p in params:
            p.grad = None
        with torch.no_grad():
            for layer, saved in stats.items():
                for key, saved_value in saved.items():
                    getattr(layer, key).copy_(saved_value)
        for module, flag in training.items():
            module.training = flag
    return entropies
