"""Generalized cross-entropy (Zhang & Sabuncu, NeurIPS 2018)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from robust_lightning.losses.base import RobustLossBase, apply_loss, check_in_range


def gce_terms(input: Tensor, target: Tensor, q: float) -> Tensor:
    """Per-sample ``(1 - p_y**q) / q``, written as ``-expm1(q log p_y) / q`` to stay exact near p_y = 1."""
    log_p = input.log_softmax(1).gather(1, target[:, None]).squeeze(1)
    return -(q * log_p).expm1() / q


def generalized_cross_entropy(
    input: Tensor,
    target: Tensor,
    q: float = 0.7,
    weight: Sequence[float] | Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Functional form of :class:`GCELoss`."""
    check_in_range("q", q, 0.0, 1.0)
    return apply_loss(lambda x, y: gce_terms(x, y, q), input, target, weight, reduction)


class GCELoss(RobustLossBase):
    """Generalized cross-entropy ``(1 - p_y^q) / q``: cross-entropy as q -> 0, MAE at q = 1.

    Zhang & Sabuncu, "Generalized Cross Entropy Loss for Training Deep Neural Networks with
    Noisy Labels", NeurIPS 2018. Default q = 0.7, the paper's value for CIFAR-10 and MNIST. The
    paper's truncated variant (which also needs per-sample weights) is not included.

    Example:
        >>> import torch
        >>> loss = GCELoss(q=0.7)
        >>> round(loss(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0])).item(), 4)
        0.2205
    """

    def __init__(self, q: float = 0.7, weight: Sequence[float] | Tensor | None = None, reduction: str = "mean") -> None:
        super().__init__(weight, reduction)
        check_in_range("q", q, 0.0, 1.0)
        self.q = q

    def per_sample(self, input: Tensor, target: Tensor) -> Tensor:
        return gce_terms(input, target, self.q)
