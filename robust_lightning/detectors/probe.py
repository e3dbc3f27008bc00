"""A linear probe on the features, judged out of sample: a sample whose label the probe fitted without it rejects."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from robust_lightning.detectors.base import Detection, Signals, check_positive, margins_of

# Rows of the leverage computed at once: bounds memory to (D + 1) x CHUNK.
CHUNK = 4096


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
    if not bool(torch.isfinite(features).all()):
        raise ValueError("linear_probe got features with NaN or inf values; check the model's outputs.")
    labels = labels.to(features.device)
    kept = torch.ones_like(labels, dtype=torch.bool) if excluded is None else ~excluded.to(features.device)
    if int(kept.sum()) < 2:
        raise ValueError("linear_probe needs at least two samples that are not excluded to learn from.")
    x = features.double()
    x = (x - x[kept].mean(0)) / x[kept].std(0).clamp_min(1e-6)
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
    y = F.one_hot(labels, num_classes).to(x)
    penalty = torch.full((x.shape[1],), float(ridge), dtype=x.dtype, device=x.device)
    penalty[-1] = 0  # the bias
    factor = torch.linalg.cholesky(x[kept].T @ x[kept] + torch.diag(penalty))
    fitted = x @ torch.cholesky_solve(x[kept].T @ y[kept], factor)
    leverage = torch.cat(
        [torch.linalg.solve_triangular(factor, rows.T, upper=False).pow(2).sum(0) for rows in x.split(CHUNK)]
    )
    left_out = (fitted - leverage[:, None] * y) / (1 - leverage[:, None]).clamp_min(1e-12)
    return torch.where(kept[:, None], left_out, fitted).float()


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
