"""The active-passive form shared by SCE and NCE+RCE: ``alpha * active + beta * reverse cross-entropy``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import Tensor

from robust_lightning.losses.base import RobustLossBase, apply_loss, check_in_range

LOG_ZERO = math.log(1e-4)  # the papers' clamp of log 0 in the one-hot label
Terms = Callable[[Tensor, Tensor], Tensor]


def reverse_ce_terms(input: Tensor, target: Tensor) -> Tensor:
    """Per-sample ``-sum_k p_k log q_k`` with q the one-hot label, log 0 clamped to log 1e-4: ``-log(1e-4) (1 - p_y)``.

    The papers' code also clamps p at 1e-7, which only zeroes gradients of vanishing probabilities; it is left out.
    """
    p_y = input.softmax(1).gather(1, target[:, None]).squeeze(1)
    return -LOG_ZERO * (1 - p_y)


def check_pair(alpha: float, beta: float) -> None:
    check_in_range("alpha", alpha, 0.0, math.inf, low_open=False)
    check_in_range("beta", beta, 0.0, math.inf, low_open=False)
    if alpha == beta == 0:
        raise ValueError("alpha and beta are both 0, which leaves no loss: set at least one of them above 0.")


def active_passive(
    active: Terms,
    input: Tensor,
    target: Tensor,
    alpha: float,
    beta: float,
    weight: Sequence[float] | Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """``alpha * active(input, target) + beta * RCE``, checked, weighted and reduced."""
    check_pair(alpha, beta)
    terms = lambda x, y: alpha * active(x, y) + beta * reverse_ce_terms(x, y)
    return apply_loss(terms, input, target, weight, reduction)


class ActivePassiveLoss(RobustLossBase):
    """Base of the losses that add ``beta`` times reverse cross-entropy to an ``alpha``-weighted active term."""

    active: Terms

    def __init__(
        self, alpha: float, beta: float, weight: Sequence[float] | Tensor | None = None, reduction: str = "mean"
    ) -> None:
        super().__init__(weight, reduction)
        check_pair(alpha, beta)
        self.alpha, self.beta = alpha, beta

    def per_sample(self, input: Tensor, target: Tensor) -> Tensor:
        return self.alpha * type(self).active(input, target) + self.beta * reverse_ce_terms(input, target)
