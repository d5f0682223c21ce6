"""Out-of-distribution scores for segmentation, the sufficient statistics behind them, and their metrics.

Every score is **higher for more out-of-distribution** (more uncertain, farther from the
training data), so one threshold rule serves all of them: accept an image when its score is at
most the threshold, flag it otherwise.

Logit scores (Hendrycks & Gimpel, 2017, MSP; Liu et al., 2020, energy) are computed per pixel
from ``(B, C, H, W)`` logits and pooled to one number per image (:data:`POOLS`):

- ``"foreground"``: the mean over the pixels predicted as a non-background class, where a
  shifted scanner shows most of its uncertainty; all pixels if none is predicted.
- ``"topk"``: the mean of the ``top_percent`` % most uncertain pixels of the image.

The Mahalanobis score (Lee et al., 2018) works on bottleneck features ``(B, D)``. A hospital
summarises its features as :class:`FeatureStats` (a count, a sum and a sum of outer products,
optionally per class), the only thing that leaves it; :meth:`FeatureStats.merge` adds the
hospitals' statistics into exactly the statistics of the pooled features.

:func:`ood_metrics` and :func:`selective_dice` evaluate the scores with scikit-learn's
conventions (out-of-distribution is the positive class).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import log_softmax, logsumexp
from sklearn.metrics import average_precision_score, roc_auc_score

from common.validation import InvalidParameterError, check_choice, check_float, check_int, parameter_error
from scenarios.shift_measures import float_array

__all__ = [
    "POOLS",
    "TARGET_TPR",
    "FeatureStats",
    "accept_threshold",
    "energy_score",
    "entropy_score",
    "mahalanobis_score",
    "msp_score",
    "ood_metrics",
    "selective_dice",
]

POOLS = ("foreground", "topk")
"""How per-pixel scores become one score per image (see the module docstring)."""

TARGET_TPR = 0.95
"""Default detection rate of :func:`ood_metrics`' FPR and the acceptance rate of :func:`accept_threshold`."""


# --------------------------------------------------------------------------- input checks


def _as_float_array(value: object) -> np.ndarray | None:
    """``value`` as a float64 array (torch tensors detached to CPU), or None if not numbers."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().to(torch.float64).numpy()
    return float_array(value)


def _check_array(value: object, name: str, owner: str, shape_text: str, ndim: int) -> np.ndarray:
    """``value`` as a finite float64 array of ``ndim`` dimensions and no empty axis, else raise."""
    array = _as_float_array(value)
    if array is None or array.ndim != ndim or 0 in array.shape:
        got = f"shape {array.shape}" if array is not None else type(value).__name__
        raise InvalidParameterError(
            f"The '{name}' parameter of {owner} must be an array of shape {shape_text} with no empty axis. "
            f"Got {got} instead."
        )
    if not np.all(np.isfinite(array)):
        raise InvalidParameterError(
            f"The '{name}' parameter of {owner} must be finite. Got NaN or inf values instead."
        )
    return array


def _check_logits(logits: object, owner: str) -> np.ndarray:
    array = _check_array(logits, "logits", owner, "(B, C, H, W)", 4)
    if array.shape[1] < 2:
        raise InvalidParameterError(
            f"The 'logits' parameter of {owner} must have C >= 2 classes (background first) in (B, C, H, W). "
            f"Got shape {array.shape} instead."
        )
    return array


# --------------------------------------------------------------------------- logit scores


def _pool(pixel_scores: np.ndarray, logits: np.ndarray, pool: str, top_percent: float) -> np.ndarray:
    """``(B, H, W)`` pixel scores to ``(B,)`` image scores."""
    flat = pixel_scores.reshape(len(pixel_scores), -1)
    if pool == "topk":
        # The tolerance keeps 7 % of 100 pixels (7.000000000000001 in float64) at 7, not 8.
        k = max(1, math.ceil(top_percent / 100.0 * flat.shape[1] - 1e-9))
        # The k largest per row, unordered; partition is O(HW) where a full sort is O(HW log HW).
        return np.partition(flat, flat.shape[1] - k, axis=1)[:, -k:].mean(axis=1)
    foreground = (logits.argmax(axis=1) != 0).reshape(len(flat), -1)
    counts = foreground.sum(axis=1)
    fg_mean = (flat * foreground).sum(axis=1) / np.maximum(counts, 1)
    return np.where(counts > 0, fg_mean, flat.mean(axis=1))


def _logit_score(name: str, logits: object, pool: str, top_percent: float) -> np.ndarray:
    array = _check_logits(logits, name)
    pool = check_choice("pool", pool, POOLS, owner=name)
    top_percent = check_float("top_percent", top_percent, owner=name, low=0.0, high=100.0, low_open=True)
    log_p = log_softmax(array, axis=1)
    if name == "msp_score":
        pixel = 1.0 - np.exp(log_p.max(axis=1))
    elif name == "entropy_score":
        pixel = -(np.exp(log_p) * log_p).sum(axis=1)
    else:
        pixel = -logsumexp(array, axis=1)
    return _pool(pixel, array, pool, top_percent)


def msp_score(logits: object, *, pool: str = "foreground", top_percent: float = 10.0) -> np.ndarray:
    """One minus the maximum softmax probability, pooled per image (Hendrycks & Gimpel, 2017).

    Parameters
    ----------
    logits : numpy.ndarray or torch.Tensor
        ``(B, C, H, W)`` segmentation logits, background class first, finite.
    pool : {"foreground", "topk"}, default "foreground"
        How pixel scores become an image score (see the module docstring).
    top_percent : float in (0, 100], default 10
        For ``pool="topk"``: the share of the pixels (rounded up, at least one) averaged.

    Returns
    -------
    numpy.ndarray
        ``(B,)`` float64 in ``[0, 1 - 1/C]``; higher is more out-of-distribution.

    Raises
    ------
    InvalidParameterError
        If ``logits`` is not a finite ``(B, C, H, W)`` array with ``C >= 2``, or ``pool`` or
        ``top_percent`` is invalid.
    """
    return _logit_score("msp_score", logits, pool, top_percent)


def entropy_score(logits: object, *, pool: str = "foreground", top_percent: float = 10.0) -> np.ndarray:
    """Shannon entropy of the softmax (nats), pooled per image.

    Parameters and errors as :func:`msp_score`. Returns ``(B,)`` float64 in ``[0, log C]``;
    higher is more out-of-distribution.
    """
    return _logit_score("entropy_score", logits, pool, top_percent)


def energy_score(logits: object, *, pool: str = "foreground", top_percent: float = 10.0) -> np.ndarray:
    """Free energy ``-logsumexp`` over classes, pooled per image (Liu et al., 2020).

    Parameters and errors as :func:`msp_score`. Returns ``(B,)`` float64, unbounded and in logit
    units; higher (less total evidence) is more out-of-distribution. Unlike the softmax scores
    it changes when all logits shift together, so it sees an image that excites no class.
    """
    return _logit_score("energy_score", logits, pool, top_percent)


# --------------------------------------------------------------------------- Mahalanobis


@dataclass(frozen=True)
class FeatureStats:
    """Sufficient statistics of one hospital's (or the federation's) features ``(N, D)``.

    Sums rather than means and covariances, so merging is exact addition. The covariance is
    recovered from raw moments, which loses digits when the features' mean is large against
    their spread (about ``log10(mean**2 / variance)`` of float64's 16): fine for normalised
    network features.

    Attributes
    ----------
    count : int
        Number of feature vectors ``N``.
    total : numpy.ndarray
        ``(D,)`` float64, their sum.
    outer : numpy.ndarray
        ``(D, D)`` float64, the sum of their outer products ``x x^T``.
    class_counts, class_totals : numpy.ndarray or None
        ``(K,)`` int64 and ``(K, D)`` float64 counts and sums per class, or None when the
        statistics were gathered without labels. Enough for the shared within-class
        covariance, because the per-class outer products add up to ``outer``.
    """

    count: int
    total: np.ndarray
    outer: np.ndarray
    class_counts: np.ndarray | None = None
    class_totals: np.ndarray | None = None

    @classmethod
    def from_features(
        cls, features: object, labels: object = None, *, num_classes: int | None = None
    ) -> FeatureStats:
        """Statistics of ``features`` ``(N, D)``, per class when ``labels`` ``(N,)`` in ``[0, num_classes)``.

        ``num_classes`` defaults to ``max(labels) + 1``; give it so that hospitals missing a
        class still produce mergeable statistics.

        Raises
        ------
        InvalidParameterError
            If ``features`` is not a finite non-empty ``(N, D)`` array, ``labels`` is not ``N``
            integers in ``[0, num_classes)``, or ``num_classes`` is given without ``labels``.
        """
        owner = "FeatureStats.from_features"
        x = _check_array(features, "features", owner, "(N, D)", 2)
        stats = cls(count=len(x), total=x.sum(axis=0), outer=x.T @ x)
        if labels is None:
            if num_classes is not None:
                raise InvalidParameterError(
                    parameter_error("num_classes", "None when 'labels' is None", num_classes, owner=owner)
                )
            return stats
        y = np.asarray(labels)
        if y.shape != (len(x),) or y.dtype.kind not in "iu":
            raise InvalidParameterError(
                f"The 'labels' parameter of {owner} must be an integer array of shape ({len(x)},) matching "
                f"'features' {x.shape}. Got shape {y.shape}, dtype {y.dtype} instead."
            )
        k = (
            int(y.max()) + 1
            if num_classes is None
            else check_int("num_classes", num_classes, owner=owner, low=1)
        )
        if y.min() < 0 or y.max() >= k:
            raise InvalidParameterError(
                f"The 'labels' parameter of {owner} must lie in [0, num_classes) with num_classes={k!r}. "
                f"Got labels in [{y.min()}, {y.max()}] instead."
            )
        class_totals = np.zeros((k, x.shape[1]))
        np.add.at(class_totals, y, x)
        return cls(
            count=stats.count,
            total=stats.total,
            outer=stats.outer,
            class_counts=np.bincount(y, minlength=k).astype(np.int64),
            class_totals=class_totals,
        )

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return int(self.total.shape[0])

    @property
    def mean(self) -> np.ndarray:
        """``(D,)`` mean feature."""
        return self.total / self.count

    def class_means(self) -> np.ndarray:
        """``(K, D)`` mean feature of every class present (classes without features are left out)."""
        if self.class_counts is None or self.class_totals is None:
            return self.mean[None, :]
        present = self.class_counts > 0
        return self.class_totals[present] / self.class_counts[present, None]

    def covariance(self) -> np.ndarray:
        """``(D, D)`` shared covariance (maximum likelihood, divided by ``N``).

        Around each class's mean when the statistics have classes (the pooled within-class
        covariance of Lee et al., 2018), around the global mean otherwise.
        """
        if self.class_counts is None or self.class_totals is None:
            centre = np.outer(self.total, self.total) / self.count
        else:
            present = self.class_counts > 0
            sums = self.class_totals[present]
            centre = (sums.T / self.class_counts[present]) @ sums
        covariance = (self.outer - centre) / self.count
        return (covariance + covariance.T) / 2.0  # exact symmetry for the Cholesky factorisation

    @staticmethod
    def merge(stats_list: Sequence[FeatureStats]) -> FeatureStats:
        """The statistics of all the features together: what the server makes of the hospitals'.

        Raises
        ------
        InvalidParameterError
            If ``stats_list`` is empty, or its members differ in ``D``, in the number of
            classes, or in whether they have classes at all.
        """
        items = list(stats_list) if isinstance(stats_list, Sequence) else []
        if not items or not all(isinstance(s, FeatureStats) for s in items):
            raise InvalidParameterError(
                parameter_error(
                    "stats_list", "a non-empty sequence of FeatureStats", stats_list, owner="merge"
                )
            )
        first = items[0]
        layouts = {(s.dim, None if s.class_counts is None else len(s.class_counts)) for s in items}
        if len(layouts) > 1:
            raise InvalidParameterError(
                "The 'stats_list' parameter of merge must hold statistics of one layout (D, classes). "
                f"Got layouts {sorted(layouts, key=str)} instead."
            )
        counts = [s.class_counts for s in items if s.class_counts is not None]
        totals = [s.class_totals for s in items if s.class_totals is not None]
        has_classes = first.class_counts is not None
        return FeatureStats(
            count=sum(s.count for s in items),
            total=np.sum([s.total for s in items], axis=0),
            outer=np.sum([s.outer for s in items], axis=0),
            class_counts=np.sum(counts, axis=0) if has_classes else None,
            class_totals=np.sum(totals, axis=0) if has_classes else None,
        )


def mahalanobis_score(features: object, stats: FeatureStats, *, shrinkage: float = 1e-3) -> np.ndarray:
    """Squared Mahalanobis distance to the nearest class mean under a shared covariance (Lee et al., 2018).

    The covariance is shrunk towards a multiple of the identity,
    ``(1 - shrinkage) * S + shrinkage * trace(S) / D * I``, a ridge that keeps it invertible
    when ``N <= D`` or features are collinear and that scales with the features.

    Parameters
    ----------
    features : numpy.ndarray or torch.Tensor
        ``(B, D)`` bottleneck features, finite.
    stats : FeatureStats
        In-distribution statistics with the same ``D`` (merged from the hospitals); the class
        means are used when it has classes, the global mean otherwise.
    shrinkage : float in [0, 1], default 1e-3

    Returns
    -------
    numpy.ndarray
        ``(B,)`` float64 >= 0; 0 at a class mean, higher is more out-of-distribution.

    Raises
    ------
    InvalidParameterError
        If the shapes disagree, ``shrinkage`` is out of range, or the covariance is singular
        (``shrinkage=0`` with collinear features, or constant features).
    """
    owner = "mahalanobis_score"
    if not isinstance(stats, FeatureStats):
        raise InvalidParameterError(
            parameter_error("stats", "a FeatureStats", type(stats).__name__, owner=owner)
        )
    x = _check_array(features, "features", owner, f"(B, {stats.dim})", 2)
    if x.shape[1] != stats.dim:
        raise InvalidParameterError(
            f"The 'features' parameter of {owner} must have shape (B, {stats.dim}) to match 'stats' "
            f"(D={stats.dim}). Got shape {x.shape} instead."
        )
    shrinkage = check_float("shrinkage", shrinkage, owner=owner, low=0.0, high=1.0)
    covariance = stats.covariance()
    scale = np.trace(covariance) / stats.dim
    covariance = (1.0 - shrinkage) * covariance + shrinkage * scale * np.eye(stats.dim)
    if scale <= 0:
        raise InvalidParameterError(
            f"mahalanobis_score needs features that vary: the statistics of {stats.count} features "
            f"(D={stats.dim}) have zero variance in every dimension."
        )
    try:
        cholesky = np.linalg.cholesky(covariance)
    except np.linalg.LinAlgError:
        raise InvalidParameterError(
            f"mahalanobis_score needs an invertible covariance: the statistics of {stats.count} features "
            f"(D={stats.dim}) with shrinkage={shrinkage:g} give a singular one; use shrinkage > 0."
        ) from None
    means = stats.class_means()  # (K, D)
    # Whitened differences: ||L^{-1} (x - mu)||^2 = (x - mu)^T S^{-1} (x - mu).
    diffs = (x[:, None, :] - means[None, :, :]).reshape(-1, stats.dim)
    whitened = np.linalg.solve(cholesky, diffs.T)
    distances = (whitened**2).sum(axis=0).reshape(len(x), len(means))
    return distances.min(axis=1)


# --------------------------------------------------------------------------- metrics


def _check_scores(value: object, name: str, owner: str) -> np.ndarray:
    return _check_array(value, name, owner, "(N,)", 1)


def _first_reaching(n: int, rate: float) -> int:
    """Smallest ``k`` with ``k / n >= rate`` in float64, as scikit-learn's ``roc_curve`` compares rates."""
    return int(np.argmax(np.arange(1, n + 1) / n >= rate)) + 1


def ood_metrics(scores_in: object, scores_out: object, *, tpr: float = TARGET_TPR) -> dict[str, float]:
    """Detection quality of a score: out-of-distribution images are the positive class.

    Parameters
    ----------
    scores_in, scores_out : array-like
        ``(N_in,)`` and ``(N_out,)`` scores of in- and out-of-distribution images (higher
        means more out-of-distribution), finite.
    tpr : float in (0, 1], default 0.95
        Detection rate for ``fpr_at_95_tpr``.

    Returns
    -------
    dict
        ``auroc`` (:func:`sklearn.metrics.roc_auc_score`), ``aupr``
        (:func:`sklearn.metrics.average_precision_score`, out-of-distribution positive) and
        ``fpr_at_95_tpr``: the share of in-distribution images flagged at the highest
        threshold ``t`` that flags (``score >= t``) at least ``tpr`` of the out-of-distribution
        images, the first point of :func:`sklearn.metrics.roc_curve` reaching ``tpr``. Lower
        is better; 0 for perfectly separated scores.

    Raises
    ------
    InvalidParameterError
        If either score set is not a finite non-empty 1-D array, or ``tpr`` is out of range.
    """
    owner = "ood_metrics"
    s_in = _check_scores(scores_in, "scores_in", owner)
    s_out = _check_scores(scores_out, "scores_out", owner)
    tpr = check_float("tpr", tpr, owner=owner, low=0.0, high=1.0, low_open=True)
    labels = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    scores = np.r_[s_in, s_out]
    threshold = np.sort(s_out)[::-1][_first_reaching(len(s_out), tpr) - 1]
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "aupr": float(average_precision_score(labels, scores)),
        "fpr_at_95_tpr": float(np.mean(s_in >= threshold)),
    }


def accept_threshold(scores_in: object, *, tpr: float = TARGET_TPR) -> float:
    """The lowest threshold that accepts (``score <= threshold``) at least ``tpr`` of in-distribution images.

    Computed on held-out in-distribution scores; deploy it to flag images above it.

    Raises
    ------
    InvalidParameterError
        If ``scores_in`` is not a finite non-empty 1-D array or ``tpr`` is not in (0, 1].
    """
    s_in = _check_scores(scores_in, "scores_in", "accept_threshold")
    tpr = check_float("tpr", tpr, owner="accept_threshold", low=0.0, high=1.0, low_open=True)
    return float(np.sort(s_in)[_first_reaching(len(s_in), tpr) - 1])


def selective_dice(scores: object, dice: object, coverages: object) -> np.ndarray:
    """Mean Dice of the images a score accepts, at each coverage (a risk-coverage curve).

    At coverage ``c`` the ``ceil(c * N)`` images with the lowest scores are accepted (ties in
    input order). A useful score gives a Dice that falls as coverage grows; at coverage 1 it
    is the mean Dice of all images.

    Parameters
    ----------
    scores : array-like
        ``(N,)`` OOD scores, higher is more out-of-distribution.
    dice : array-like
        ``(N,)`` Dice of the same images, in ``[0, 1]``.
    coverages : array-like
        ``(M,)`` fractions in ``(0, 1]``.

    Returns
    -------
    numpy.ndarray
        ``(M,)`` float64, the mean Dice at each coverage.

    Raises
    ------
    InvalidParameterError
        If the shapes disagree, Dice is outside ``[0, 1]`` or a coverage outside ``(0, 1]``.
    """
    owner = "selective_dice"
    s = _check_scores(scores, "scores", owner)
    d = _check_scores(dice, "dice", owner)
    c = _check_array(coverages, "coverages", owner, "(M,)", 1)
    if d.shape != s.shape:
        raise InvalidParameterError(
            f"The 'dice' parameter of {owner} must have the shape of 'scores' {s.shape}. "
            f"Got shape {d.shape} instead."
        )
    if np.any((d < 0) | (d > 1)):
        raise InvalidParameterError(
            f"The 'dice' parameter of {owner} must lie in [0, 1]. Got values in [{d.min():g}, {d.max():g}] instead."
        )
    if np.any((c <= 0) | (c > 1)):
        raise InvalidParameterError(
            f"The 'coverages' parameter of {owner} must lie in (0, 1]. "
            f"Got values in [{c.min():g}, {c.max():g}] instead."
        )
    # Running mean of the Dice in order of increasing score: entry k - 1 is the mean of the k accepted.
    running = np.cumsum(d[np.argsort(s, kind="stable")]) / np.arange(1, len(d) + 1)
    # The tolerance keeps 0.3 * 10 = 3.0000000000000004 at 3 images, not 4.
    accepted = np.maximum(1, np.ceil(c * len(d) - 1e-9).astype(int))
    return running[accepted - 1]
