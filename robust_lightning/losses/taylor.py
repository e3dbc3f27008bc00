"""Taylor cross-entropy (Feng et al., IJCAI 2020)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from robust_lightning.losses.base import RobustLossBase, apply_loss


def taylor_terms(input: Tensor, target: Tensor, order: int) -> Tensor:
    """Per-sample ``sum_{k=1..order} (1 - p_y)^k / k``, the order-t Taylor series of ``-log p_y`` around 1."""
    log_p_y = input.log_softmax(1).gather(1, target[:, None]).squeeze(1)
    gap = -log_p_y.expm1()  # 1 - p_y, exact when p_y is close to 1
    return sum(gap**k / k for k in range(1, order + 1))


def taylor_cross_entropy(
    input: Tensor,
    target: Tensor,
    order: int = 2,
    weight: Sequence[float] | Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Functional form of :class:`TaylorCELoss`."""
    _check(order)
    return apply_loss(lambda x, y: taylor_terms(x, y, order), input, target, weight, reduction)


def _check(order: int) -> None:
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be a positive integer (1 is MAE, large orders approach CE), got {order!r}.")


class TaylorCELoss(RobustLossBase):
    """Cross-entropy cut to its first ``order`` Taylor terms, which bounds it like MAE.

    Feng et al., "Can Cross Entropy Loss Be Robust to Label Noise?", IJCAI 2020. Default order
    t = 2, the paper's choice for symmetric noise on CIFAR-10.

    Example:
        >>> import torch
        >>> loss = TaylorCELoss(order=2)
        >>> round(loss(torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0])).item(), 4)
        0.2357
    """

    def __init__(self, order: int = 2, weight: Sequence[float] | Tensor | None = None, reduction: str = "mean") -> None:
        super().__init__(weight, reduction)
        _check(order)
        self.order = order

    def per_sample(self, input: Tensor, target: Tensor) -> Tensor:
        return taylor_terms(input, target, self.order)
