"""A linear probe on the features, judged out of sample: a sample whose label the probe fitted without it rejects."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from robust_lightning.detectors.base import Detection, Signals, check_positive, chunks, margins_of, second_moment


def linear_probe(
    features: Tensor, labels: Tensor, num_classes: int, excluded: Tensor | None = None, ridge: float = 10.0
) -> Tensor:
    """Out-of-sample class scores of a ridge-regression probe on one-hot labels, ``(N, C)``.

    The probe (regularized least squares on the standardized features, with an unpenalized bias)
    learns from the samples that are not ``excluded``. Each of those is scored by the probe fitted
    without it, exactly, through the leave-one-out identity of ridge regression,
    ``(y_hat_i - h_i y_i) / (1 - h_i)`` with ``h_i`` the leverage of sample ``i`` (Rifkin & Lippert,
    "Notes on Regularized Least Squares", MIT-CSAIL-TR-2007-025): N probes for the price of one.
    Excluded samples are scored by the probe fitted on all the others, which never saw them.

    Written here rather than taken from scikit-learn: its ``RidgeCV`` computes the same identity
    but hands the per-sample predictions out only through a scoring side door, and on the CPU;
    this stays on the features' device and is a few lines of linear algebra.

    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.cat([torch.randn(20, 2, generator=g) - 3, torch.randn(20, 2, generator=g) + 3])
    >>> y = torch.cat([torch.zeros(20, dtype=torch.long), torch.ones(20, dtype=torch.long)])
    >>> y[0] = 1  # a flipped label among the 0s
    >>> (linear_probe(x, y, 2).argmax(1) != y).nonzero().flatten().tolist()
    [0]
    """
    check_positive("ridge", ridge)
    if not all(bool(torch.isfinite(features[rows]).all()) for rows in chunks(len(features), features.shape[1])):
        raise ValueError("linear_probe got features with NaN or inf values; check the model's outputs.")
    labels = labels.to(features.device)
    kept = torch.ones_like(labels, dtype=torch.bool) if excluded is None else ~excluded.to(features.device)
    if int(kept.sum()) < 2:
        raise ValueError("linear_probe needs at least two samples that are not excluded to learn from.")
    ids = kept.nonzero().flatten()
    class_sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=features.device)
    for rows in chunks(len(ids), features.shape[1]):
        class_sums.index_add_(0, labels[ids[rows]], features[ids[rows]].double())
    counts = torch.bincount(labels[ids], minlength=num_classes).double()
    mean = class_sums.sum(0) / len(ids)
    moment = second_moment(features, mean.float(), ids)
    scale = (torch.diagonal(moment) / (len(ids) - 1)).sqrt().clamp_min(1e-6)
    # The standardized features with a bias column: their second moment and their moment with the
    # one-hot labels follow from the centred moment and the class sums (the standardized columns sum to 0).
    design = torch.block_diag(moment / torch.outer(scale, scale), counts.sum()[None, None])
    design += torch.diag(torch.cat([torch.full_like(scale, ridge), scale.new_zeros(1)]))  # the bias is not penalized
    label_moment = torch.cat([((class_sums - counts[:, None] * mean) / scale).T, counts[None, :]])
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(design))
    weights, inverse = (inverse @ label_moment).float(), inverse.float()
    mean, scale = mean.float(), scale.float()
    scores = torch.empty(len(labels), num_classes, device=features.device)
    for rows in chunks(len(labels), features.shape[1]):
        x = torch.cat(
            [(features[rows].float() - mean) / scale, torch.ones(len(labels[rows]), 1, device=features.device)], 1
        )
        fitted = x @ weights
        leverage = ((x @ inverse) * x).sum(1, keepdim=True)
        y = F.one_hot(labels[rows], num_classes).float()
        left_out = (fitted - leverage * y) / (1 - leverage).clamp_min(1e-12)
        scores[rows] = torch.where(kept[rows, None], left_out, fitted)
    return scores


class LinearProbe:
    """Flag a sample whose label a linear probe on the features, fitted without that sample, rejects.

    Confident learning's test (Northcutt, Jiang & Chuang, JAIR 2021: out-of-sample predictions
    expose label errors) with the cross-validated model replaced by a ridge-regression probe on
    the model's features, which :func:`linear_probe` evaluates leave-one-out in closed form: no
    extra training, a few milliseconds for a few thousand samples. A flipped label disagrees with
    the samples around it even when the network has memorised it, because the probe never trains
    on the sample it judges. A sample is flagged when the probe's top class is not its label; the
    score is the best other class's score minus the label's. Samples excluded from training
    (:attr:`Signals.excluded`) do not teach the probe, so a filter's own exclusions cannot vouch
    for each other. Default ``ridge=10`` on standardized features. A consistent trigger is learned
    by the probe like a class: pair it with :class:`~robust_lightning.detectors.InputSpectralSignatures`.

    Args:
        ridge: the L2 penalty of the probe's weights, > 0.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.cat([torch.randn(20, 2, generator=g) - 3, torch.randn(20, 2, generator=g) + 3])
        >>> y = torch.cat([torch.zeros(20, dtype=torch.long), torch.ones(20, dtype=torch.long)])
        >>> y[0] = 1
        >>> LinearProbe()(Signals(y, 2, features=x)).flags.nonzero().flatten().tolist()
        [0]
    """

    name = "linear_probe"

    def __init__(self, ridge: float = 10.0) -> None:
        self.ridge = check_positive("ridge", ridge)

    def __call__(self, signals: Signals) -> Detection:
        signals.need("features", by="LinearProbe")
        scores = linear_probe(signals.features, signals.labels, signals.num_classes, signals.excluded, self.ridge)
        margins = margins_of(scores, signals.labels).cpu()
        return Detection(-margins, margins < 0)
