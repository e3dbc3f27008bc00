"""Symmetric cross-entropy (Wang et al., ICCV 2019)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from robust_lightning.losses.active_passive import ActivePassiveLoss, active_passive
from robust_lightning.losses.base import cross_entropy_terms


def symmetric_cross_entropy(
    input: Tensor,
    target: Tensor,
    alpha: float = 0.1,
    beta: float = 1.0,
    weight: Sequence[float] | Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Functional form of :class:`SCELoss`."""
    return active_passive(cross_entropy_terms, input, target, alpha, beta, weight, reduction)


class SCELoss(ActivePassiveLoss):
    """Symmetric cross-entropy ``alpha * CE + beta * RCE``, with RCE the reverse cross-entropy.

    Wang et al., "Symmetric Cross Entropy for Robust Learning with Noisy Labels", ICCV 2019.
    Defaults alpha = 0.1, beta = 1.0: the paper's CIFAR-10 setting, kept as the one default for
    10-class data (its MNIST setting is alpha = 0.01).

    Example:
        >>> import torch
        >>> loss = SCELoss()
        >>> round(loss(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0])).item(), 4)
        1.9859
    """

    active = staticmethod(cross_entropy_terms)

    def __init__(
        self,
        alpha: float = 0.1,
        beta: float = 1.0,
        weight: Sequence[float] | Tensor | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(alpha, beta, weight, reduction)
