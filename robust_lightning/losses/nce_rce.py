"""Normalized cross-entropy plus reverse cross-entropy, an active-passive loss (Ma et al., ICML 2020)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from robust_lightning.losses.active_passive import ActivePassiveLoss, active_passive


def nce_terms(input: Tensor, target: Tensor) -> Tensor:
    """Per-sample ``log p_y / sum_k log p_k``: cross-entropy normalized over all labels, in [0, 1]."""
    log_p = input.log_softmax(1)
    return log_p.gather(1, target[:, None]).squeeze(1) / log_p.sum(1)


def nce_rce(
    input: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 1.0,
    weight: Sequence[float] | Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Functional form of :class:`NCERCELoss`."""
    return active_passive(nce_terms, input, target, alpha, beta, weight, reduction)


class NCERCELoss(ActivePassiveLoss):
    """``alpha * NCE + beta * RCE``: a normalized (active) loss paired with a passive one.

    Ma et al., "Normalized Loss Functions for Deep Learning with Noisy Labels", ICML 2020.
    Defaults alpha = 1, beta = 1: the paper's CIFAR-10 setting, kept as the one default for
    10-class data (its MNIST setting is beta = 10).

    Example:
        >>> import torch
        >>> loss = NCERCELoss()
        >>> round(loss(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0])).item(), 4)
        2.0127
    """

    active = staticmethod(nce_terms)

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 1.0,
        weight: Sequence[float] | Tensor | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(alpha, beta, weight, reduction)
