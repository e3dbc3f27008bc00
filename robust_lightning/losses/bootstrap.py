"""Soft and hard bootstrapping (Reed et al., ICLR 2015 workshop)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from robust_lightning.losses.base import RobustLossBase, apply_loss, check_in_range


def bootstrap_terms(input: Tensor, target: Tensor, beta: float, hard: bool) -> Tensor:
    """Per-sample ``-sum_k (beta * onehot_k + (1 - beta) * z_k) log p_k``.

    Soft: z = p, so the second term is the prediction's entropy and its gradient flows (the
    paper's reading as minimum-entropy regularization). Hard: z = onehot(argmax p), no gradient.
    """
    log_p = input.log_softmax(1)
    given = -log_p.gather(1, target[:, None]).squeeze(1)
    if hard:
        own = -log_p.gather(1, log_p.argmax(1, keepdim=True)).squeeze(1)
    else:
        own = -(log_p.exp() * log_p).sum(1)
    return beta * given + (1 - beta) * own


def bootstrap_loss(
    input: Tensor,
    target: Tensor,
    beta: float,
    hard: bool = False,
    weight: Sequence[float] | Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Functional form of :class:`SoftBootstrapLoss` (``hard=False``) and :class:`HardBootstrapLoss`."""
    check_in_range("beta", beta, 0.0, 1.0, low_open=False)
    return apply_loss(lambda x, y: bootstrap_terms(x, y, beta, hard), input, target, weight, reduction)


class SoftBootstrapLoss(RobustLossBase):
    """Cross-entropy against ``beta * label + (1 - beta) * prediction``.

    Reed et al., "Training Deep Neural Networks on Noisy Labels with Bootstrapping", 2015.
    Default beta = 0.95, the paper's soft setting.

    Example:
        >>> import torch
        >>> loss = SoftBootstrapLoss()
        >>> round(loss(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0])).item(), 4)
        0.2608
    """

    hard = False

    def __init__(self, beta: float = 0.95, weight: Sequence[float] | Tensor | None = None, reduction: str = "mean"):
        super().__init__(weight, reduction)
        check_in_range("beta", beta, 0.0, 1.0, low_open=False)
        self.beta = beta

    def per_sample(self, input: Tensor, target: Tensor) -> Tensor:
        return bootstrap_terms(input, target, self.beta, self.hard)


class HardBootstrapLoss(SoftBootstrapLoss):
    """Cross-entropy against ``beta * label + (1 - beta) * onehot(argmax prediction)``.

    Reed et al. 2015, hard variant. Default beta = 0.8, the paper's hard setting.

    Example:
        >>> import torch
        >>> loss = HardBootstrapLoss()
        >>> round(loss(torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([0])).item(), 4)
        1.8395
    """

    hard = True

    def __init__(self, beta: float = 0.8, weight: Sequence[float] | Tensor | None = None, reduction: str = "mean"):
        super().__init__(beta, weight, reduction)
