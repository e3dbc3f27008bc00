"""Early-learning regularization (Liu et al., NeurIPS 2020)."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from robust_lightning.losses.base import apply_loss, check_in_range, check_num_classes, cross_entropy_terms
from robust_lightning.losses.sample_state import PerSampleLoss

CLAMP = 1e-4  # the paper's clamp of the probabilities, which keeps log(1 - <t, p>) finite


def elr_terms(input: Tensor, target: Tensor, ema_targets: Tensor, lam: float) -> Tensor:
    """Per-sample ``CE + lam * log(1 - <t_i, p_i>)`` for the batch's (already updated) EMA targets ``t_i``."""
    p = input.softmax(1).clamp(CLAMP, 1 - CLAMP)
    return cross_entropy_terms(input, target) + lam * (1 - (ema_targets * p).sum(1)).log()


def ema_update(ema_targets: Tensor, input: Tensor, beta: float) -> Tensor:
    """``beta * t + (1 - beta) * p``, with p the clamped, renormalized and detached prediction."""
    p = input.detach().float().softmax(1).clamp(CLAMP, 1 - CLAMP)
    return beta * ema_targets + (1 - beta) * p / p.sum(1, keepdim=True)


def early_learning_regularization(
    input: Tensor,
    target: Tensor,
    ema_targets: Tensor,
    lam: float = 3.0,
    weight: Sequence[float] | Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Functional form of :class:`ELRLoss`, given the batch's EMA targets (the caller keeps and updates them)."""
    check_in_range("lam", lam, 0.0, float("inf"), low_open=False)
    return apply_loss(lambda x, y: elr_terms(x, y, ema_targets.to(x), lam), input, target, weight, reduction)


class ELRLoss(PerSampleLoss):
    """Cross-entropy plus ``lam * log(1 - <t_i, p_i>)``, with ``t_i`` a running average of sample i's predictions.

    Liu et al., "Early-Learning Regularization Prevents Memorization of Noisy Labels", NeurIPS
    2020. Defaults lam = 3, beta = 0.7: the paper's CIFAR-10 setting. The targets form a
    ``(num_samples, num_classes)`` buffer, saved in checkpoints; in eval mode the loss is plain
    cross-entropy, since the targets belong to training samples.

    Example:
        >>> import torch
        >>> loss = ELRLoss(num_classes=3)
        >>> loss.resize(100)  # or let RobustDataModule bind it to the training set
        >>> logits, y = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0])
        >>> round(loss(logits, y, ids=torch.tensor([7])).item(), 4)
        -0.4023
        >>> loss.ema_targets[7].round(decimals=3)
        tensor([0.2360, 0.0320, 0.0320])
    """

    per_sample_buffers = ("ema_targets",)
    uses_clean_logits = True

    def __init__(
        self,
        num_classes: int,
        lam: float = 3.0,
        beta: float = 0.7,
        weight: Sequence[float] | Tensor | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(weight, reduction)
        check_in_range("lam", lam, 0.0, float("inf"), low_open=False)
        check_in_range("beta", beta, 0.0, 1.0, low_open=False)
        check_num_classes(num_classes, weight)
        self.lam, self.beta = lam, beta
        self.register_buffer("ema_targets", torch.zeros(0, num_classes, dtype=torch.float32))
        self._last_update: tuple[weakref.ref, Tensor, Tensor] | None = None

    def per_sample(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy_terms(input, target)

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_last_update": None}  # a step's logits are not the loss's state

    def per_sample_with_ids(self, input: Tensor, target: Tensor, ids: Tensor) -> Tensor:
        if input.shape[1] != self.ema_targets.shape[1]:
            raise ValueError(
                f"ELRLoss was built for {self.ema_targets.shape[1]} classes, the logits have {input.shape[1]}."
            )
        mixing = getattr(self, "mixing", None)  # absent from a loss pickled by an earlier version
        # Under mixup the targets follow the predictions on the unmixed inputs, and the mixed sample is
        # held to the mix of its two samples' targets, as in the paper's ELR+.
        follows = mixing.clean_logits if mixing is not None and mixing.clean_logits is not None else input
        last = getattr(self, "_last_update", None)
        if last is not None and last[0]() is follows and torch.equal(last[1], ids):
            updated = last[2]  # the same logits again (a mixed loss's second term): targets move once per step
        else:
            updated = ema_update(self.ema_targets[ids].float(), follows, self.beta)
            self.write_rows("ema_targets", ids, updated)
            self._last_update = (weakref.ref(follows), ids.clone(), updated)
        if mixing is not None:
            permutation = mixing.permutation.to(updated.device)
            updated = mixing.lam * updated + (1 - mixing.lam) * updated[permutation]
        return elr_terms(input, target, updated, self.lam)
