"""White-box evasion attacks on the segmentation model: FGSM and PGD against the training loss.

- **FGSM** (Goodfellow et al., "Explaining and harnessing adversarial examples", ICLR 2015):
  one step of ``eps`` along the sign of the loss gradient (:func:`fgsm`).
- **PGD** (Madry et al., "Towards deep learning models resistant to adversarial attacks",
  ICLR 2018): ``steps`` gradient steps, each projected back onto the L-inf or L2 ball of
  radius ``eps`` around the clean image, from an optional random start (:func:`pgd`).

Both are untargeted (they maximise the loss) and dense: the loss is the segmentation loss on
logits ``(B, C, H, W)`` and per-pixel labels ``(B, 1, H, W)`` (MONAI's Dice + cross-entropy by
default, :func:`sims.training.make_loss`). torchattacks and the Adversarial Robustness Toolbox
were not used: torchattacks hard-codes a cross-entropy on class labels, clamps to ``[0, 1]``
and draws from the global RNG; ART's classifiers expect one label per image.

Pure functions, Flower-free: a hospital attacks its own model on its own images. The model is
put in eval mode for the attack and its training flag restored; gradients are taken with
respect to the images only, so no ``.grad`` is written to the model's parameters.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from common.validation import InvalidParameterError, check_choice, check_float, check_int, parameter_error

__all__ = ["NORMS", "fgsm", "pgd"]

NORMS: tuple[str, ...] = ("linf", "l2")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Clip = tuple[float | None, float | None]

# Guards the per-image L2 divisions against an all-zero gradient or perturbation.
_TINY = 1e-12


def fgsm(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    loss_fn: LossFn | None = None,
    clip: Clip = (0.0, None),
) -> torch.Tensor:
    """Fast gradient sign method: ``clip(x + eps * sign(grad_x loss(model(x), y)))``.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``(B, 1, H, W)`` images to ``(B, C, H, W)`` logits. Put in eval mode during the
        attack; its training flag is restored afterwards.
    images : Tensor, shape (B, 1, H, W), float
        Clean images, inside ``clip``.
    labels : Tensor, shape (B, 1, H, W), int64
        Ground-truth class per pixel.
    eps : float
        L-inf budget, in image intensity units (e.g. ``2/255``, ``4/255``, ``8/255``); ``>= 0``.
        ``0`` gives back the images unchanged.
    loss_fn : callable, optional
        ``(logits, labels) -> scalar`` to maximise; default :func:`sims.training.make_loss`.
    clip : (float or None, float or None)
        Intensity range the adversarial images are clipped to; ``None`` leaves that side
        open. Default ``(0.0, None)``: simulated intensities are non-negative with no fixed
        upper bound.

    Returns
    -------
    Tensor, shape (B, 1, H, W)
        Adversarial images, detached, with ``|x_adv - x| <= eps`` everywhere.

    Raises
    ------
    InvalidParameterError
        On a negative or non-finite ``eps``, a bad ``clip``, or images / labels of the wrong
        type or shape.
    """
    eps = check_float("eps", eps, owner="fgsm", low=0.0)
    low, high = _check_clip(clip, "fgsm")
    _check_batch(images, labels, low, high, "fgsm")
    clean = images.detach()
    if eps == 0.0:
        return clean.clone()
    grad = _loss_gradient(model, clean, labels, loss_fn)
    return _clamp(clean + eps * grad.sign(), low, high).detach()


def pgd(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    steps: int,
    step_size: float,
    norm: str = "linf",
    random_start: bool = True,
    generator: torch.Generator | None = None,
    loss_fn: LossFn | None = None,
    clip: Clip = (0.0, None),
) -> torch.Tensor:
    """Projected gradient descent on the loss (ascent, untargeted) inside an ``eps`` ball.

    Each step moves the images by ``step_size`` along the sign of the gradient (L-inf) or
    along the gradient normalised per image (L2), projects the perturbation back onto the
    ball of radius ``eps`` around the clean image and clips to ``clip``.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``(B, 1, H, W)`` images to ``(B, C, H, W)`` logits. Put in eval mode during the
        attack; its training flag is restored afterwards.
    images : Tensor, shape (B, 1, H, W), float
        Clean images, inside ``clip``.
    labels : Tensor, shape (B, 1, H, W), int64
        Ground-truth class per pixel.
    eps : float
        Radius of the ball, in image intensity units; ``>= 0``. L-inf: the largest change of
        one pixel (e.g. ``8/255``); L2: the largest Euclidean norm of one image's change.
        ``0`` gives back the images unchanged.
    steps : int
        Gradient steps, ``>= 1``.
    step_size : float
        Length of one step (``alpha`` in Madry et al.), ``> 0``; ``2.5 * eps / steps`` is a
        common choice.
    norm : {"linf", "l2"}
        The ball's norm.
    random_start : bool
        Start from a random point of the ball (uniform per pixel for L-inf; a random
        direction at a radius uniform in ``[0, eps]`` for L2) rather than the clean image.
    generator : torch.Generator, optional
        The only source of randomness; required when ``random_start`` is true.
    loss_fn : callable, optional
        ``(logits, labels) -> scalar`` to maximise; default :func:`sims.training.make_loss`.
    clip : (float or None, float or None)
        Intensity range the adversarial images are clipped to; ``None`` leaves that side
        open. Default ``(0.0, None)``.

    Returns
    -------
    Tensor, shape (B, 1, H, W)
        Adversarial images, detached, inside the ball and ``clip``.

    Raises
    ------
    InvalidParameterError
        On an out-of-range number, an unknown ``norm`` (with the nearest name), a missing
        ``generator`` for a random start, a bad ``clip``, or images / labels of the wrong
        type or shape.
    """
    owner = "pgd"
    eps = check_float("eps", eps, owner=owner, low=0.0)
    steps = check_int("steps", steps, owner=owner, low=1)
    step_size = check_float("step_size", step_size, owner=owner, low=0.0, low_open=True)
    norm = check_choice("norm", norm, NORMS, owner=owner)
    if not isinstance(random_start, bool):
        raise InvalidParameterError(parameter_error("random_start", "a bool", random_start, owner=owner))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InvalidParameterError(parameter_error("generator", "a torch.Generator or None", generator, owner=owner))
    if random_start and generator is None:
        raise InvalidParameterError(
            parameter_error("generator", "a torch.Generator when random_start is True", None, owner=owner)
        )
    low, high = _check_clip(clip, owner)
    _check_batch(images, labels, low, high, owner)

    clean = images.detach()
    if eps == 0.0:
        return clean.clone()
    delta = torch.zeros_like(clean)
    if random_start and generator is not None:  # a random start without one was refused above
        delta = _random_start(clean, eps, norm, generator)
    adv = _clamp(clean + delta, low, high)
    for _ in range(steps):
        grad = _loss_gradient(model, adv, labels, loss_fn)
        if norm == "linf":
            delta = (adv + step_size * grad.sign() - clean).clamp(-eps, eps)
        else:
            delta = adv + step_size * grad / _per_image_norm(grad).clamp_min(_TINY) - clean
            delta = delta * (eps / _per_image_norm(delta).clamp_min(_TINY)).clamp(max=1.0)
        adv = _clamp(clean + delta, low, high)
    return adv.detach()


def _loss_gradient(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, loss_fn: LossFn | None
) -> torch.Tensor:
    """``d loss(model(images), labels) / d images`` in eval mode; parameters get no ``.grad``."""
    if loss_fn is None:
        from sims.training import make_loss  # pulls in MONAI's losses only when needed

        loss_fn = make_loss()
    was_training = model.training
    x = images.detach().clone().requires_grad_(True)
    model.eval()
    try:
        # Callers often evaluate under torch.no_grad(); the attack needs a graph regardless.
        with torch.enable_grad():
            loss = loss_fn(model(x), labels)
            # autograd.grad returns the input's gradient without accumulating into .grad.
            (grad,) = torch.autograd.grad(loss, x)
    finally:
        model.train(was_training)
    return grad.detach()


def _random_start(clean: torch.Tensor, eps: float, norm: str, generator: torch.Generator) -> torch.Tensor:
    """A random perturbation inside the ball, drawn on the generator's device."""
    shape, dev = clean.shape, generator.device
    if norm == "linf":
        delta = (torch.rand(shape, generator=generator, device=dev) * 2 - 1) * eps
    else:
        direction = torch.randn(shape, generator=generator, device=dev)
        radius = torch.rand((shape[0],) + (1,) * (len(shape) - 1), generator=generator, device=dev) * eps
        delta = direction / _per_image_norm(direction).clamp_min(_TINY) * radius
    return delta.to(device=clean.device, dtype=clean.dtype)


def _per_image_norm(x: torch.Tensor) -> torch.Tensor:
    """L2 norm of each image, shape ``(B, 1, ..., 1)`` to broadcast against ``x``."""
    return x.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (x.dim() - 1))


def _clamp(x: torch.Tensor, low: float | None, high: float | None) -> torch.Tensor:
    if low is None and high is None:
        return x
    return x.clamp(min=low, max=high)


def _check_clip(clip: object, owner: str) -> tuple[float | None, float | None]:
    expected = "a pair (low, high) of floats or None with low <= high"
    if not (isinstance(clip, tuple | list) and len(clip) == 2):
        raise InvalidParameterError(parameter_error("clip", expected, clip, owner=owner))
    ends: list[float | None] = []
    for end in clip:
        if end is None:
            ends.append(None)
            continue
        try:
            ends.append(check_float("clip", end, owner=owner))
        except InvalidParameterError:
            raise InvalidParameterError(parameter_error("clip", expected, clip, owner=owner)) from None
    low, high = ends
    if low is not None and high is not None and low > high:
        raise InvalidParameterError(parameter_error("clip", expected, clip, owner=owner))
    return low, high


def _check_batch(images: object, labels: object, low: float | None, high: float | None, owner: str) -> None:
    """Images ``(B, 1, H, W)`` float, labels ``(B, 1, H, W)`` integer, images inside ``clip``."""
    if not (isinstance(images, torch.Tensor) and images.dim() == 4 and images.is_floating_point()):
        shown = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise InvalidParameterError(
            parameter_error("images", "a float tensor of shape (B, 1, H, W)", shown, owner=owner)
        )
    if not (isinstance(labels, torch.Tensor) and not labels.is_floating_point() and not labels.is_complex()):
        shown = str(labels.dtype) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise InvalidParameterError(parameter_error("labels", "an integer tensor", shown, owner=owner))
    b, _, h, w = images.shape
    if tuple(labels.shape) != (b, 1, h, w):
        raise InvalidParameterError(
            parameter_error(
                "labels", f"of shape {(b, 1, h, w)} to match images of shape {tuple(images.shape)}",
                tuple(labels.shape), owner=owner,
            )
        )
    # Clipping an image that starts outside the range could move it further than eps.
    if (low is not None and bool((images < low).any())) or (high is not None and bool((images > high).any())):
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        span = (float(images.min()), float(images.max()))
        raise InvalidParameterError(
            parameter_error("images", f"inside clip [{lo}, {hi}]", span, owner=owner, hint=" (the images' min and max)")
        )
