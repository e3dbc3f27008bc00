"""Forward loss correction with a known or anchor-point-estimated transition matrix (Patrini et al., CVPR 2017)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from robust_lightning.losses.base import apply_loss, check_in_range, check_num_classes
from robust_lightning.losses.sample_state import PerSampleLoss


def check_transition(transition: Tensor) -> Tensor:
    """A square, row-stochastic ``T[true, noisy]`` in which every noisy label can occur."""
    transition = torch.as_tensor(transition).to(torch.float32)
    if transition.ndim != 2 or transition.shape[0] != transition.shape[1]:
        raise ValueError(f"transition must be a square (classes, classes) matrix, got shape {tuple(transition.shape)}.")
    if not torch.isfinite(transition).all() or (transition < 0).any():
        raise ValueError("transition must hold finite, non-negative probabilities.")
    ones = torch.ones(len(transition), device=transition.device, dtype=torch.float32)  # not the default dtype,
    if not torch.allclose(transition.sum(1), ones, atol=1e-3):  # which Lightning sets to bf16 under bf16-true
        raise ValueError(
            f"Each row of transition, T[true, noisy], must sum to 1; the sums are {transition.sum(1).tolist()}."
        )
    if (transition.sum(0) == 0).any():
        raise ValueError(
            f"Columns {(transition.sum(0) == 0).nonzero().flatten().tolist()} of transition are all 0, so those "
            "labels could never be observed and their loss would be infinite."
        )
    return transition


def forward_correction_terms(input: Tensor, target: Tensor, transition: Tensor) -> Tensor:
    """Per-sample ``-log (p^T T)_y``, in log space so that zero entries of T cost nothing."""
    log_noisy = (input.log_softmax(1)[:, :, None] + transition.to(input).log()[None]).logsumexp(1)
    return -log_noisy.gather(1, target[:, None]).squeeze(1)


def forward_correction(
    input: Tensor,
    target: Tensor,
    transition: Tensor,
    weight: Sequence[float] | Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Functional form of :class:`ForwardCorrectionLoss` with a given transition matrix."""
    transition = check_transition(transition)
    return apply_loss(lambda x, y: forward_correction_terms(x, y, transition), input, target, weight, reduction)


def estimate_transition(probs: Tensor, quantile: float = 0.97) -> Tensor:
    """``T[i] = probs[anchor of class i]``: Patrini et al.'s anchor points, from noisy-label predictions.

    The anchor of class i is the sample with the highest ``p(i | x)`` below that column's
    ``quantile`` (the paper's outlier filter), so that a few overconfident samples do not decide;
    ``quantile=1`` takes the highest (the paper without the filter).

    Example:
        >>> import torch
        >>> probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
        >>> estimate_transition(probs, quantile=0.75)
        tensor([[0.8000, 0.2000],
                [0.3000, 0.7000]])
    """
    check_in_range("quantile", quantile, 0.0, 1.0)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"probs must be a non-empty (samples, classes) matrix, got shape {tuple(probs.shape)}.")
    probs = probs.float()
    if quantile < 1:
        probs_below = probs.masked_fill(probs >= torch.quantile(probs, quantile, dim=0, interpolation="higher"), 0)
    else:
        probs_below = probs
    anchors = probs_below.argmax(0)
    return probs[anchors]


class ForwardCorrectionLoss(PerSampleLoss):
    """``-log (p^T T)_y``: the model predicts clean labels and T maps them to the noisy ones it is trained on.

    Patrini et al., "Making Deep Neural Networks Robust to Label Noise: a Loss Correction
    Approach", CVPR 2017. Give ``transition`` (row-stochastic, ``T[true, noisy]``) when it is
    known. Without it the loss estimates T during the run: for ``warmup_epochs`` epochs from the
    first it trains in, it is plain cross-entropy and records each sample's latest prediction,
    then takes T from anchor points (:func:`estimate_transition`, the paper's 97th-percentile
    filter) and corrects from then on. The epochs come from the bound RobustDataModule; used on
    its own with ``ids=``, call :meth:`estimate` yourself. The records, T and the progress are
    saved in checkpoints.

    Example:
        >>> import torch
        >>> T = torch.tensor([[0.6, 0.4], [0.0, 1.0]])
        >>> loss = ForwardCorrectionLoss(transition=T)
        >>> round(loss(torch.tensor([[2.0, 0.0]]), torch.tensor([1])).item(), 4)
        0.7518
    """

    per_sample_buffers = ("records",)

    def __init__(
        self,
        transition: Tensor | Sequence[Sequence[float]] | None = None,
        num_classes: int | None = None,
        warmup_epochs: int = 10,
        quantile: float = 0.97,
        weight: Sequence[float] | Tensor | None = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(weight, reduction)
        check_in_range("quantile", quantile, 0.0, 1.0)
        if transition is None and num_classes is None:
            raise ValueError("Give ForwardCorrectionLoss a transition matrix, or num_classes to estimate one.")
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 1:
            raise ValueError(f"warmup_epochs must be an integer of at least 1, got {warmup_epochs!r}.")
        if transition is not None:
            transition = check_transition(transition)
            if num_classes is not None and num_classes != len(transition):
                raise ValueError(f"num_classes={num_classes} but transition is {len(transition)}x{len(transition)}.")
        k = len(transition) if transition is not None else num_classes
        check_num_classes(k, weight)
        self.warmup_epochs, self.quantile = warmup_epochs, quantile
        self.estimated = transition is not None
        self.first_epoch: int | None = None
        identity = torch.eye(k, dtype=torch.float32)
        self.register_buffer("transition", transition if transition is not None else identity)
        self.register_buffer("records", torch.zeros(0, k, dtype=torch.float32))

    @property
    def needs_ids(self) -> bool:
        return not self.estimated

    def per_sample(self, input: Tensor, target: Tensor) -> Tensor:
        return forward_correction_terms(input, target, self.transition)

    def per_sample_with_ids(self, input: Tensor, target: Tensor, ids: Tensor) -> Tensor:
        if self.source is not None:
            if self.first_epoch is None:
                self.first_epoch = self.source.current_epoch
            if self.source.current_epoch - self.first_epoch >= self.warmup_epochs:
                self.estimate()
                return self.per_sample(input, target)
        self.write_rows("records", ids, input.softmax(1))
        return self.per_sample(input, target)  # T is the identity until estimated: cross-entropy

    def estimate(self) -> Tensor:
        """Estimate T from the recorded predictions and correct with it from now on."""
        seen = self.records.sum(1) > 0
        if not seen.any():
            raise RuntimeError("ForwardCorrectionLoss has recorded no predictions to estimate T from.")
        estimated = estimate_transition(self.records[seen].float(), self.quantile)
        # Renormalized: rows recorded in a low-precision buffer (a bf16-true module) sum to 1 only roughly.
        self.transition = check_transition(estimated / estimated.sum(1, keepdim=True))
        self.estimated = True
        self.records = self.records[:0]  # no longer needed
        return self.transition

    def get_extra_state(self) -> dict[str, Any]:
        return {"estimated": self.estimated, "first_epoch": self.first_epoch}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.estimated, self.first_epoch = state["estimated"], state["first_epoch"]
